"""`nbdev-test`, with each exported notebook cell measured as the lines of model_foundry/*.py it became.

tests/test_docs.py runs this in place of `nbdev-test` (same arguments). A notebook's tests call the functions its `#| export`
cells define; IPython compiles those cells under a name like `<ipython-input-3-ab12>`, which coverage cannot map to a
file, so the notebooks' own tests would count for nothing. nbdev writes each exported cell into the module verbatim
(directive lines dropped, `from model_foundry.x` made `from .x`) after a `# %% ../nbs/NB.ipynb #CELLID` line; so here a
cell whose code is such a chunk is compiled under the module's path with the module's line numbers. Coverage then
records the lines it runs as that module's lines. A cell that is not exported, or whose notebook was edited since
`nbdev-export` (the text differs), runs exactly as before. Tracebacks through a mapped cell show the module's file and
lines (the same code). nbdev-test's workers are forked, so they inherit the patch; without coverage running this
behaves exactly as `nbdev-test`.

The longest notebooks are started first (`slowest_first`): nbdev-test's name order left the tutorials running alone at the end.

`--save-to DIR`: every notebook that passes is written, with the outputs this run gave it, to DIR (its path under nbs/
kept) instead of over itself (nbdev-test's `--save`). tests/test_docs.py builds the docs site from these outputs rather
than executing every notebook a second time.
"""
import ast, importlib.util, os, re, sys
from pathlib import Path

DIRECTIVE = re.compile(r'\s*#\s*\|')             # `#| export`, `#|hide`, ...: nbdev drops these from the module
MARKER = re.compile(r'# %% \S+\.ipynb\b')  # nbdev's line before each exported cell
ABS_IMPORT = re.compile(r'^(\s*)from model_foundry\.')  # nbdev exports the package's own imports relatively


def _norm(lines): return '\n'.join(ABS_IMPORT.sub(r'\1from .', l.rstrip()) for l in lines).rstrip()


def exported_chunks(pkg_dir: Path) -> dict:
    "{normalised cell text: (module path, module line of the chunk's first line)} for every exported cell; ambiguous texts dropped."
    index, seen = {}, set()
    for f in sorted(pkg_dir.glob('*.py')):
        lines = f.read_text(encoding='utf-8').splitlines()
        marks = [i for i, l in enumerate(lines) if MARKER.match(l)] + [len(lines)]
        for a, b in zip(marks, marks[1:]):
            key = _norm(lines[a + 1:b])
            if not key: continue
            if key in seen: index.pop(key, None); continue  # the same text in two places: leave it unmapped
            seen.add(key); index[key] = (str(f.resolve()), a + 2)
    return index


def install(pkg: str = 'model_foundry'):
    "Patch IPython's compiler so that exported cells compile under their module's path and line numbers."
    from IPython.core.compilerop import CachingCompiler
    spec = importlib.util.find_spec(pkg)
    index = exported_chunks(Path(next(iter(spec.submodule_search_locations))))

    def where(code: str):
        "(module path, line shift) when `code` is an exported cell, else None."
        lines = code.splitlines()
        k = 0
        while k < len(lines) and DIRECTIVE.match(lines[k]): k += 1
        hit = index.get(_norm(lines[k:]))
        return None if hit is None else (hit[0], hit[1] - (k + 1))

    cache, ast_parse = CachingCompiler.cache, CachingCompiler.ast_parse

    def cache_(self, transformed_code, number=0, raw_code=None):
        hit = where(transformed_code)
        if hit is None: return cache(self, transformed_code, number, raw_code)
        return hit[0]  # not put in linecache: tracebacks read the module file, whose lines these are

    def ast_parse_(self, source, filename='<unknown>', symbol='exec'):
        tree = ast_parse(self, source, filename, symbol)
        hit = where(source)
        if hit is not None and hit[0] == filename and hit[1]: ast.increment_lineno(tree, hit[1])
        return tree

    CachingCompiler.cache, CachingCompiler.ast_parse = cache_, ast_parse_


def save_outputs_to(folder: Path, nbs: Path):
    "nbdev-test's `--save` writes each passing notebook under `folder`, at its path relative to `nbs`, not over itself."
    import nbdev.test
    from fastcore.nbio import write_nb

    def write(nb, fn):
        out = folder/Path(fn).resolve().relative_to(nbs.resolve())
        out.parent.mkdir(parents=True, exist_ok=True)
        write_nb(nb, out)
    nbdev.test.write_nb = write


SLOW_FIRST = ('tutorials/', '13_jobs', '14_cli', '01e_corpus', '12d_registry')  # the longest notebooks (nbdev-test --timing), started first


def slowest_first():
    """nbdev-test hands its workers the notebooks in name order, so the longest (the tutorials, ~70 s) start last and run
    alone at the end; started first, the short ones fill the other worker meanwhile. Results are returned in nbdev's order."""
    import nbdev.test
    parallel = nbdev.test.parallel

    def rank(f) -> int: return next((i for i, k in enumerate(SLOW_FIRST) if k in Path(f).as_posix()), len(SLOW_FIRST))

    def reordered(fn, items, **kw):
        order = sorted(range(len(items)), key=lambda i: rank(items[i]))
        results = parallel(fn, [items[i] for i in order], **kw)
        out = [None] * len(items)
        for i, r in zip(order, results): out[i] = r
        return out
    nbdev.test.parallel = reordered


if __name__ == '__main__':
    slowest_first()
    if os.environ.get('COVERAGE_PROCESS_START') or os.environ.get('COVERAGE_PROCESS_CONFIG'): install()
    if '--save-to' in sys.argv:
        i = sys.argv.index('--save-to')
        folder = Path(sys.argv[i + 1]).resolve()
        del sys.argv[i:i + 2]
        save_outputs_to(folder, Path(__file__).resolve().parent.parent/'nbs')
        sys.argv.append('--save')
    from nbdev.test import nbdev_test
    sys.argv[0] = 'nbdev-test'
    sys.exit(nbdev_test())
