"""Shared fixtures: an isolated cache, the tiny Shakespeare corpus, and a helper to run `foundry`."""
import os, subprocess, sys
from pathlib import Path

import pytest
import torch

from model_foundry.loop import Callback

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO.parent/'shared'/'data'/'tinyshakespeare'/'input.txt'
FOUNDRY = Path(sys.executable).parent/'foundry'


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    "A private FOUNDRY_CACHE, for this process and the subprocesses it starts."
    d = tmp_path/'cache'
    monkeypatch.setenv('FOUNDRY_CACHE', str(d))
    return d


@pytest.fixture
def shakespeare():
    if not SHAKESPEARE.is_file(): pytest.skip(f'tiny Shakespeare not found at {SHAKESPEARE}')
    return SHAKESPEARE


def foundry(*args, cwd=None, timeout=600, env=None):
    "Run the real `foundry` command in a subprocess; returns the CompletedProcess."
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '2'), **(env or {}))
    return subprocess.run([str(FOUNDRY), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=e)


class DegradeAfter(Callback):
    "Test-only fault: after step `n`, add noise to the weights each step, so later evaluations get worse."
    order = 60
    def __init__(self, n): self.n = n
    def after_step(self):
        if self.learn.step > self.n:
            with torch.no_grad():
                for p in self.learn.model.parameters(): p.add_(torch.randn_like(p) * 0.05)


class InterruptAt(Callback):
    "Ask the run to stop after step `n` as SIGTERM would (the real signal path is tested in test_lifecycle)."
    order = 5
    def __init__(self, n): self.n = n
    def after_step(self):
        if self.learn.step == self.n: self.learn.stop_reason = 'interrupted'
