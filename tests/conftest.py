"""Shared fixtures: an isolated cache, the tiny Shakespeare corpus, and helpers to run `foundry` and wait on it."""
import os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

pytest_plugins = ['skip_policy']  # a skip for any reason but a missing GPU or browser fails the session

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO/'data'/'tinyshakespeare'/'input.txt'  # ships with the repository
FOUNDRY = Path(sys.executable).parent/'foundry'


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    "A private FOUNDRY_CACHE, for this process and the subprocesses it starts."
    d = tmp_path/'cache'
    monkeypatch.setenv('FOUNDRY_CACHE', str(d))
    return d


@pytest.fixture
def shakespeare():
    assert SHAKESPEARE.is_file(), f'tiny Shakespeare is part of the repository: {SHAKESPEARE} is missing'
    return SHAKESPEARE


def copy_fixture_run(src: Path, dest: Path) -> Path:
    "A committed run directory, copied into `dest`; its config pointed at this clone's tests/data/tiny.txt (a path, not the data, changes)."
    run = Path(dest)/Path(src).name
    shutil.copytree(src, run)
    text = (run/'config.yaml').read_text()
    old = next(l for l in text.splitlines() if l.strip().startswith('source_corpus:'))
    (run/'config.yaml').write_text(text.replace(old, f"  source_corpus: {REPO/'tests'/'data'/'tiny.txt'}"))
    return run


def foundry(*args, cwd=None, timeout=600, env=None):
    "Run the real `foundry` command in a subprocess; returns the CompletedProcess."
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'), **(env or {}))
    return subprocess.run([str(FOUNDRY), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=e)


def start_train(cfg, run) -> subprocess.Popen:
    "Start `foundry train CFG --run-dir RUN` in the background, output captured, with the thread count `foundry()` uses."
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'))  # the thread count changes float sums
    return subprocess.Popen([str(FOUNDRY), 'train', str(cfg), '--run-dir', str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def wait_until(cond, timeout=120, every=0.0005) -> bool:
    "Poll `cond` until it holds (True) or `timeout` seconds pass (False)."
    t = time.time() + timeout
    while time.time() < t:
        if cond(): return True
        time.sleep(every)
    return False


def model_tensors(path) -> dict:
    "The tensors of a checkpoint or a saved model (model.safetensors); tied embeddings under one name (each format keeps a different one)."
    from safetensors.torch import load_file
    w = load_file(str(Path(path)/'model.safetensors'))
    if 'lm_head.weight' in w and 'transformer.wte.weight' not in w: w['transformer.wte.weight'] = w.pop('lm_head.weight')
    return w


def assert_resumed_as_one_go(resumed, one_go, fixture_ck, one_go_ck, tol=1e-4) -> str:
    """A run resumed from a committed fixture's checkpoint `fixture_ck` ends as today's code trained in one go (`one_go`):
    bit for bit where this CPU rounds as the fixture's did (today's run reproduced `fixture_ck` exactly, as `one_go_ck`), else
    within `tol`. Kernels for other vector instructions (AVX2 against AVX-512) round float sums differently, so a fixture
    made on one CPU cannot be reproduced bit for bit on another; the bit-exact resume itself is proven by the kill tests,
    which compare two runs made on the same machine. Returns which comparison was made."""
    import torch
    a, b = model_tensors(resumed), model_tensors(one_go)
    assert a.keys() == b.keys()
    fa, fb = model_tensors(fixture_ck), model_tensors(one_go_ck)
    if all(torch.equal(fa[k], fb[k]) for k in fa):
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f'this CPU reproduced the fixture bit for bit, but the resumed run differs in {differ}'
        return 'bit for bit'
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, f'the resumed run is {worst:.3g} from the one-go run (at most {tol} on a CPU that rounds differently)'
    return f'within {worst:.1e} (this CPU rounds differently from the one that made the fixture)'

