"""The second architecture (Llama-style) trains through the same loop and reloads with plain transformers."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from model_foundry.config import ExperimentConfig
from model_foundry.generation import generate
from model_foundry.run import train


@pytest.mark.slow
def test_llama_run_trains_and_final_model_reloads_with_auto_classes(tmp_path, cache_dir):
    text = tmp_path/'text.txt'
    text.write_text('the quick brown fox jumps over the lazy dog.\n' * 200)
    cfg = ExperimentConfig(experiment_name='llama-tiny',
                           data=dict(source_corpus=str(text), batch_size=8, max_sequence_length=32),
                           tokenizer=dict(kind='char'), model=dict(architecture='llama', layers=2, embedding_size=64, attention_heads=4),
                           training=dict(train_steps=60, eval_interval=30, eval_batches=2, learning_rate=3e-3))
    state = train(cfg, tmp_path/'run', progress=False)
    evals = [r for r in map(json.loads, (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()) if r['type'] == 'eval']
    assert state['status'] == 'completed' and evals[-1]['val_loss'] < 1.0, evals  # a repeated line is easy to learn
    model = AutoModelForCausalLM.from_pretrained(tmp_path/'run'/'final')
    tok = AutoTokenizer.from_pretrained(tmp_path/'run'/'final')
    assert model.config.model_type == 'llama'
    assert generate(model, tok, 'the quick brown ', 12, temperature=0).text == 'fox jumps ov'
