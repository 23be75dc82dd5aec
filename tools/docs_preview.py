"""Render the docs site from the notebooks with pure-Python tools, where Quarto cannot be installed.

    python tools/docs_preview.py [--out _site] [--workers 2] [--only PATTERN ...] [--executed DIR]
    python tools/docs_preview.py --execute-in-place     (before nbdev-docs: Quarto renders stored outputs)

The canonical site is nbdev's Quarto build (`nbdev-docs`). This preview builds the same pages from
the same notebooks: each notebook is executed (nbclient, so plots and outputs are fresh), passed
through nbdev's own doc processors (`show_doc` for every exported name, `#| hide`, `#| echo: false`,
frontmatter from the title cell), and converted to HTML with nbconvert. Pages: the home page
(index.ipynb), tutorials/, explanations/, and the API reference (the numbered notebooks).

`--executed DIR`: a notebook found under DIR (its path under nbs/ kept), already executed, is used as it is instead of
being executed again: the docs test (tests/test_docs.py) passes the notebooks its nbdev-test run executed
(tools/coverage_nbdev_test.py --save-to), so the site is built from those outputs.
"""
import argparse, concurrent.futures as cf, html, json, os, re, shutil, subprocess, sys, tempfile, threading, time
from pathlib import Path
from typing import Optional

import nbformat, yaml

REPO = Path(__file__).resolve().parent.parent
NBS = REPO/'nbs'
SECTIONS = (('tutorials', 'Tutorials'), ('explanations', 'Explanations'), ('', 'API reference'))
_DIRECTIVE = re.compile(r'^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$')


def pages() -> list[tuple[str, Path]]:
    "(section, notebook) for every page, in site order: home, tutorials, explanations, API reference."
    out = [('home', NBS/'index.ipynb')]
    out += [('Tutorials', p) for p in sorted((NBS/'tutorials').glob('*.ipynb'))]
    out += [('Explanations', p) for p in sorted((NBS/'explanations').glob('*.ipynb'))]
    out += [('API reference', p) for p in sorted(NBS.glob('[0-9]*.ipynb'), key=lambda p: (_order_of(p), p.name))]
    return out


def _order_of(nb: Path) -> float:
    "The page's place in the sidebar: the `- order: N` line of its title cell (nbdev frontmatter, as Quarto reads it)."
    for c in nbformat.read(nb, as_version=4).cells:
        if c.cell_type == 'markdown':
            m = re.search(r'^-\s+order:\s*([\d.]+)\s*$', c.source, re.M)
            return float(m.group(1)) if m else float('inf')
    return float('inf')


def selected(only=()) -> list[tuple[str, Path]]:
    "The pages whose notebook path (relative to nbs/) matches one of the regexes `only`; all pages when none."
    return [(s, p) for s, p in pages() if not only or any(re.search(o, str(p.relative_to(NBS))) for o in only)]


def page_name(nb: Path) -> str:
    "The page's path in the site: numbered prefixes dropped, as nbdev's site names them (00_config -> config.html)."
    rel = nb.relative_to(NBS)
    return str(rel.with_name(re.sub(r'^\d+[a-z]?_', '', rel.stem) + '.html'))


def directives(src: str) -> dict:
    "The cell's leading `#| key: value` directives."
    d = {}
    for line in src.splitlines():
        m = _DIRECTIVE.match(line)
        if not m: break
        d[m.group(1)] = m.group(2)
    return d


def execute(nb_path: Path, out: Path, timeout: int):
    "Run the notebook top to bottom in a fresh kernel (cells marked `#| eval: false` are shown, not run); write it to `out`."
    from nbclient import NotebookClient
    nb = nbformat.read(nb_path, as_version=4)
    skipped = {}
    for i, c in enumerate(nb.cells):
        if c.cell_type == 'code' and directives(c.source).get('eval', '').lower() == 'false': skipped[i], c.source = c.source, ''
    NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(nb_path.parent)}}).execute()
    for i, s in skipped.items(): nb.cells[i].source = s
    nbformat.write(nb, out)


def process(src: Path, dst: Path):
    "nbdev's doc processors, as `nbdev-docs` applies them before Quarto renders."
    from nbdev.processors import FilterDefaults
    from nbdev.serve_drv import exec_nb
    os.environ['IN_TEST'] = '1'
    exec_nb(src, dst, FilterDefaults)


def _clean(nb) -> tuple[dict, object]:
    "Frontmatter as a dict, and the notebook with Quarto directives applied and Quarto-only markup removed."
    meta, cells = {}, []
    for c in nb.cells:
        c.metadata = {}  # nbdev's has_sd and timing keys break nbconvert's schema check; nothing here is needed
        if c.cell_type == 'raw' and c.source.startswith('---'):
            meta.update(yaml.safe_load(c.source.strip().strip('-')) or {}); continue
        if c.cell_type == 'markdown':
            c.source = '\n'.join(l for l in c.source.splitlines() if not l.startswith(':::'))
            if c.source.strip(): cells.append(c)
            continue
        if c.cell_type != 'code': continue
        d = directives(c.source)
        if d.get('include') == 'false': continue
        body = '\n'.join(c.source.splitlines()[len(d):]).strip()
        c.source = '' if d.get('echo') == 'false' else body
        if d.get('output') == 'false': c.outputs = []
        c.outputs = [o for o in c.outputs if not (o.get('output_type') == 'stream' and o.get('name') == 'stderr')]
        for o in c.outputs:
            if 'text/markdown' in o.get('data', {}): o['data']['text/markdown'] = _fix_markdown(o['data']['text/markdown'])
        if not c.source: c.metadata['tags'] = ['no-input']
        if c.source or c.outputs: cells.append(c)
    nb.cells = cells
    return meta, nb


def _fix_markdown(md: str) -> str:
    "show_doc's Quarto-only markup made plain: link attributes dropped, source links (no repository URL here) as text."
    md = re.sub(r'\[source\]\(/blob/[^/]+/([^)#]+)#L(\d+)\)(\{[^}]*\})?', r'<span class="source">\1:\2</span>', md)
    return re.sub(r'(\]\([^)]*\))\{[^}]*\}', r'\1', md)


def render(src: Path, section: str, name: str, nav: str, out_root: Path) -> dict:
    "One processed notebook as one HTML page of the site."
    from nbconvert import HTMLExporter
    meta, nb = _clean(nbformat.read(src, as_version=4))
    from nbconvert.preprocessors import TagRemovePreprocessor
    ex = HTMLExporter(template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True)
    ex.register_preprocessor(TagRemovePreprocessor(remove_input_tags={'no-input'}), enabled=True)
    body, _ = ex.from_notebook_node(nb)
    depth = name.count('/')
    body = body.replace('href="/', 'href="' + '../' * depth)  # nbdev's doc links are site-absolute; the preview is opened from files
    title = meta.get('title') or src.stem
    page = TEMPLATE.format(title=html.escape(str(title)),
                           description=re.sub(r'`([^`]+)`', r'<code>\1</code>', html.escape(str(meta.get('description', '')))),
                           nav=nav.replace('href="', 'href="' + '../' * depth), body=body, css='../' * depth + 'site.css',
                           section=html.escape(section))
    out = out_root/name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return dict(name=name, title=title, section=section)


def _build_batch(nbs: list, work: Path, timeout: int, threads: int, done: Optional[Path] = None):
    """Execute (unless `done` holds it executed) and process notebooks `nbs` one after another in one process of their own
    (kernels and nbdev's shells stay apart from this one; torch and the package are imported once per batch, not per page).
    Yields (notebook, processed path or None, seconds, error) as each is done."""
    args = []
    for nb in nbs:
        rel = nb.relative_to(NBS)
        executed, processed = work/'executed'/rel, work/'processed'/rel
        executed.parent.mkdir(parents=True, exist_ok=True); processed.parent.mkdir(parents=True, exist_ok=True)
        reuse = done is not None and (done/rel).is_file()
        if reuse: shutil.copyfile(done/rel, executed)
        args += [str(nb), str(executed), str(processed), 'reuse' if reuse else 'execute']
    p = subprocess.Popen([sys.executable, __file__, '--batch', *args, '--timeout', str(timeout)], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, 'OMP_NUM_THREADS': str(threads)})
    err = []
    threading.Thread(target=lambda: err.extend(p.stderr), daemon=True).start()  # drained: a full stderr pipe would stall it
    seen = set()
    for line in p.stdout:  # one JSON line per notebook, as it is done
        if not line.startswith('{'): continue
        r = json.loads(line); seen.add(r['notebook'])
        yield Path(r['notebook']), Path(r['processed']) if r['ok'] else None, r['seconds'], r.get('error')
    p.wait()
    for nb in nbs:  # the batch process died before reaching these
        if str(nb) not in seen: yield nb, None, 0.0, f'the batch process ended (exit {p.returncode}) before it:\n{"".join(err)[-4000:]}'


def _run_batch(triples: list, timeout: int):
    "In the batch process: each notebook executed (or taken as executed) and processed; a JSON line each, a failure included."
    import traceback
    for nb, executed, processed, how in triples:
        t = time.time()
        try:
            if how == 'execute': execute(Path(nb), Path(executed), timeout)
            process(Path(executed), Path(processed))
            r = dict(ok=True)
        except Exception: r = dict(ok=False, error=f'{Path(nb).relative_to(NBS)} failed:\n{traceback.format_exc()[-4000:]}')
        try:
            from ipywidgets import Widget
            Widget.close_all()  # nbdev stores the live widgets' state in each page: only this notebook's
        except ImportError: pass
        print(json.dumps(dict(r, notebook=nb, processed=processed, seconds=time.time() - t)), flush=True)


def _title_of(nb: Path) -> str:
    "The notebook's title: its first markdown heading."
    for c in nbformat.read(nb, as_version=4).cells:
        if c.cell_type == 'markdown' and (m := re.match(r'#\s+(.+)', c.source.strip())): return m.group(1).strip()
    return nb.stem


def build(out: Path, workers: int = 2, only=(), timeout: int = 900, done: Optional[Path] = None) -> list[dict]:
    "Build the site into `out` (notebooks under `done` are taken as executed); returns one record per page."
    todo = selected(only)
    links, current = [], None
    for s, p in pages():
        if s != current and s != 'home': links.append(f'<h3>{html.escape(s)}</h3>')
        current = s
        links.append(f'<a href="{page_name(p)}">{html.escape(_title_of(p) if s != "home" else "Home")}</a>')
    nav = '\n'.join(links)
    out.mkdir(parents=True, exist_ok=True)
    (out/'site.css').write_text(CSS + _pygments_css())
    work = Path(tempfile.mkdtemp(prefix='docs-preview-'))
    built, failed = [], []
    try:
        threads = max(1, (os.cpu_count() or 1) // workers)  # torch in parallel kernels must not oversubscribe the cores
        section = {p: s for s, p in todo}
        batches = [[p for _, p in todo][i::workers] for i in range(workers)]  # interleaved: the long notebooks spread out
        lock = threading.Lock()  # pages are rendered and recorded by one batch's thread at a time

        def run(batch):
            for p, processed, secs, error in _build_batch(batch, work, timeout, threads, done):
                with lock:
                    if error: failed.append(p.name); print(error, file=sys.stderr, flush=True); continue
                    built.append(render(processed, section[p], page_name(p), nav, out))
                    print(f'{page_name(p):36s} {secs:6.1f} s', flush=True)

        with cf.ThreadPoolExecutor(workers) as pool: list(pool.map(run, [b for b in batches if b]))
    finally: shutil.rmtree(work, ignore_errors=True)
    if failed: raise SystemExit(f'docs preview: {len(failed)} notebook(s) failed to build: {", ".join(sorted(failed))}')
    return built


def _pygments_css() -> str:
    from pygments.formatters import HtmlFormatter
    return HtmlFormatter(style='default').get_style_defs('.highlight')


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} – model_foundry</title><link rel="stylesheet" href="{css}"></head>
<body><nav class="sidebar"><div class="brand">model_foundry</div>{nav}</nav>
<main><header><p class="section">{section}</p><h1 class="title">{title}</h1><p class="description">{description}</p></header>
{body}</main></body></html>
"""

CSS = """
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; display: flex; }
nav.sidebar { position: sticky; top: 0; height: 100vh; overflow-y: auto; width: 250px; flex: none; padding: 1.2em;
  background: #f6f8fa; border-right: 1px solid #ddd; box-sizing: border-box; }
nav.sidebar .brand { font-weight: 700; font-size: 1.2em; margin-bottom: .8em; }
nav.sidebar h3 { font-size: .8em; text-transform: uppercase; color: #666; margin: 1.2em 0 .3em; }
nav.sidebar a { display: block; color: #0b5cad; text-decoration: none; padding: .15em 0; }
main { max-width: 980px; padding: 1.5em 2.5em; min-width: 0; }
header .section { color: #888; margin: 0; font-size: .85em; text-transform: uppercase; }
h1.title { margin: .1em 0; } header .description { color: #555; font-size: 1.1em; }
pre, code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: .88em; }
.jp-InputArea pre, .highlight pre { background: #f6f8fa; padding: .7em 1em; border-radius: 6px; overflow-x: auto; }
.jp-OutputArea pre { padding: .3em 1em; overflow-x: auto; border-left: 3px solid #e3e3e3; }
.jp-Cell { margin: .6em 0; } img { max-width: 100%; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: .25em .6em; }
.jp-RenderedMarkdown h3 code, h3 code { font-size: 1em; }
.anchor-link { visibility: hidden; text-decoration: none; margin-left: .2em; } :hover > .anchor-link { visibility: visible; }
.source { float: right; font-size: .8em; color: #888; font-family: ui-monospace, monospace; }
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(REPO/'_site'), help='output folder (default: _site)')
    ap.add_argument('--workers', type=int, default=2, help='notebooks executed at once, each with cores/workers torch threads')
    ap.add_argument('--only', action='append', default=[], metavar='REGEX', help='build only matching notebooks (repeatable)')
    ap.add_argument('--timeout', type=int, default=900, help='seconds a cell may run')
    ap.add_argument('--executed', metavar='DIR', help='notebooks already executed (paths as under nbs/): used, not executed again')
    ap.add_argument('--execute-in-place', action='store_true',
                    help="only execute the notebooks, writing their outputs into nbs/ (for nbdev-docs, which renders stored outputs; do not commit them)")
    ap.add_argument('--batch', nargs='+', help=argparse.SUPPRESS)  # NOTEBOOK EXECUTED PROCESSED execute|reuse, repeated
    a = ap.parse_args(argv)
    if a.batch:
        _run_batch([a.batch[i:i + 4] for i in range(0, len(a.batch), 4)], a.timeout)
        return 0
    t = time.time()
    if a.execute_in_place:
        todo = [p for _, p in selected(a.only)]
        with cf.ThreadPoolExecutor(a.workers) as pool: list(pool.map(lambda p: execute(p, p, a.timeout), todo))
        print(f'{len(todo)} notebooks executed in place in {time.time() - t:.0f} s')
        return 0
    built = build(Path(a.out), a.workers, a.only, a.timeout, Path(a.executed).resolve() if a.executed else None)
    print(f'{len(built)} pages in {time.time() - t:.0f} s: {Path(a.out)/"index.html"}')
    return 0


if __name__ == '__main__': sys.exit(main())
