"""Shared fixtures: an isolated cache, the tiny Shakespeare corpus, and helpers to run `foundry` and wait on it."""
import os, shutil, subprocess, sys, time
from pathlib import Path

import pytest

pytest_plugins = ['skip_policy']  # a skip for any reason but a missing GPU or browser fails the session

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO/'data'/'tinyshakespeare'/'input.txt'  # ships with the repository
FOUNDRY = Path(sys.executable).parent/'foundry'


# The test files that take longest, longest first (seconds on CI's 2 cores, `--durations`): `make test` gives a file to each
# of its two pytest-xdist workers in collection order, so started first they do not run alone at the end.
LONGEST_FIRST = ['test_docs', 'test_jobs', 'test_corpus', 'test_lifecycle', 'test_distributed', 'test_input_errors', 'test_end_to_end',
                 'test_jupyterlab', 'test_registry', 'test_finetune', 'test_run_safety', 'test_corpus_index', 'test_logged']


def pytest_collection_modifyitems(items):
    rank = lambda item: next((i for i, m in enumerate(LONGEST_FIRST) if item.path.stem == m), len(LONGEST_FIRST))
    items.sort(key=rank)  # stable: each file's tests keep their order


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


def foundry_here(*args, cwd=None, env=None, **_) -> subprocess.CompletedProcess:
    """`foundry ARGS` through the command's own entry point (`model_foundry.cli.main`) in this process: the same code path,
    exit code, stdout and stderr as `foundry()`, without a new interpreter importing torch and transformers (4-5 s each).
    For tests of what a command does and says; a test of the process itself (signals, kills, a terminal, exit on a crash)
    uses `foundry()`. `env` entries are set for the call and restored after; torch runs on OMP_NUM_THREADS threads (as a new
    process given this environment would: the thread count changes float sums)."""
    import contextlib, io, logging, traceback
    import torch
    from model_foundry.cli import main
    out, err = io.StringIO(), io.StringIO()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    here, threads = os.getcwd(), torch.get_num_threads()
    try:
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '2')))  # what `foundry()` gives its process
        root.handlers = []  # the command's logging.basicConfig then writes to the captured stderr, as a new process's would
        if cwd is not None: os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: code = main([str(a) for a in args])
            except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)  # argparse: exit 2
            except Exception:  # what the interpreter does with an uncaught exception: the traceback, exit code 1
                traceback.print_exc(); code = 1
    finally:
        os.chdir(here); torch.set_num_threads(threads)
        for h in root.handlers:
            if h not in saved_handlers: h.close()
        root.handlers, root.level = saved_handlers, saved_level
        for k, v in saved_env.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return subprocess.CompletedProcess(['foundry', *map(str, args)], code, out.getvalue(), err.getvalue())
