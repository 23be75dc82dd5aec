"""The run lifecycle with real processes, real signals and real files: crash-safe checkpoints,
bit-exact resume, fallback past corrupt checkpoints, preemption, early stopping, retention and the
non-finite guard."""
import json, os, random, signal, time
from pathlib import Path

import pytest
import torch

from conftest import foundry_here, model_tensors, start_train, wait_until
from model_foundry.checkpointing import list_checkpoints, read_trainer_state
from model_foundry.config import load_config
from model_foundry.fixtures import DegradeAfter, InjectNaN, StopAfter
from model_foundry.loop import Callback, TrainingError, training_forward
from model_foundry.run import train

TINY = """
experiment_name: lifecycle
random_seed: 3
data:
  source_corpus: {corpus}
  batch_size: {batch}
  max_sequence_length: {ctx}
tokenizer:
  kind: char
model:
  layers: 2
  attention_heads: 4
  embedding_size: {width}
  dropout: {dropout}          # dropout draws from the RNG: resuming must restore it
training:
  train_steps: {steps}
  learning_rate: 3.0e-3
  warmup_steps: 10
  eval_interval: {eval_every}
  eval_batches: 4
  checkpoint_interval: {ckpt_every}
  keep_checkpoints: {keep}
  log_interval: 1
{extra}"""


def write_config(tmp_path, corpus, name='c.yaml', batch=8, ctx=32, width=64, steps=120, eval_every=40, ckpt_every=10, keep=2, extra='',
                 dropout=0.1):
    p = tmp_path/name
    p.write_text(TINY.format(corpus=corpus, batch=batch, ctx=ctx, width=width, steps=steps, eval_every=eval_every,
                             ckpt_every=ckpt_every, keep=keep, extra=extra, dropout=dropout))
    return p


def records(run, kind=None):
    f = Path(run)/'metrics.jsonl'
    recs = [json.loads(l) for l in f.read_text().split('\n')[:-1]] if f.is_file() else []  # the last piece: a line being written
    return [r for r in recs if kind is None or r['type'] == kind]


def assert_same_weights(a, b):
    wa, wb = model_tensors(a), model_tensors(b)
    assert wa.keys() == wb.keys()
    for k in wa: assert torch.equal(wa[k], wb[k]), k


def running(run, pid=None):
    "The run is marked running (by process `pid`, when given: a killed trainer leaves its own 'running' behind)."
    try: st = json.loads((Path(run)/'state.json').read_text())
    except (OSError, ValueError): return False
    return st.get('status') == 'running' and (pid is None or st.get('pid') == pid)


def mid_write(ck: Path, pid=None) -> bool:
    "A checkpoint write is in progress: a temporary directory (of process `pid`, when given), or a step directory without COMPLETE."
    if not ck.is_dir(): return False
    tmp = lambda p: p.name.startswith('.tmp-') and (pid is None or p.name.endswith(f'-{pid}'))  # not one a killed trainer left
    return any(tmp(p) or (p.name.startswith('step-') and not (p/'COMPLETE').exists()) for p in ck.iterdir())


def kill_during_checkpoint_write(proc, run) -> bool:
    "Freeze the process with SIGSTOP the moment a checkpoint write is seen, and SIGKILL it if still mid-write."
    ck = Path(run)/'checkpoints'
    while proc.poll() is None:
        if not wait_until(lambda: mid_write(ck, proc.pid) or proc.poll() is not None, timeout=60, every=0): break
        if proc.poll() is not None: break
        proc.send_signal(signal.SIGSTOP)
        if mid_write(ck, proc.pid):
            proc.kill(); proc.wait()
            return True
        proc.send_signal(signal.SIGCONT)  # the write had just finished: try the next one
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_training_resumes_from_latest_checkpoint_after_interruption(tmp_path, cache_dir, shakespeare):
    "Slow because it kills real trainers up to six times (at random moments and in the middle of checkpoint writes), each a new process."
    cfg = write_config(tmp_path, shakespeare, steps=300)
    ref = tmp_path/'uninterrupted'
    assert foundry_here('train', cfg, '--run-dir', ref).returncode == 0

    run, rng = tmp_path/'interrupted', random.Random(0)
    kills, mid_write_kills = [], 0
    for attempt in range(6):
        proc = start_train(cfg, run)
        assert wait_until(lambda: running(run, proc.pid) or proc.poll() is not None, timeout=120)  # this trainer, past its start-up
        if attempt % 2 == 0:  # a kill at a random moment of training: once this trainer has taken a step
            done = len(records(run, 'train')) if (run/'metrics.jsonl').exists() else 0
            wait_until(lambda: (run/'metrics.jsonl').exists() and len(records(run, 'train')) > done or proc.poll() is not None, timeout=120)
            time.sleep(rng.uniform(0.05, 0.8))
            if proc.poll() is None: proc.kill(); proc.wait(); kills.append('random')
        elif kill_during_checkpoint_write(proc, run):
            kills.append('mid-write'); mid_write_kills += 1
        if proc.poll() is not None and proc.returncode == 0: break
    assert len(kills) >= 3 and mid_write_kills >= 1, kills

    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run/'state.json').read_text())['status'] == 'completed'

    # every resume continued at the checkpoint's step + 1
    recs = records(run)
    resumes = [i for i, r in enumerate(recs) if r['type'] == 'resume']
    assert resumes, 'no resume was recorded'
    for i in resumes:
        nxt = next(r for r in recs[i + 1:] if r['type'] == 'train')
        assert nxt['step'] == recs[i]['step'] + 1, (recs[i], nxt)

    # the same loss at every step, the same evaluations, and the same final weights, bit for bit
    loss = lambda r: {x['step']: x['loss'] for x in records(r, 'train')}
    assert loss(run) == loss(ref)
    assert [(x['step'], x['val_loss']) for x in records(run, 'eval')] == [(x['step'], x['val_loss']) for x in records(ref, 'eval')]
    assert_same_weights(run/'checkpoints'/'step-00000300', ref/'checkpoints'/'step-00000300')
    assert_same_weights(run/'final', ref/'final')
    print(f'kill points: {kills}')


@pytest.mark.slow
@pytest.mark.parametrize('sig,code', [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_writes_checkpoint_and_resume_continues(tmp_path, cache_dir, shakespeare, sig, code):
    cfg = write_config(tmp_path, shakespeare, steps=400, ckpt_every=1000, eval_every=1000)
    run = tmp_path/'run'
    proc = start_train(cfg, run)
    assert wait_until(lambda: running(run) and len(records(run, 'train')) >= 5, timeout=120)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err[-2000:]
    assert 'received' in err and 'interrupted at step' in err
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'interrupted'
    (ck,) = list_checkpoints(run/'checkpoints')  # no scheduled checkpoint yet: this one was written on the signal
    stopped = read_trainer_state(ck).step
    assert stopped == state['step'] == records(run, 'train')[-1]['step'] < 400

    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f'continuing at step {stopped + 1}' in res.stderr
    assert [r['step'] for r in records(run, 'resume')] == [stopped]
    assert json.loads((run/'state.json').read_text())['status'] == 'completed' and (run/'final'/'config.json').is_file()


@pytest.mark.slow
def test_second_signal_exits_at_once(tmp_path, cache_dir, shakespeare):
    # steps of a few hundred milliseconds, so that the second signal arrives while the first step is unfinished
    cfg = write_config(tmp_path, shakespeare, batch=64, ctx=128, width=256, steps=400, ckpt_every=1000, eval_every=1000)
    run = tmp_path/'run'
    proc = start_train(cfg, run)
    assert wait_until(lambda: running(run) and len(records(run, 'train')) >= 2, timeout=120)
    proc.send_signal(signal.SIGTERM); time.sleep(0.02); proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM  # killed by the signal itself, no clean exit
    assert list_checkpoints(run/'checkpoints') == []


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, cache_dir, shakespeare):
    cfg = write_config(tmp_path, shakespeare, steps=40, ckpt_every=10, keep=3, eval_every=20)
    ref, run = tmp_path/'ref', tmp_path/'run'
    assert foundry_here('train', cfg, '--run-dir', ref).returncode == 0
    proc = start_train(cfg, run)
    assert wait_until(lambda: (run/'checkpoints'/'step-00000030'/'COMPLETE').exists(), timeout=120)
    proc.send_signal(signal.SIGSTOP); proc.kill(); proc.wait()  # a crash after step 30's checkpoint
    assert (run/'checkpoints'/'step-00000030'/'COMPLETE').is_file()
    # damage the newest checkpoint: a few bytes of the weights overwritten, as a failing disk would
    with open(run/'checkpoints'/'step-00000030'/'model.safetensors', 'r+b') as f:
        f.seek(-64, os.SEEK_END); f.write(os.urandom(64))
    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-2000:]
    assert 'step-00000030' in res.stderr and 'does not match its sha256' in res.stderr
    assert 'resuming' in res.stderr and 'from step-00000020: continuing at step 21' in res.stderr
    assert_same_weights(run/'checkpoints'/'step-00000040', ref/'checkpoints'/'step-00000040')
    assert_same_weights(run/'checkpoints'/'step-00000030', ref/'checkpoints'/'step-00000030')  # rewritten, intact


@pytest.mark.slow
def test_early_stopped_run_skips_training_on_resumption_attempt(tmp_path, cache_dir, shakespeare):
    # min_delta larger than any improvement after the first evaluations: patience runs out early
    cfg = write_config(tmp_path, shakespeare, steps=400, eval_every=20, ckpt_every=20,
                       extra='  early_stopping_patience: 2\n  early_stopping_min_delta: 0.3\n')
    run = tmp_path/'run'
    res = foundry_here('train', cfg, '--run-dir', run)
    assert res.returncode == 0, res.stderr[-2000:]
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'early_stopped' and state['step'] < 400
    assert 'early stopped' in res.stdout
    evals = records(run, 'eval')
    best = min(evals, key=lambda r: r['val_loss'])
    assert state['best_step'] == best['step']
    # the shipped model is the best checkpoint's, not the last step's
    assert_same_weights(run/'final', run/'checkpoints'/f"step-{best['step']:08d}")
    if best['step'] != state['step']:
        with pytest.raises(AssertionError): assert_same_weights(run/'final', run/'checkpoints'/f"step-{state['step']:08d}")

    before = (run/'metrics.jsonl').read_text()
    t0 = time.time()
    again = foundry_here('train', cfg, '--run-dir', run)
    assert again.returncode == 0 and 'already early stopped' in again.stderr
    assert (run/'metrics.jsonl').read_text() == before
    assert json.loads((run/'state.json').read_text())['status'] == 'early_stopped'
    print(f'second invocation took {time.time() - t0:.1f}s')


@pytest.mark.slow
def test_retention_keeps_best_and_last_n(tmp_path, cache_dir, shakespeare):
    cfg = load_config(write_config(tmp_path, shakespeare, steps=60, eval_every=10, ckpt_every=5, keep=2,
                                   extra='  log_spaced_checkpoints: 2\n'))
    state = train(cfg, tmp_path/'run', progress=False, callbacks=[DegradeAfter(20)])
    evals = records(tmp_path/'run', 'eval')
    assert state['best_step'] == 20 and min(evals, key=lambda r: r['val_loss'])['step'] == 20
    kept = [p.name for p in list_checkpoints(tmp_path/'run'/'checkpoints')]
    # log-spaced early ones (2, 3: below the interval of 5), the best (20), and the newest two (55, 60)
    assert kept == ['step-00000002', 'step-00000003', 'step-00000020', 'step-00000055', 'step-00000060'], kept
    assert_same_weights(tmp_path/'run'/'final', tmp_path/'run'/'checkpoints'/'step-00000020')


class Snapshot(Callback):
    "Keep a copy of the weights after each step."
    order = 70
    def __init__(self): self.after = {}
    def after_step(self):
        self.after[self.learn.state.step] = {k: v.clone() for k, v in self.learn.model.state_dict().items()}


@pytest.mark.slow
def test_nan_loss_step_is_skipped_and_counted(tmp_path, cache_dir, shakespeare):
    cfg = load_config(write_config(tmp_path, shakespeare, steps=20, eval_every=10, ckpt_every=10))
    snap = Snapshot()
    state = train(cfg, tmp_path/'run', progress=False, callbacks=[InjectNaN({7}), snap])
    assert state['status'] == 'completed'
    (bad,) = records(tmp_path/'run', 'nonfinite')
    assert bad['step'] == 7 and bad['total'] == 1 and bad['grad_norm'] == 'nan'
    assert all(torch.equal(snap.after[6][k], snap.after[7][k]) for k in snap.after[6])  # no update at step 7
    assert not all(torch.equal(snap.after[7][k], snap.after[8][k]) for k in snap.after[7])  # training went on
    assert all(torch.isfinite(v).all() for v in snap.after[20].values())
    assert read_trainer_state(tmp_path/'run'/'checkpoints'/'step-00000020').callbacks['NonFiniteGuard']['total'] == 1

    # K in a row with action 'stop': a clear failure, checkpoints kept, state failed
    stop = load_config(write_config(tmp_path, shakespeare, name='stop.yaml', steps=20, eval_every=10, ckpt_every=5,
                                    extra='  nonfinite_patience: 2\n  nonfinite_action: stop\n'))
    with pytest.raises(TrainingError, match='2 non-finite steps in a row'):
        train(stop, tmp_path/'stop', progress=False, callbacks=[InjectNaN({8, 9})])
    assert json.loads((tmp_path/'stop'/'state.json').read_text())['status'] == 'failed'
    assert [p.name for p in list_checkpoints(tmp_path/'stop'/'checkpoints')][-1] == 'step-00000009'


class OOMOnce(Callback):
    "Test-only fault: the model raises torch.OutOfMemoryError on its first large micro-batch (no GPU here to run out of)."
    def before_fit(self):
        learn = self.learn
        forward = training_forward(learn)  # what the step calls (GPT-2's lean forward here)
        def flaky(*a, **kw):
            if learn.micro_batch_size > 4: raise torch.OutOfMemoryError('CUDA out of memory (injected)')
            return forward(*a, **kw)
        learn.forward = flaky


@pytest.mark.slow
def test_out_of_memory_retries_with_half_micro_batch_and_same_effective_batch(tmp_path, cache_dir, shakespeare):
    # no dropout: its random masks would differ between one micro-batch of 8 and two of 4
    cfg = load_config(write_config(tmp_path, shakespeare, steps=10, eval_every=10, ckpt_every=10, dropout=0.0))
    state = train(cfg, tmp_path/'run', progress=False, callbacks=[OOMOnce()])
    assert state['status'] == 'completed'
    st = read_trainer_state(tmp_path/'run'/'checkpoints'/'step-00000010')
    assert st.samples_seen == 10 * 8  # the same samples per step: 8 = 2 micro-batches of 4
    ref = load_config(write_config(tmp_path, shakespeare, name='ref.yaml', steps=10, eval_every=10, ckpt_every=10, dropout=0.0))
    train(ref, tmp_path/'ref', progress=False)
    a = {r['step']: r['loss'] for r in records(tmp_path/'run', 'train')}
    b = {r['step']: r['loss'] for r in records(tmp_path/'ref', 'train')}
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)  # same batch, split differently


class CPUAllocatorFails(Callback):
    "Test-only fault: the CPU allocator's own error, raised from the model call (we cannot exhaust 24 GiB on demand)."
    def before_fit(self):
        def fail(*a, **kw): raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")
        self.learn.forward = fail  # what the step calls


@pytest.mark.slow
def test_out_of_memory_on_cpu_is_one_clear_error_and_the_run_is_marked_failed(tmp_path, cache_dir, shakespeare):
    cfg = load_config(write_config(tmp_path, shakespeare, steps=10, eval_every=10, ckpt_every=10))
    with pytest.raises(TrainingError, match='out of memory on CPU at step 1 with a micro-batch of 8: lower data.batch_size'):
        train(cfg, tmp_path/'run', progress=False, callbacks=[CPUAllocatorFails()])
    assert json.loads((tmp_path/'run'/'state.json').read_text())['status'] == 'failed'


@pytest.mark.slow
def test_metrics_line_torn_by_a_crash_is_dropped_on_resume(tmp_path, cache_dir, shakespeare):
    from model_foundry.run import RunInterrupted
    cfg = load_config(write_config(tmp_path, shakespeare, steps=30, eval_every=10, ckpt_every=10))
    with pytest.raises(RunInterrupted): train(cfg, tmp_path/'run', progress=False, callbacks=[StopAfter(20)])
    with open(tmp_path/'run'/'metrics.jsonl', 'a') as f: f.write('{"type": "train", "step": 21, "lo')  # a write cut by SIGKILL
    assert train(cfg, tmp_path/'run', progress=False)['status'] == 'completed'
    lines = (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()
    recs = [json.loads(l) for l in lines]  # every line parses
    assert [r['step'] for r in recs if r['type'] == 'train'] == list(range(1, 31))


class CrashAfterEvaluation(Callback):
    "Test-only fault: die right after step `n`'s evaluation and what reacts to it (a SIGKILL cannot be timed that exactly)."
    order = 31  # after CheckpointCallback
    def __init__(self, n): self.n = n
    def after_eval(self):
        if self.learn.state.step == self.n: raise KeyboardInterrupt('crash after evaluation (injected)')


@pytest.mark.slow
def test_checkpoint_at_an_evaluation_step_comes_after_that_steps_metrics(tmp_path, cache_dir, shakespeare):
    # a checkpoint of step 20 written before step 20's train line would resume at 21 with that line lost
    cfg = load_config(write_config(tmp_path, shakespeare, steps=30, eval_every=10, ckpt_every=100))
    with pytest.raises(KeyboardInterrupt): train(cfg, tmp_path/'run', progress=False, callbacks=[CrashAfterEvaluation(20)])
    assert train(cfg, tmp_path/'run', progress=False)['status'] == 'completed'
    assert [r['step'] for r in records(tmp_path/'run', 'train')] == list(range(1, 31))
    assert [r['step'] for r in records(tmp_path/'run', 'eval')] == [10, 20, 30]
