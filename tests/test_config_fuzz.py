"""A config fuzzer: any YAML a user can write either trains a step or fails with one line (exit code 1 or 2), never a traceback.

hypothesis draws configs from every section's fields (within ranges that keep a step small), including combinations
that pydantic or the plan refuse; each one is run through the real `foundry train` entry point in this process."""
import contextlib, io, json, tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import REPO
from model_foundry.cli import main

CORPUS = REPO/'tests'/'data'/'tiny.txt'


@st.composite
def configs(draw) -> dict:
    "A config dict with a random subset of fields set, some combinations invalid on purpose."
    heads = draw(st.sampled_from([1, 2, 4]))
    pick = lambda d: {k: draw(v) for k, v in d.items() if draw(st.booleans())}
    data = pick(dict(batch_size=st.integers(1, 80), max_sequence_length=st.integers(2, 48), val_fraction=st.floats(0.05, 0.9),
                     format=st.sampled_from(['auto', 'text', 'files']), packing=st.booleans(), fim_rate=st.sampled_from([0.0, 0.5]),
                     encoding=st.sampled_from(['utf-8', 'latin-1', 'ascii'])))
    model = pick(dict(architecture=st.sampled_from(['gpt2', 'llama', 'starcoder2']), layers=st.integers(1, 3),
                      embedding_size=st.sampled_from([heads * 4, heads * 8, 12, 30]), intermediate_hidden_size=st.integers(4, 64),
                      dropout=st.sampled_from([0.0, 0.1]), tie_word_embeddings=st.booleans(),
                      activation_function=st.sampled_from(['gelu', 'relu', 'silu', 'gelu_new'])))
    model['attention_heads'] = heads
    training = pick(dict(learning_rate=st.sampled_from([1e-4, 3e-3, 1.0]), gradient_accumulation_steps=st.integers(1, 3),
                         warmup_steps=st.integers(0, 3), eval_interval=st.integers(1, 3), eval_batches=st.integers(1, 3),
                         max_grad_norm=st.sampled_from([None, 0.0, 1.0]), precision=st.sampled_from(['auto', 'fp32', 'bf16']),
                         early_stopping_patience=st.sampled_from([None, 1]), log_spaced_checkpoints=st.integers(0, 2),
                         keep_checkpoints=st.integers(1, 3), nonfinite_action=st.sampled_from(['rollback', 'stop']),
                         weight_decay=st.sampled_from([0.0, 0.1])))
    training['train_steps'] = 1
    tokenizer = pick(dict(kind=st.sampled_from(['char', 'bpe']), vocab_size=st.integers(2, 400)))
    finetune = pick(dict(method=st.sampled_from(['full', 'lora'])))  # lora on a scratch model: refused in one line
    return dict(experiment_name='fuzz', data=dict(source_corpus=str(CORPUS), **data), tokenizer=tokenizer, model=model,
                training=training, finetune=finetune)


@pytest.mark.slow
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_config_trains_a_step_or_fails_in_one_line(d):
    with tempfile.TemporaryDirectory() as tmp:
        d['data']['cache_dir'] = str(Path(tmp)/'cache')
        cfg, run = Path(tmp)/'c.yaml', Path(tmp)/'run'
        cfg.write_text(yaml.safe_dump(d))
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(['train', str(cfg), '--run-dir', str(run)])  # an exception escaping here is the traceback a user would see
        errors = [l for l in err.getvalue().splitlines() if l.startswith('foundry: error:')]
        event(f"exit {code}: {errors[0].split(':')[2][:40] if errors else 'trained'}")
        if code == 0:
            state = json.loads((run/'state.json').read_text())
            assert state['status'] in ('completed', 'early_stopped') and state['step'] == 1, state
        else:
            assert code in (1, 2) and len(errors) == 1 and 'Traceback' not in err.getvalue(), (code, err.getvalue()[-2000:])
            if code == 2: assert not (run/'checkpoints').exists(), d  # refused before training: nothing half-written
