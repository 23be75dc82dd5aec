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
