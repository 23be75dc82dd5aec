"""Sampling settings on a tiny model trained here (a real run directory, a real char tokenizer)."""
import pytest

from model_foundry.config import ExperimentConfig
from model_foundry.generation import context_length, generate, generate_batch
from model_foundry.results import load_run
from model_foundry.run import train


@pytest.fixture(scope='module')
def tiny_model(tmp_path_factory):
    from conftest import SHAKESPEARE
    d = tmp_path_factory.mktemp('gen')
    cfg = ExperimentConfig(experiment_name='gen', data=dict(source_corpus=str(SHAKESPEARE), batch_size=16, max_sequence_length=32,
                                                            cache_dir=str(d/'cache')),
                           tokenizer=dict(kind='char'), model=dict(layers=2, embedding_size=64, attention_heads=4),
                           training=dict(train_steps=150, eval_interval=150, eval_batches=2, learning_rate=3e-3))
    train(cfg, d/'run', progress=False)
    return load_run(d/'run')


@pytest.mark.slow
def test_generation_with_deterministic_parameters_top_k_1_temperature_0(tiny_model):
    model, tok = tiny_model
    greedy = [generate(model, tok, 'ROMEO:', 40, temperature=0, stop_at_eos=False).text for _ in range(3)]
    top1 = [generate(model, tok, 'ROMEO:', 40, temperature=0.9, top_k=1, seed=s, stop_at_eos=False).text for s in (0, 1, 2)]
    assert len(set(greedy)) == 1 and set(top1) == set(greedy)  # top-k 1 is greedy whatever the seed
    # and across batch sizes: left-padded batches give every prompt what it gets alone
    prompts = ['ROMEO:', 'First Citizen:\nWe are', 'O', 'KING HENRY VI:\nWhat', 'The', 'My lord, ']
    alone = [generate(model, tok, p, 20, temperature=0, stop_at_eos=False).text for p in prompts]
    assert alone[0] == greedy[0][:20]
    for size in (2, 3, 6):
        for i in range(0, len(prompts), size):
            got = generate_batch(model, tok, prompts[i:i + size], 20, temperature=0, stop_at_eos=False)
            assert [g.text for g in got] == alone[i:i + size], (size, i)
        got = generate_batch(model, tok, prompts[:size], 20, temperature=0.9, top_k=1, seed=3, stop_at_eos=False)
        assert [g.text for g in got] == alone[:size]


@pytest.mark.slow
def test_generation_with_maximum_top_k_configuration(tiny_model):
    model, tok = tiny_model
    plain = generate(model, tok, 'JULIET:', 60, temperature=1.0, seed=7, stop_at_eos=False).text
    assert generate(model, tok, 'JULIET:', 60, temperature=1.0, top_k=len(tok), seed=7, stop_at_eos=False).text == plain
    assert generate(model, tok, 'JULIET:', 60, temperature=1.0, top_k=10 * len(tok), seed=7, stop_at_eos=False).text == plain
    assert generate(model, tok, 'JULIET:', 60, temperature=1.0, top_p=1.0, seed=7, stop_at_eos=False).text == plain
    assert generate(model, tok, 'JULIET:', 60, temperature=1.0, seed=8, stop_at_eos=False).text != plain


@pytest.mark.slow
def test_prompt_tokenization_and_truncation_handling(tiny_model):
    model, tok = tiny_model
    ctx = context_length(model)
    long = ('First Citizen:\nBefore we proceed any further, hear me speak.\n' * 3)
    assert len(tok(long)['input_ids']) > ctx
    g = generate(model, tok, long, 20, temperature=0)
    assert g.prompt_tokens == ctx
    assert g.text == generate(model, tok, long[-ctx:], 20, temperature=0).text  # char tokenizer: ctx tokens = ctx chars
    assert tok.decode(tok(long, add_special_tokens=False)['input_ids']) == long
