"""Papermill job notebooks and sweeps, run for real: a kernel per job, real signals, real run directories."""
import csv, json, os, signal, subprocess, sys, time
from pathlib import Path

import psutil
import pytest

from conftest import FOUNDRY, REPO, foundry

PAPERMILL = Path(sys.executable).parent/'papermill'

TINY = """
experiment_name: tiny-job
random_seed: 3
data:
  source_corpus: {corpus}
  batch_size: 16
  max_sequence_length: 64
tokenizer:
  kind: char
model:
  layers: 2
  attention_heads: 4
  embedding_size: 64
training:
  train_steps: {steps}
  learning_rate: 3.0e-3
  warmup_steps: 20
  eval_interval: 100
  eval_batches: 5
"""


def outputs_text(nb: Path) -> str:
    "Everything a notebook's cells printed or displayed, as one string."
    cells = json.loads(nb.read_text())['cells']
    parts = []
    for c in cells:
        for o in c.get('outputs', []):
            parts.append(''.join(o.get('text', '')))
            parts += [''.join(v) if isinstance(v, list) else str(v) for k, v in o.get('data', {}).items() if k.startswith('text/')]
            if 'image/png' in o.get('data', {}): parts.append('<image/png>')
    return '\n'.join(parts)


def kill_tree(proc: subprocess.Popen):
    "SIGKILL a process and every process it started (the papermill kernel among them): a crash, not a shutdown."
    p = psutil.Process(proc.pid)
    for q in [*p.children(recursive=True), p]:
        try: q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    proc.wait(timeout=30)


def start(args, cwd) -> subprocess.Popen:
    "Start a command with this session's thread count, output captured."
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))
    return subprocess.Popen(list(map(str, args)), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120):
    "Wait until checkpoint `step` of `run` is complete, failing if `proc` ends first."
    done, t0 = run/'checkpoints'/f'step-{step:08d}'/'COMPLETE', time.time()
    while not done.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < timeout, f'no step-{step} checkpoint within {timeout} s'
        time.sleep(0.02)


@pytest.mark.slow
def test_papermill_job_resumes_after_kill_then_skips_when_complete(tmp_path, cache_dir, shakespeare):
    "Slow because it is three jobs, each a kernel (~10 s to start): killed, resumed to completion, then the evaluation job."
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(TINY.format(corpus=shakespeare, steps=600))
    run = tmp_path/'run'

    # 1. papermill itself runs the job notebook, as the README shows; killed (SIGKILL, kernel included)
    #    once the step-100 checkpoint is complete
    run.mkdir()  # papermill writes only into an existing folder
    proc = start([PAPERMILL, REPO/'jobs'/'train.ipynb', run/'train.ipynb', '-p', 'config', cfg, '-p', 'run_dir', run], tmp_path)
    wait_for_checkpoint(run, 100, proc)
    kill_tree(proc)
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'running', state  # a crash: nobody got to write another status
    assert (run/'train.ipynb').is_file()        # papermill saved the notebook up to the running cell

    # 2. the same job started again resumes from a checkpoint, keeps the first attempt's notebook, completes
    res = foundry('job', 'train', cfg, '--run-dir', run, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'completed' and state['step'] == 600 and state['resumed_from'].startswith('step-'), state
    evals = [r['step'] for r in map(json.loads, (run/'metrics.jsonl').read_text().splitlines()) if r['type'] == 'eval']
    assert evals == [100, 200, 300, 400, 500, 600]  # nothing lost, nothing counted twice
    assert (run/'train.attempt-1.ipynb').is_file()
    lab = outputs_text(run/'train.ipynb')
    assert f"resuming {run} from {state['resumed_from']}" in lab and 'step 600/600: loss' in lab
    assert '<image/png>' in lab and '**sample 1**' in lab and '| validation split |' in lab  # plots, samples, evaluation
    assert 'lab notebook' in res.stdout

    # 3. on the completed run the job trains nothing and leaves the lab notebook alone
    before = (run/'train.ipynb').stat().st_mtime_ns
    again = foundry('job', 'train', cfg, '--run-dir', run, cwd=tmp_path)
    assert again.returncode == 0 and 'already completed' in again.stderr, again.stderr[-2000:]
    assert (run/'train.ipynb').stat().st_mtime_ns == before
    assert sorted(p.name for p in run.glob('train*.ipynb')) == ['train.attempt-1.ipynb', 'train.ipynb']

    # 4. the evaluation job writes the report and its own lab notebook
    ev = foundry('job', 'evaluate', run, '--suite', REPO/'suites'/'python.yaml', cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = json.loads((run/'report'/'report.json').read_text())
    assert report['suites'][0]['suite'] == 'python' and report['validation']['tokens'] > 0
    assert 'Suite python' in outputs_text(run/'evaluate.ipynb')


@pytest.mark.slow
def test_sigterm_to_a_job_stops_its_run_at_a_checkpoint_and_the_job_resumes_there(tmp_path, cache_dir, shakespeare):
    "Slow because the signal must reach a kernel that is training: a job is started, stopped by SIGTERM after a checkpoint, and started again."
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(TINY.format(corpus=shakespeare, steps=500))
    run = tmp_path/'run'
    proc = start([FOUNDRY, 'job', 'train', cfg, '--run-dir', run], tmp_path)
    wait_for_checkpoint(run, 100, proc)
    proc.send_signal(signal.SIGTERM)  # to the foundry process only, as a scheduler does: the kernel is in its own group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    state = json.loads((run/'state.json').read_text())
    step = state['step']
    assert state['status'] == 'interrupted' and 100 <= step < 500, state
    assert (run/'checkpoints'/f'step-{step:08d}'/'COMPLETE').is_file()  # the step it stopped at was checkpointed
    # the kernel got the stop as its interrupt (SIGINT), so the run stopped as `foundry train` does
    # (during the short update the step finishes; during its long backward pass it is dropped and the step before is checkpointed)
    said = outputs_text(run/'train.ipynb')
    # where the signal lands decides the words, each naming the step the run stopped at: inside the step's update (it finishes),
    # between two steps (while one is checkpointed or logged), or inside its backward pass (dropped: the step before is kept)
    assert f'interrupted at step {step}' in out and any(f'SIGINT received: {m}' in said for m in (
        f'finishing step {step}', f'stopping after step {step}', f'stopping now, checkpointing step {step}')), said[-2000:]

    res = foundry('job', 'train', cfg, '--run-dir', run, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    state = json.loads((run/'state.json').read_text())
    assert state['status'] == 'completed' and state['resumed_from'] == f'step-{step:08d}', state


@pytest.mark.slow
def test_job_with_a_bad_override_fails_in_one_line_before_writing_anything(tmp_path, shakespeare):
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(TINY.format(corpus=shakespeare, steps=100))
    res = foundry('job', 'train', cfg, '--run-dir', tmp_path/'run', '--set', 'training.learning_rate=-1')
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and 'training.learning_rate' in res.stderr, res.stderr
    assert not (tmp_path/'run').exists()


@pytest.mark.slow
def test_sweep_2x2_skips_the_finished_run_and_ranks_all_four(tmp_path, cache_dir, shakespeare):
    "Slow because a sweep point is a papermill job: four kernels, each importing torch and transformers, each training 100 steps."
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(TINY.format(corpus=shakespeare, steps=100).replace('eval_interval: 100', 'eval_interval: 50'))
    sweep_dir = tmp_path/'sweep'
    t0 = time.time()

    # one point run on its own first, the way a W&B agent runs it (one value per key, as arguments)
    one = foundry('sweep', cfg, 'training.learning_rate=3e-3', 'model.layers=1', '--sweep-dir', sweep_dir, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    done = sweep_dir/'learning_rate=3e-3_layers=1'
    assert json.loads((done/'state.json').read_text())['status'] == 'completed'
    stamp = {p.name: p.stat().st_mtime_ns for p in (done/'train.ipynb', done/'metrics.jsonl', done/'state.json')}
    t1 = time.time()

    res = foundry('sweep', cfg, '--sweep-dir', sweep_dir, '--grid', 'training.learning_rate=3e-3,1e-4', '--grid', 'model.layers=1,2', cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    t2 = time.time()
    print(f'sweep test: one-point run {t1 - t0:.1f} s, 2x2 sweep with one run skipped {t2 - t1:.1f} s')

    # the finished run was skipped, untouched; the other three were trained
    assert f'run {done} is already completed' in res.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (done/'train.ipynb', done/'metrics.jsonl', done/'state.json')} == stamp
    names = ['learning_rate=3e-3_layers=1', 'learning_rate=3e-3_layers=2', 'learning_rate=1e-4_layers=1', 'learning_rate=1e-4_layers=2']
    for n in names:
        st = json.loads((sweep_dir/n/'state.json').read_text())
        assert st['status'] == 'completed' and st['step'] == 100, (n, st)
        assert (sweep_dir/n/'train.ipynb').is_file() and (sweep_dir/n/'final'/'config.json').is_file()
    cfg_of = lambda n: (sweep_dir/n/'config.yaml').read_text()
    assert 'n_layer' not in cfg_of(names[1]) and 'layers: 2' in cfg_of(names[1]) and 'learning_rate: 0.0001' in cfg_of(names[2])

    # the summary ranks all four by best val loss, in CSV, markdown and a plot
    rows = list(csv.DictReader(open(sweep_dir/'summary.csv')))
    assert sorted(r['run'] for r in rows) == sorted(names)
    losses = [float(r['best_val_loss']) for r in rows]
    assert losses == sorted(losses)
    best = {n: json.loads((sweep_dir/n/'state.json').read_text())['best_val_loss'] for n in names}
    assert rows[0]['run'] == min(best, key=best.get)
    assert rows[-1]['run'].startswith('learning_rate=1e-4')  # 100 steps at 1e-4 learn least
    md = (sweep_dir/'summary.md').read_text()
    assert md.index(rows[0]['run']) < md.index(rows[-1]['run']) and '![val loss of each run](summary.png)' in md
    assert (sweep_dir/'summary.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # the same sweep with a changed --set would mix configs in the finished runs: refused before anything runs
    before = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob('*') if p.is_file()}
    changed = foundry('sweep', cfg, '--sweep-dir', sweep_dir, '--grid', 'training.learning_rate=3e-3,1e-4', '--grid', 'model.layers=1,2',
                      '--set', 'training.warmup_steps=5', cwd=tmp_path)
    assert changed.returncode == 2 and 'different config' in changed.stderr and len(changed.stderr.strip().splitlines()) == 1, changed.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob('*') if p.is_file()} == before
    assert f"\n  1. {rows[0]['run']}: " in res.stdout and f"\n  4. {rows[-1]['run']}: " in res.stdout  # the ranking, printed last


@pytest.mark.slow
def test_sweep_point_that_fails_is_retried_and_reported(tmp_path, cache_dir, shakespeare):
    "Slow because the retry is real: a job's kernel is SIGKILLed mid-run and the sweep starts a new kernel that resumes it."
    cfg = tmp_path/'tiny.yaml'
    cfg.write_text(TINY.format(corpus=shakespeare, steps=150).replace('eval_interval: 100', 'eval_interval: 50'))
    sweep_dir = tmp_path/'sweep'
    proc = start([FOUNDRY, 'sweep', cfg, 'training.learning_rate=3e-3', '--sweep-dir', sweep_dir, '--retries', '2',
                  '--retry-backoff', '0.5'], tmp_path)
    run = sweep_dir/'learning_rate=3e-3'
    wait_for_checkpoint(run, 50, proc)
    # the job's kernel dies, as it does when the machine runs out of memory (SIGKILL: a real crash, no clean-up)
    kernels = [p for p in psutil.Process(proc.pid).children(recursive=True) if 'ipykernel' in ' '.join(p.cmdline())]
    assert len(kernels) == 1, [p.cmdline() for p in psutil.Process(proc.pid).children(recursive=True)]
    kernels[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert 'failed (attempt 1 of 3: JobFailed' in out and 'trying again in 0.5 s, from its last checkpoint' in out, out[-3000:]
    st = json.loads((run/'state.json').read_text())
    assert st['status'] == 'completed' and st['step'] == 150 and st['resumed_from'].startswith('step-'), st
    recs = [json.loads(l) for l in (run/'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in recs if r['type'] == 'eval'] == [50, 100, 150]  # a retry costs the lost steps only
    attempts = [json.loads(l) for l in (run/'attempts.jsonl').read_text().splitlines()]
    assert [(a['attempt'], a['ok']) for a in attempts] == [(1, False), (2, True)] and 'kernel died' in attempts[0]['error']
    row = next(csv.DictReader(open(sweep_dir/'summary.csv')))
    assert (row['status'], row['failed_attempts'], row['retries']) == ('completed', '1', '1'), row
    assert '| failed_attempts | retries |' in (sweep_dir/'summary.md').read_text()
    assert '1 failed attempt(s), 1 retried' in out.splitlines()[-2]
    assert (run/'train.attempt-1.ipynb').is_file()  # the failed attempt's lab notebook is kept
