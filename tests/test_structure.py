"""The shape the code promises its readers: notebooks numbered in dependency order, and callback events
that fire in the order the loop chapter's table documents."""
import ast, json, re
from pathlib import Path

import pytest

from conftest import REPO
import model_foundry
from model_foundry.loop import EVENTS, ORDERS

PKG = Path(model_foundry.__file__).parent


def notebook_numbers() -> dict:
    "module name -> (number, letter) of the notebook it is exported from."
    out = {}
    for f in PKG.glob('*.py'):
        if m := re.search(r'File to edit: \.\./nbs/(\d+)([a-z]?)_', f.read_text()): out[f.stem] = (int(m.group(1)), m.group(2))
    return out


def imported_modules(source: str) -> set:
    "model_foundry modules imported anywhere in `source` (function bodies included: lazy imports count)."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level: found.add(mod.split('.')[0] if mod else None)
            elif mod.startswith('model_foundry.'): found.add(mod.split('.')[1])
            elif mod == 'model_foundry': found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split('.')[1] for a in node.names if a.name.startswith('model_foundry.'))
    return found - {None}


def test_no_module_imports_a_later_notebook():
    num = notebook_numbers()
    assert len(num) >= 15, num  # every numbered notebook exports a module
    later = []
    for mod, n in num.items():  # the exported modules
        later += [f'{mod} -> {d}' for d in imported_modules((PKG/f'{mod}.py').read_text()) if d in num and num[d] > n]
    for nb in sorted((REPO/'nbs').glob('[0-9]*.ipynb')):  # and every cell of the notebooks, lessons included
        n = (int(nb.name[:2]), re.match(r'\d+([a-z]?)_', nb.name).group(1))
        cells = [''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
        src = '\n'.join(l for c in cells for l in c.splitlines() if not l.startswith(('#|', '%', '!')))
        later += [f'{nb.name} -> {d}' for d in imported_modules(src) if d in num and num[d] > n]
    assert later == [], later


def test_import_check_sees_lazy_imports():
    "The check above would catch an import hidden in a function body."
    src = 'def f():\n    from model_foundry.run import load_run\n    from .jobs import x\n'
    assert imported_modules(src) == {'run', 'jobs'}


def documented_callbacks() -> dict:
    "The loop chapter's callback table: name -> (order, events)."
    nb = json.loads((REPO/'nbs'/'05_loop.ipynb').read_text())
    md = '\n'.join(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
    rows = re.findall(r'^\| `(\w+)`[^|]*\| (-?\d+) \| ([^|]+) \|', md, re.M)
    return {name: (int(order), {e for e in re.findall(r'\b(\w+)\b', events) if e in EVENTS}) for name, order, events in rows}


def callback_classes() -> dict:
    from model_foundry.jobs import JobLog
    from model_foundry.lifecycle import EarlyStopping, NonFiniteGuard, Preemption, SampleLedger
    from model_foundry.loop import CheckpointCallback, MetricsLogger, ProgressBar
    from model_foundry.suites import SuiteCallback
    from model_foundry.tracking import WandbTracker
    return {c.__name__: c for c in (Preemption, NonFiniteGuard, EarlyStopping, MetricsLogger, SampleLedger, CheckpointCallback, SuiteCallback,
                                    WandbTracker, ProgressBar, JobLog)}


def test_callback_table_matches_the_callbacks():
    table, classes = documented_callbacks(), callback_classes()
    assert set(table) == set(classes) == set(ORDERS), (sorted(table), sorted(classes), sorted(ORDERS))
    for name, cls in classes.items():
        handled = {e for e in EVENTS if callable(getattr(cls, e, None))}
        assert (cls.order, handled) == table[name] and ORDERS[name] == cls.order, (name, cls.order, handled, table[name])


@pytest.mark.slow
def test_callback_events_fire_in_documented_order(tmp_path, capsys):
    from model_foundry.fixtures import tiny_config, tiny_prepared
    from model_foundry.jobs import JobLog
    from model_foundry.run import RunDir, build_learner
    (tmp_path/'suite.yaml').write_text("name: s\nmax_new_tokens: 4\nprompts:\n  - {name: a, language: text, prompt: 'the '}\n")
    cfg = tiny_config(tmp_path, training=dict(train_steps=6, eval_interval=3, checkpoint_interval=3, log_interval=2,
                                              behavioral_suite=str(tmp_path/'suite.yaml'), early_stopping_patience=5),
                      logging=dict(dir=str(tmp_path/'runs'), sample_ledger=True))
    class Probe:  # sees the two events no standard callback handles
        order = -20
        def before_step(self): pass
        def after_backward(self): pass
    learn = build_learner(cfg, tiny_prepared(cfg), RunDir(tmp_path/'run'), progress=False, callbacks=[JobLog(), Probe()])
    assert {type(cb).__name__ for cb in learn.cbs} == set(ORDERS) - {'WandbTracker'} | {'Probe'}  # all but the tracker (needs W&B)
    ORDERS_ = {**ORDERS, 'Probe': Probe.order}
    fired = []
    for cb in learn.cbs:  # the real callbacks, each event method wrapped to note that it ran
        for e in EVENTS:
            if (f := getattr(cb, e, None)) is not None:
                setattr(cb, e, lambda *a, _f=f, _e=e, _cb=cb: (fired.append((learn.state.step, _e, type(_cb).__name__)), _f(*a)))
    learn.fit()
    # each step (from one before_step to the next) fires its events in the documented order, callbacks within
    # one event in ascending `order`; an evaluation's after_eval comes before the step's after_step
    steps, cur = [], []
    for rec in fired:
        if rec[1] == 'before_step' and any(e == 'before_step' for _, e, _ in cur): steps.append(cur); cur = []
        cur.append(rec)
    steps.append(cur)
    assert len(steps) == 6
    for seg in steps:
        seq = [(e, n) for _, e, n in seg if e != 'after_log']
        assert [(EVENTS.index(e), ORDERS_[n]) for e, n in seq] == sorted((EVENTS.index(e), ORDERS_[n]) for e, n in seq), seq
    assert [any(e == 'after_eval' for _, e, _ in seg) for seg in steps] == [False, False, True, False, False, True]
    step3 = [(e, n) for s, e, n in fired if s == 3 and e in ('after_eval', 'after_step')]
    assert step3.index(('after_eval', 'EarlyStopping')) < step3.index(('after_step', 'MetricsLogger')), step3
    assert step3.index(('after_eval', 'SuiteCallback')) < step3.index(('after_step', 'CheckpointCallback')), step3
    # logging is an event: the metrics file holds exactly the records fired as after_log
    logged = [json.loads(l) for l in (tmp_path/'run'/'metrics.jsonl').read_text().splitlines()]
    assert sum(1 for _, e, n in fired if e == 'after_log' and n == 'MetricsLogger') == len(logged)
    assert [r['type'] for r in logged if r['step'] == 3] == ['eval', 'suite']
    assert fired[0][1] == 'before_fit' and fired[-1][1] == 'after_fit'


def test_no_test_skips_without_a_gpu_or_browser_reason(tmp_path):
    "The skip policy (tests/skip_policy.py) fails a session whose test skips for a missing file, and lets GPU and browser skips pass."
    import subprocess, sys
    (tmp_path/'test_bad.py').write_text("import pytest\ndef test_needs_data():\n    pytest.skip('corpus not found at /nonexistent/corpus.txt')\n")
    (tmp_path/'test_ok.py').write_text("import pytest\n@pytest.mark.gpu\ndef test_cuda():\n    pytest.skip('no CUDA device')\n"
                                       "def test_browser():\n    pytest.skip('no Chromium on this machine')\n")
    def session(*files, xdist=()):
        return subprocess.run([sys.executable, '-m', 'pytest', '-p', 'skip_policy', '-p', 'no:cacheprovider', '-q', '-o', 'markers=gpu',
                               *xdist, *map(str, files)], capture_output=True, text=True, cwd=tmp_path,
                              env={**__import__('os').environ, 'PYTHONPATH': str(REPO/'tests')})
    for xdist in ((), ('-n', '2')):  # plain pytest, and as `make test` runs it (pytest-xdist: the reports reach its controller)
        bad, ok = session(tmp_path/'test_bad.py', tmp_path/'test_ok.py', xdist=xdist), session(tmp_path/'test_ok.py', xdist=xdist)
        assert bad.returncode == 1 and 'SKIP NOT ALLOWED' in bad.stdout and 'test_needs_data' in bad.stdout and 'test_cuda' not in bad.stdout.split('SKIP NOT ALLOWED')[-1], bad.stdout
        assert ok.returncode == 0 and '2 skipped' in ok.stdout, ok.stdout
