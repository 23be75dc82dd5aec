"""Compute options change how a model is computed, never what: gradient checkpointing gives the same gradients, a compiled
run writes checkpoints that load without compile (and resume without it), and the attention choice says what it fell back to."""
import json
from pathlib import Path

import pytest
import torch

from model_foundry.compute import enable_gradient_checkpointing, set_attention
from model_foundry.config import ModelConfig, config_hash
from model_foundry.fixtures import tiny_config
from model_foundry.model import build_model


def gradients(model, x):
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('arch', ['gpt2', 'llama', 'starcoder2'])
def test_gradient_checkpointing_gives_same_gradients(arch):
    model = build_model(ModelConfig(architecture=arch, layers=3, embedding_size=64, attention_heads=4), vocab_size=97,
                        context_length=32, seed=0).train()
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    plain = gradients(model, x)
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    again = gradients(model, x)
    assert plain.keys() == again.keys() and len(plain) > 0
    worst = max((plain[k] - again[k]).abs().max().item() for k in plain)
    assert worst <= 1e-6, worst  # the same function recomputed: equal up to float rounding (here typically 0)


def test_gradient_checkpointing_with_lora_gives_same_adapter_gradients():
    from peft import LoraConfig, get_peft_model
    base = build_model(ModelConfig(architecture='llama', layers=2, embedding_size=64, attention_heads=4), vocab_size=97, context_length=32, seed=0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], init_lora_weights=False)).train()
    x = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    plain = gradients(model, x)
    enable_gradient_checkpointing(model)
    again = gradients(model, x)
    assert all('lora_' in k for k in plain) and plain.keys() == again.keys() and len(plain) == 8
    assert max((plain[k] - again[k]).abs().max().item() for k in plain) <= 1e-6


def test_unavailable_attention_falls_back_and_says_so(caplog):
    model = build_model(ModelConfig(layers=1, embedding_size=32, attention_heads=2), vocab_size=40, context_length=16, seed=0)
    with caplog.at_level('WARNING', logger='model_foundry'):
        chosen = set_attention(model, 'flash_attention_2', 'cpu', 'fp32')
    assert chosen == 'sdpa' and model.config._attn_implementation == 'sdpa'
    assert 'training.attention flash_attention_2 is not available (it needs CUDA): using sdpa' in caplog.text


def _train(tmp_path, name, **training):
    from model_foundry.run import train
    cfg = tiny_config(tmp_path, training=dict(train_steps=8, eval_interval=4, log_interval=1, **training))
    state = train(cfg, tmp_path/name, progress=False)
    losses = [r['loss'] for r in map(json.loads, (tmp_path/name/'metrics.jsonl').read_text().splitlines()) if r['type'] == 'train']
    return cfg, state, losses


@pytest.mark.slow
def test_compiled_model_checkpoint_loads_without_compile(tmp_path, cache_dir):
    "torch.compile (aot_eager: Dynamo and AOTAutograd without a C++ toolchain; the gpu tier compiles with inductor)."
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    torch._dynamo.reset()
    cfg, state, compiled = _train(tmp_path, 'compiled', compile=True, compile_backend='aot_eager')
    _, _, plain = _train(tmp_path, 'plain')
    assert state['status'] == 'completed' and len(compiled) == len(plain) == 8
    assert max(abs(a - b) for a, b in zip(compiled, plain)) <= 1e-4, (compiled, plain)
    ckpt = tmp_path/'compiled'/'checkpoints'/'step-00000008'
    with safe_open(str(ckpt/'model.safetensors'), 'pt') as f: names = list(f.keys())
    assert names and not any('_orig_mod' in n for n in names), names[:5]
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)  # plain transformers, no compile
    x = torch.randint(0, loaded.config.vocab_size, (2, 16))
    assert torch.isfinite(loaded(x).logits).all()
    # the compute options are not part of what was trained: the same run goes on without compile, with checkpointing
    more = tiny_config(tmp_path, training=dict(train_steps=12, eval_interval=4, log_interval=1, gradient_checkpointing=True))
    assert config_hash(more.model_copy(update=dict(training=more.training.model_copy(update=dict(train_steps=8))))) == config_hash(cfg)


@pytest.mark.slow
def test_a_run_with_gradient_checkpointing_trains_as_one_without(tmp_path, cache_dir):
    _, _, on = _train(tmp_path, 'on', gradient_checkpointing=True)
    _, _, off = _train(tmp_path, 'off')
    assert max(abs(a - b) for a, b in zip(on, off)) <= 1e-5, (on, off)


def test_batch_size_finder_backs_off_on_out_of_memory(tmp_path, cache_dir):
    """The real search over real steps of a real learner; out of memory is injected (a CPU cannot raise it on demand: its
    kernel kills instead) around the training forward: it raises torch.OutOfMemoryError, as CUDA does, above 12 samples."""
    from model_foundry.fixtures import tiny_prepared
    from model_foundry.loop import training_forward
    from model_foundry.run import RunDir, build_learner
    from model_foundry.validate import search_micro_batch, step_fits
    cfg = tiny_config(tmp_path, data=dict(batch_size=4), training=dict(train_steps=4, gradient_accumulation_steps=12))
    learn = build_learner(cfg, tiny_prepared(cfg), RunDir(tmp_path/'run'), progress=False)
    forward = training_forward(learn)
    def oom_above_12(**kw):
        if kw['input_ids'].shape[0] > 12: raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB (injected)')
        return forward(**kw)
    learn.forward = oom_above_12
    before = [p.detach().clone() for p in learn.model.parameters()]
    best, trials = search_micro_batch(lambda m: step_fits(learn, m), limit=48)
    assert (best, trials) == (12, [(1, True), (2, True), (4, True), (8, True), (16, False), (12, True), (14, False), (13, False)])
    assert all(p.grad is None for p in learn.model.parameters())  # a failed trial leaves no gradients behind
    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))  # the trials that fit really stepped
    def boom(**kw): raise RuntimeError('boom')
    learn.forward = boom
    with pytest.raises(RuntimeError, match='boom'): step_fits(learn, 2)  # anything but out of memory is not swallowed


@pytest.mark.slow
def test_tune_batch_writes_a_config_that_keeps_the_effective_batch_and_trains(tmp_path, cache_dir):
    from conftest import foundry, foundry_here
    from model_foundry.config import load_config, save_config
    cfg = tiny_config(tmp_path, data=dict(batch_size=2), training=dict(train_steps=3, gradient_accumulation_steps=6, eval_interval=3))
    save_config(cfg, tmp_path/'exp.yaml')
    res = foundry_here('tune-batch', tmp_path/'exp.yaml', '--run-dir', tmp_path/'run')
    assert res.returncode == 0, res.stderr[-2000:]
    tuned = load_config(tmp_path/'exp.tuned.yaml')
    assert (tuned.data.batch_size, tuned.training.gradient_accumulation_steps) == (12, 1), res.stdout  # all 12 fit on this CPU
    assert 'data.batch_size 2 -> 12, training.gradient_accumulation_steps 6 -> 1 (effective batch 12 kept)' in res.stdout
    assert not (tmp_path/'run').exists()  # the search wrote nothing to the run
    res = foundry_here('train', tmp_path/'exp.tuned.yaml', '--run-dir', tmp_path/'run')
    assert res.returncode == 0 and json.loads((tmp_path/'run'/'state.json').read_text())['status'] == 'completed', res.stderr[-2000:]


@pytest.mark.slow
def test_a_run_resumes_with_its_micro_batch_changed_when_the_effective_batch_is_kept(tmp_path, cache_dir):
    "What `foundry tune-batch` (or the DDP out-of-memory advice) does to a run in progress: 2 x 6 becomes 12 x 1, and it goes on."
    from model_foundry.config import ConfigError
    from model_foundry.fixtures import StopAfter
    from model_foundry.run import RunInterrupted, train
    first = tiny_config(tmp_path, data=dict(batch_size=2), training=dict(train_steps=8, eval_interval=4, log_interval=1, gradient_accumulation_steps=6),
                        logging=dict(dir=str(tmp_path/'runs'), sample_ledger=True))
    with pytest.raises(RunInterrupted): train(first, tmp_path/'run', progress=False, callbacks=[StopAfter(4)])
    tuned = first.model_copy(update=dict(data=first.data.model_copy(update=dict(batch_size=12)),
                                         training=first.training.model_copy(update=dict(gradient_accumulation_steps=1))))
    assert train(tuned, tmp_path/'run', progress=False)['status'] == 'completed'
    recs = [json.loads(l) for l in (tmp_path/'run'/'samples.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs] == list(range(1, 9)) and sorted(i for r in recs for a, b in r['samples'] for i in range(a, b)) == list(range(96))
    assert recs[3]['samples'] == [[36, 38], [38, 40], [40, 42], [42, 44], [44, 46], [46, 48]] and recs[4]['samples'] == [[48, 60]]
    other = tuned.model_copy(update=dict(data=tuned.data.model_copy(update=dict(batch_size=6))))  # 6 x 1: another effective batch
    with pytest.raises(ConfigError, match='was started with a different config'): train(other, tmp_path/'run', progress=False)


@pytest.mark.slow
def test_lean_forward_trains_the_same_run_bit_for_bit_and_says_where_it_is_not_used(tmp_path, cache_dir, caplog):
    "training.lean_forward (on by default) computes GPT-2's training forward without transformers' call machinery: same losses, same weights."
    from safetensors.torch import load_file
    with caplog.at_level('INFO', logger='model_foundry'):
        _, state, lean = _train(tmp_path, 'lean')
    assert state['status'] == 'completed' and 'lean forward' in caplog.text
    caplog.clear()
    with caplog.at_level('INFO', logger='model_foundry'):
        _, _, plain = _train(tmp_path, 'model', lean_forward=False)
    assert 'lean forward' not in caplog.text
    assert lean == plain and len(lean) == 8  # bit for bit: the same operations in the same order
    a, b = load_file(tmp_path/'lean'/'final'/'model.safetensors'), load_file(tmp_path/'model'/'final'/'model.safetensors')
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # gradient checkpointing (a compute option the lean forward does not have): the model's own forward, nothing said about lean
    caplog.clear()
    with caplog.at_level('INFO', logger='model_foundry'):
        _train(tmp_path, 'checkpointed', gradient_checkpointing=True)
    assert 'gradient checkpointing' in caplog.text and 'lean forward' not in caplog.text
