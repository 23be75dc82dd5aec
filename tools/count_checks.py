"""Count the suite's checks: pytest tests (as collected) and assertions, in tests/ and in the notebooks' inline tests.

An assertion is an `assert` statement, a `pytest.raises`/`pytest.warns` block, or a call to one of fastcore.test's checks
(test_eq, test_ne, test_close, test_fail, test_is, test_shuffled, test_warns, test_stdout, test_fig_exists, ...).
Counted statically (AST), so an assertion inside a loop counts once. Used before and after a change to the suite:
`python tools/count_checks.py` prints the totals and a line per file; `--json` prints them as JSON.
"""
import argparse, ast, json, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FASTCORE_CHECKS = {'test_eq', 'test_ne', 'test_close', 'test_fail', 'test_is', 'test_shuffled', 'test_warns', 'test_stdout',
                   'test_fig_exists', 'test_eq_type', 'test_sig', 'test_like', 'test'}


def assertions(src: str) -> int:
    "How many assertions the Python source `src` holds (0 for source that does not parse, e.g. a cell of magics)."
    try: tree = ast.parse(src)
    except SyntaxError: return 0
    n = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert): n += 1
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
            if name in FASTCORE_CHECKS and owner is None: n += 1
            elif owner == 'pytest' and name in ('raises', 'warns'): n += 1
    return n


def notebook_source(path: Path) -> list[str]:
    "The code cells of a notebook, with IPython magics and shell lines blanked so that the cells parse."
    cells = json.loads(path.read_text())['cells']
    out = []
    for c in cells:
        if c['cell_type'] != 'code': continue
        src = ''.join(c['source'])
        out.append('\n'.join('' if l.lstrip().startswith(('%', '!')) else l for l in src.splitlines()))
    return out


def collected() -> int:
    "The number of pytest tests collected in tests/ (gpu included: it is part of the suite, only not run in CI)."
    res = subprocess.run([sys.executable, '-m', 'pytest', '--collect-only', '-q', 'tests'], cwd=REPO, capture_output=True, text=True)
    return sum('::' in l for l in res.stdout.splitlines())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--json', action='store_true')
    a = p.parse_args()
    files = {str(f.relative_to(REPO)): assertions(f.read_text()) for f in sorted((REPO/'tests').glob('*.py'))}
    nbs = {str(f.relative_to(REPO)): sum(map(assertions, notebook_source(f))) for f in sorted((REPO/'nbs').rglob('*.ipynb'))
           if '.ipynb_checkpoints' not in f.parts}
    out = dict(pytest_tests=collected(), pytest_assertions=sum(files.values()), notebook_assertions=sum(nbs.values()),
               notebooks=len(nbs), files=files, notebook_files=nbs)
    if a.json: print(json.dumps(out, indent=1)); return
    print(f"pytest tests collected: {out['pytest_tests']}\nassertions in tests/: {out['pytest_assertions']}\n"
          f"assertions in the notebooks' inline tests: {out['notebook_assertions']} ({out['notebooks']} notebooks)")
    for k, v in {**files, **nbs}.items(): print(f'  {v:5d}  {k}')


if __name__ == '__main__': main()
