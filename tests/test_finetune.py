"""Fine-tuning for real: tiny StarCoder2 / Llama / GPT-2 bases made here, real peft LoRA, real bitsandbytes
4-bit (its CPU backend), real `datasets` sources, real processes killed with SIGKILL."""
import json, shutil, signal, sysconfig, time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, foundry, start_train, wait_until, foundry_here
from model_foundry.config import DataConfig, ExperimentConfig, FinetuneConfig, ModelConfig, TokenizerConfig, load_config
from model_foundry.evaluation import IGNORE, lm_loss
from model_foundry.finetune import finetune_model, load_base, make_base_model, parameter_report
from model_foundry.fixtures import StopAfter
from model_foundry.checkpointing import list_checkpoints, load_checkpoint
from model_foundry.run import RunDir, RunInterrupted, build_learner, plan_run, train
from model_foundry.samples import MIDDLE, PREFIX, SUFFIX, SampleBlocks, Samples, fim_pieces, prepare_data, split_blocks, tokenize_samples

STDLIB = Path(sysconfig.get_paths()['stdlib'])
PY_FILES = ['heapq.py', 'bisect.py', 'colorsys.py', 'fnmatch.py', 'shlex.py', 'textwrap.py']

CONFIG = """
experiment_name: ft
random_seed: 5
data:
  source_corpus: {corpus}
  format: files
  fim_rate: 0.5
  batch_size: 4
  max_sequence_length: 64
  val_fraction: 0.2
model:
  init: pretrained
  pretrained: {base}
finetune:
  method: {method}
  lora_r: 4
  lora_alpha: 8
  lora_dropout: 0.1          # dropout draws from the RNG: resuming must restore it
training:
  train_steps: {steps}
  learning_rate: 5.0e-3
  warmup_steps: 2
  eval_interval: {eval_every}
  eval_batches: 2
  checkpoint_interval: {ckpt_every}
  log_interval: 1
  device: cpu
"""


@pytest.fixture(scope='module')
def code_dir(tmp_path_factory):
    "Python (a few standard-library modules) and Rust (examples/code/rust) source files, one sample each."
    d = tmp_path_factory.mktemp('code')
    for f in PY_FILES: shutil.copy(STDLIB/f, d/f)
    for f in (REPO/'examples'/'code'/'rust').glob('*.rs'): shutil.copy(f, d/f.name)
    return d


@pytest.fixture(scope='module')
def bases(tmp_path_factory, code_dir):
    "Tiny random-initialised base model directories of each architecture, FIM tokenizer included."
    root = tmp_path_factory.mktemp('bases')
    texts = [p.read_text() for p in sorted(code_dir.iterdir())]
    return {a: make_base_model(a, root/a, texts, vocab_size=400, layers=2, embedding_size=64, attention_heads=4, context_length=128)
            for a in ('starcoder2', 'llama', 'gpt2')}


def write_config(tmp_path, corpus, base, method='qlora', steps=30, eval_every=10, ckpt_every=5, name='ft.yaml', extra=''):
    p = tmp_path/name
    p.write_text(CONFIG.format(corpus=corpus, base=base, method=method, steps=steps, eval_every=eval_every, ckpt_every=ckpt_every) + extra)
    return p


def records(run, kind):
    return [r for r in map(json.loads, (Path(run)/'metrics.jsonl').read_text().splitlines()) if r['type'] == kind]


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope='module')
def finetuned(tmp_path_factory, code_dir, bases, cache_dir_module):
    "A finished LoRA run and a finished QLoRA run of the tiny StarCoder2 (in this process)."
    root, out = tmp_path_factory.mktemp('runs'), {}
    for method in ('lora', 'qlora'):
        cfg = load_config(write_config(root, code_dir, bases['starcoder2'], method, steps=16, eval_every=8, ckpt_every=8, name=f'{method}.yaml'))
        assert train(cfg, root/method, progress=False)['status'] == 'completed'
        out[method] = (cfg, root/method)
    return out


@pytest.fixture(scope='module')
def cache_dir_module(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv('FOUNDRY_CACHE', str(tmp_path_factory.mktemp('cache')))
    yield
    mp.undo()


@pytest.mark.slow
def test_starcoder2_qlora_run_killed_and_resumed_matches_uninterrupted_bit_for_bit(tmp_path, cache_dir, code_dir, bases, monkeypatch):
    # one thread per process: bit-for-bit needs the same float sums in both runs, and with two threads the 4-bit CPU path
    # once gave a loss 1e-6 apart on a loaded machine (CI's 2 cores shared with the test runner)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    cfg = write_config(tmp_path, code_dir, bases['starcoder2'], 'qlora', steps=80, eval_every=20, ckpt_every=5)
    ref = tmp_path/'uninterrupted'
    res = foundry_here('train', cfg, '--run-dir', ref)
    assert res.returncode == 0, res.stderr[-3000:]

    run, kills = tmp_path/'killed', []
    for target in (10, 40):  # SIGKILL once a checkpoint at or past `target` is written, twice
        proc = start_train(cfg, run)
        seen = lambda: any(int(p.name.split('-')[1]) >= target for p in list_checkpoints(run/'checkpoints'))
        assert wait_until(lambda: seen() or proc.poll() is not None, timeout=300)
        if proc.poll() is None: proc.send_signal(signal.SIGKILL); proc.wait(); kills.append(target)
    assert kills, 'the run finished before it could be killed'
    assert json.loads((run/'state.json').read_text())['status'] == 'running'  # SIGKILL: nobody wrote anything more
    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]

    loss = lambda r: {x['step']: x['loss'] for x in records(r, 'train')}
    differ = sorted(k for k in loss(ref) if loss(run).get(k) != loss(ref)[k])
    assert len(loss(ref)) == 80 and loss(run).keys() == loss(ref).keys()
    assert not differ, (f'from step {differ[0]}: {loss(run).get(differ[0])} vs {loss(ref)[differ[0]]}; '
                        f'resumed from {[r["checkpoint"] for r in records(run, "resume")]}')
    assert [(x['step'], x['val_loss']) for x in records(run, 'eval')] == [(x['step'], x['val_loss']) for x in records(ref, 'eval')]
    assert same_tensors(load_file(run/'final'/'adapter'/'adapter_model.safetensors'), load_file(ref/'final'/'adapter'/'adapter_model.safetensors'))
    assert same_tensors(load_file(run/'final'/'model.safetensors'), load_file(ref/'final'/'model.safetensors'))
    assert len(records(run, 'resume')) == len(kills)


@pytest.mark.slow
def test_lora_run_resumes_with_optimizer_and_schedule_not_just_adapter(tmp_path, cache_dir, code_dir, bases):
    cfg = load_config(write_config(tmp_path, code_dir, bases['llama'], 'lora', steps=24, eval_every=12, ckpt_every=6))
    train(cfg, tmp_path/'ref', progress=False)
    with pytest.raises(RunInterrupted): train(cfg, tmp_path/'run', progress=False, callbacks=[StopAfter(9)])

    ck = tmp_path/'run'/'checkpoints'/'step-00000009'
    opt = torch.load(ck/'optimizer.pt', weights_only=True)
    n_adapter = len(load_file(ck/'adapter_model.safetensors'))
    assert len(opt['state']) == n_adapter  # moments for exactly the adapter tensors: nothing frozen reached the optimizer
    assert all(s['exp_avg_sq'].abs().sum() > 0 for s in opt['state'].values())
    assert torch.load(ck/'scheduler.pt', weights_only=True)['last_epoch'] == 9
    ck = Path(shutil.copytree(ck, tmp_path/'step-9'))  # retention removes it once the run goes on

    assert train(cfg, tmp_path/'run', progress=False)['status'] == 'completed'
    lrs = lambda r: {x['step']: (x['lr'], x['loss']) for x in records(r, 'train')}
    assert lrs(tmp_path/'run') == lrs(tmp_path/'ref')  # same schedule position, same losses after the resume
    assert same_tensors(load_file(tmp_path/'run'/'final'/'adapter'/'adapter_model.safetensors'),
                        load_file(tmp_path/'ref'/'final'/'adapter'/'adapter_model.safetensors'))

    # the control: resuming the adapter (and schedule, RNG, data position) with fresh optimizer moments, as an
    # adapter-only resume does, does not continue the same run, so the comparison above can fail
    prepared, resolved, _ = plan_run(cfg, RunDir(tmp_path/'x'), progress=False)
    learn = build_learner(resolved, prepared, RunDir(tmp_path/'x'), progress=False)
    st = load_checkpoint(ck, learn.model, None, learn.sched)
    learn.state.step, learn.state.samples_seen = st.step, st.samples_seen
    learn.fit()
    mine = {k: v.contiguous() for k, v in get_peft_model_state_dict(learn.model).items()}
    assert not same_tensors(mine, load_file(tmp_path/'ref'/'checkpoints'/'step-00000024'/'adapter_model.safetensors'))
    assert same_tensors(load_file(tmp_path/'run'/'checkpoints'/'step-00000024'/'adapter_model.safetensors'),
                        load_file(tmp_path/'ref'/'checkpoints'/'step-00000024'/'adapter_model.safetensors'))


@pytest.mark.slow
@pytest.mark.parametrize('method', ['lora', 'qlora'])
def test_merged_model_logits_match_adapter_model(finetuned, method):
    """Tolerance 1e-4 (absolute, logits of order 1-10): the merged model computes x(W + BA) where the adapter model computes
    xW + (xA)B, the same fp32 numbers summed in another order. A QLoRA adapter is merged into the dequantized 4-bit weights it
    was trained against, which equal what the 4-bit layers compute with (bitsandbytes' fp32 path), so QLoRA meets the same bound."""
    cfg, run = finetuned[method]
    ev = json.loads((run/'final'/'evaluation.json').read_text())
    assert ev['method'] == method and ev['merge_max_abs_logit_diff'] < 1e-4, ev
    merged = AutoModelForCausalLM.from_pretrained(run/'final').eval()
    adapter = PeftModel.from_pretrained(load_base(cfg.model, cfg.finetune), run/'final'/'adapter').eval()
    x = torch.randint(0, merged.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): diff = (merged(input_ids=x).logits - adapter(input_ids=x).logits).abs().max().item()
    assert diff < 1e-4, diff
    if method == 'qlora':  # the wrong merge (into the original fp32 base) is measurably worse: the check can fail
        wrong = PeftModel.from_pretrained(load_base(cfg.model, cfg.finetune, quantized=False), run/'final'/'adapter').merge_and_unload().eval()
        with torch.no_grad(): assert (wrong(input_ids=x).logits - adapter(input_ids=x).logits).abs().max().item() > 100 * max(diff, 1e-6)


@pytest.mark.slow
def test_final_adapter_and_merged_model_load_with_peft_and_auto_classes(finetuned):
    cfg, run = finetuned['qlora']
    merged, tok = AutoModelForCausalLM.from_pretrained(run/'final'), AutoTokenizer.from_pretrained(run/'final')
    assert type(merged).__name__ == 'Starcoder2ForCausalLM' and getattr(merged.config, 'quantization_config', None) is None
    assert all(p.dtype == torch.float32 for p in merged.parameters())  # plain weights: dequantized and merged
    acfg = json.loads((run/'final'/'adapter'/'adapter_config.json').read_text())
    assert Path(acfg['base_model_name_or_path']) == Path(cfg.model.pretrained) and acfg['peft_type'] == 'LORA'
    assert set(acfg['target_modules']) == {'q_proj', 'k_proj', 'v_proj', 'o_proj', 'c_fc', 'c_proj'}  # StarCoder2's MLP included
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(acfg['base_model_name_or_path']), run/'final'/'adapter')
    ids = tok('def add(a, b):', return_tensors='pt').input_ids
    assert peft(input_ids=ids).logits.shape[-1] == merged.config.vocab_size
    # the best checkpoint is what final/ holds
    st = json.loads((run/'state.json').read_text())
    best = load_file(run/'checkpoints'/f"step-{st['best_step']:08d}"/'adapter_model.safetensors')
    assert same_tensors(best, load_file(run/'final'/'adapter'/'adapter_model.safetensors'))


def test_target_module_that_matches_nothing_is_an_error_naming_it(tmp_path, cache_dir, code_dir, bases):
    cfg = write_config(tmp_path, code_dir, bases['starcoder2'], 'lora', extra='')
    res = foundry_here('train', cfg, '--run-dir', tmp_path/'run', '--set', 'finetune.target_modules=[q_proj, gate_proj]')
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "finetune.target_modules: 'gate_proj' matches no module of this starcoder2 model" in last and 'c_fc' in last, last
    assert 'Traceback' not in res.stderr
    assert not (tmp_path/'run'/'checkpoints').exists()


def test_4bit_trainable_and_total_parameter_counts_equal_the_fp32_model_counts(code_dir, bases):
    m = ModelConfig(init='pretrained', pretrained=str(bases['starcoder2']))
    cfg = lambda method: ExperimentConfig(model=m, finetune=FinetuneConfig(method=method, lora_r=4), data=DataConfig(max_sequence_length=64))
    fp32, q4 = finetune_model(cfg('lora')), finetune_model(cfg('qlora'))
    r32, r4 = parameter_report(fp32, cfg('lora').finetune), parameter_report(q4, cfg('qlora').finetune)
    assert (r4['trainable'], r4['total']) == (r32['trainable'], r32['total'])
    assert sum(p.numel() for p in q4.parameters()) < r4['total']  # numel() of packed 4-bit weights undercounts: the trap we avoid
    plain = AutoModelForCausalLM.from_pretrained(bases['starcoder2'])
    assert r32['total'] == sum(p.numel() for p in plain.parameters()) + r32['trainable']
    s = r4['size_bytes']
    assert s['fp32'] > s['bf16'] > s['int8'] > s['4bit'] and 0.13 < s['4bit'] / s['fp32'] < 0.3
    assert 'uint8' in r4['bytes_by_dtype'] and 'uint8' not in r32['bytes_by_dtype']


def test_prompt_tokens_do_not_count_in_the_loss(tmp_path, cache_dir, bases):
    rows = [dict(prompt=f'# add {i} and {i + 2}\n', completion=f'print({i} + {i + 2})\n') for i in range(30)]
    (tmp_path/'qa.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    data = DataConfig(source_corpus=str(tmp_path/'qa.jsonl'), prompt_field='prompt', completion_field='completion', max_sequence_length=64,
                      val_fraction=0.2)
    prep = prepare_data(data, TokenizerConfig(kind='pretrained', path=str(bases['starcoder2'])))
    tok = prep.tokenizer
    x, y, pos = split_blocks(prep, 'train', data, shuffle=False).rows(np.arange(3))
    counted = tok.decode(y[y != IGNORE].tolist())
    assert '# add' not in counted and 'print(' in counted  # only completions (and their EOS) are targets
    assert counted.count(tok.eos_token) == counted.count('print(')
    # the loss is the mean over completion tokens alone: changing the prompts' targets changes nothing
    model = AutoModelForCausalLM.from_pretrained(bases['starcoder2'])
    y2 = y.clone(); y2[y == IGNORE] = 7
    full = lm_loss(model, x, y2, pos)
    assert not torch.isclose(full, lm_loss(model, x, y, pos))  # the control: counting prompts would change the loss
    logits = model(input_ids=x, position_ids=pos, use_cache=False).logits  # as lm_loss calls it
    by_hand = torch.nn.functional.cross_entropy(logits[y != IGNORE], y[y != IGNORE])
    assert torch.allclose(lm_loss(model, x, y, pos), by_hand, atol=1e-6)


@pytest.mark.parametrize('arch', ['gpt2', 'llama', 'starcoder2'])
def test_packed_samples_do_not_attend_to_each_other(bases, arch):
    model = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
    V = model.config.vocab_size
    a1, a2, b = (torch.randint(5, V, (n,), generator=torch.Generator().manual_seed(s)) for n, s in ((20, 1), (20, 2), (30, 3)))
    samples = lambda a: Samples(torch.cat([a, b]).numpy(), np.ones(50, np.uint8), np.array([0, 20, 50]))
    rows = [SampleBlocks(samples(a), 64, pad_id=0, shuffle=False).rows([0]) for a in (a1, a2)]
    assert rows[0][0].shape == (1, 64) and rows[0][2][0, 20] == 0  # one row, B restarts at position 0
    # called as training calls it (lm_loss): no attention mask and no cache, so transformers reads the restarting
    # position ids as separate sequences (with a cache, as generation uses, it does not look)
    with torch.no_grad():
        la, lb = (model(input_ids=x, position_ids=p, use_cache=False).logits for x, _, p in rows)
        assert torch.allclose(la[0, 20:50], lb[0, 20:50], atol=1e-5)  # sample B is blind to sample A
        assert not torch.allclose(la[0, :20], lb[0, :20], atol=1e-3)
        # the control: with an all-ones attention mask (what collators pass) B does see A
        ones = [model(input_ids=x, position_ids=p, attention_mask=torch.ones_like(x), use_cache=False).logits for x, _, p in rows]
        assert not torch.allclose(ones[0][0, 20:50], ones[1][0, 20:50], atol=1e-3)


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=0, max_size=200), seed=st.integers(0, 2**32 - 1), spm=st.booleans())
def test_fim_transform_keeps_every_character_once(text, seed, spm):
    ps = fim_pieces(text, np.random.default_rng(seed), spm)
    assert [p for p in ps if not isinstance(p, str)] == [PREFIX, SUFFIX, MIDDLE]
    body = [p for p in ps if isinstance(p, str)]
    assert sum(map(len, body)) == len(text)
    prefix_middle, suffix = (body[1], body[0]) if spm else (body[0] + body[2], body[1])
    assert prefix_middle + suffix == text


def test_fim_tokens_keep_every_character_once(bases, code_dir):
    tok = AutoTokenizer.from_pretrained(bases['starcoder2'])
    recs = [dict(text=p.read_text()) for p in sorted(code_dir.iterdir())]
    sm = tokenize_samples(recs, tok, DataConfig(fim_rate=1.0, fim_spm_rate=0.5))
    P, S, M = (tok.convert_tokens_to_ids(t) for t in ('<fim_prefix>', '<fim_suffix>', '<fim_middle>'))
    orders = set()
    for i, r in enumerate(recs):
        ids = sm.tokens[sm.offsets[i]:sm.offsets[i + 1]].tolist()
        assert ids[-1] == tok.eos_token_id and [t for t in ids if t in (P, S, M)] == [P, S, M]  # PSM and SPM both
        spm = ids[1] == S
        orders.add(spm)
        cut = lambda a, b: tok.decode(ids[ids.index(a) + 1:ids.index(b)] if b is not None else ids[ids.index(a) + 1:-1])
        if spm: text = cut(M, None) + cut(S, M)
        else: text = cut(P, S) + cut(M, None) + cut(S, M)
        assert sorted(text) == sorted(r['text']) and text == r['text']
    assert orders == {True, False}  # both PSM and SPM occur at fim_spm_rate 0.5


def test_jsonl_parquet_and_saved_dataset_sources_give_the_same_blocks(tmp_path, cache_dir, bases):
    import datasets
    rows = [dict(prompt=f'Q{i}: what is {i} squared?\n', completion=f'A: {i * i}\n', text=f'x = {i} ** 2\n') for i in range(40)]
    ds = datasets.Dataset.from_list(rows)
    (tmp_path/'r.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    ds.to_parquet(str(tmp_path/'r.parquet'))
    ds.save_to_disk(str(tmp_path/'saved'))
    tok = TokenizerConfig(kind='pretrained', path=str(bases['llama']))
    for fields in (dict(prompt_field='prompt', completion_field='completion'), dict(text_field='text')):
        got = []
        for src in ('r.jsonl', 'r.parquet', 'saved'):
            data = DataConfig(source_corpus=str(tmp_path/src), max_sequence_length=32, val_fraction=0.25, **fields)
            prep = prepare_data(data, tok)
            assert prep.meta['read_as'] == {'r.jsonl': 'jsonl', 'r.parquet': 'parquet', 'saved': 'dataset'}[src]
            got.append([split_blocks(prep, s, data, seed=1).rows(np.arange(6)) for s in ('train', 'val')])
        for other in got[1:]:
            for (x1, y1, p1), (x2, y2, p2) in zip(got[0], other): assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(p1, p2)


@pytest.mark.slow
def test_rust_suite_runs_on_a_finetuned_run(finetuned):
    cfg, run = finetuned['qlora']
    res = foundry_here('eval', run, '--suite', REPO/'suites'/'rust.yaml')
    assert res.returncode == 0, res.stderr[-3000:]
    rep = json.loads((run/'report'/'report.json').read_text())
    suite = rep['suites'][0]
    assert suite['suite'] == 'rust' and len(suite['results']) == 5 and 0 <= suite['summary']['pass_rate'] <= 1
    assert rep['validation']['tokens'] > 0
    gen = foundry_here('generate', run, '--prompt', 'fn add(a: i32, b: i32) -> i32 {\n', '--max-new-tokens', '12', '--seed', '0')
    assert gen.returncode == 0 and gen.stdout.startswith('fn add('), gen.stderr[-2000:]


@pytest.mark.gpu
def test_qlora_bf16_on_cuda_reports_gpu_memory(tmp_path, cache_dir, code_dir, bases):
    if not torch.cuda.is_available(): pytest.skip('no CUDA device')
    cfg = load_config(write_config(tmp_path, code_dir, bases['starcoder2'], 'qlora', steps=20, eval_every=10, ckpt_every=10))
    cfg.training.device = 'cuda'
    assert train(cfg, tmp_path/'run', progress=False)['status'] == 'completed'
    last = records(tmp_path/'run', 'train')[-1]
    assert last['gpu_allocated_mb'] > 0 and last['gpu_reserved_mb'] >= last['gpu_allocated_mb'] and last['gpu_peak_allocated_mb'] > 0
    model = finetune_model(cfg, 'cuda')
    lin = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert type(lin).__name__ == 'Linear4bit' and lin.compute_dtype == torch.bfloat16
    ev = json.loads((tmp_path/'run'/'final'/'evaluation.json').read_text())
    print(f"GPU QLoRA bf16: {last['tokens_per_s']:.0f} tokens/s, allocated {last['gpu_allocated_mb']} MiB, reserved {last['gpu_reserved_mb']} MiB, "
          f"peak {last['gpu_peak_allocated_mb']} MiB; merge max |logit diff| {ev['merge_max_abs_logit_diff']:.3g}")
