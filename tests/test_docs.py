"""The notebooks run top to bottom with their inline tests (nbdev-test), and the docs site built from their outputs with
pure-Python tools opens in a real headless Chromium.

One file, so that under pytest-xdist (`make test`: `--dist loadfile`) the site is built on the worker that ran the notebooks,
from the outputs they just gave, while the other worker runs the rest of the suite."""
import os, shutil, subprocess, sys, time

import pytest

from conftest import REPO


def chromium() -> str | None:
    "The system's Chromium (Debian's `chromium` package; `make test` installs it where apt-get can), or $CHROMIUM."
    for name in (os.environ.get('CHROMIUM'), 'chromium', 'chromium-browser'):
        if name and (path := shutil.which(name)): return path
    return None


def notebooks() -> list:
    "Every notebook nbdev-test runs: nbs/ and its folders, but not checkpoints or files starting with `_` or `.`."
    return sorted(str(p.relative_to(REPO/'nbs')) for p in (REPO/'nbs').rglob('*.ipynb')
                  if not any(part.startswith(('_', '.')) for part in p.relative_to(REPO/'nbs').parts))


@pytest.fixture(scope='module')
def executed(tmp_path_factory):
    """nbdev-test over every notebook (tools/coverage_nbdev_test.py: nbdev-test, with the exported cells measured as their
    modules' lines when coverage runs), two notebooks at a time, each kept with the outputs it gave; (result, folder)."""
    out = tmp_path_factory.mktemp('executed')
    t = time.time()
    res = subprocess.run([sys.executable, str(REPO/'tools'/'coverage_nbdev_test.py'), '--n-workers', '2', '--save-to', str(out)], cwd=REPO,
                         capture_output=True, text=True, timeout=1500, env=dict(os.environ, OMP_NUM_THREADS='1'))
    print(f'nbdev-test: {time.time() - t:.0f} s')
    return res, out


@pytest.mark.timeout(1800)  # a standalone run on a slow machine; `make test` runs this beside the rest of the suite
def test_every_notebook_runs_top_to_bottom_and_its_inline_tests_pass(executed):
    "Slow because it is every notebook: 36 run top to bottom, the tutorials training real models (the longest, ~70 s, trains 100 steps of a 2.2M-parameter GPT on the standard library)."
    res, out = executed
    assert res.returncode == 0 and 'Success.' in res.stdout + res.stderr, (res.stdout[-3000:], res.stderr[-6000:])
    saved = sorted(str(p.relative_to(out)) for p in out.rglob('*.ipynb'))
    assert saved == notebooks(), sorted(set(notebooks()) ^ set(saved))  # each one ran (and passed: only those are saved)


@pytest.fixture(scope='module')
def site(tmp_path_factory, executed):
    "The whole site, built as `make docs-preview` builds it, from the notebooks as nbdev-test executed them (any it did not: executed here)."
    out = tmp_path_factory.mktemp('site')
    t = time.time()
    res = subprocess.run([sys.executable, str(REPO/'tools'/'docs_preview.py'), '--out', str(out), '--executed', str(executed[1])], cwd=REPO,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-5000:])
    print(f'docs preview built in {time.time() - t:.0f} s:\n{res.stdout}')
    return out


@pytest.fixture(scope='module')
def browser():
    exe = chromium()
    if exe is None: pytest.skip('no Chromium on this machine (apt-get install chromium; `make test` does it where it runs as root)')
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.skip('playwright is not installed (it is in the dev extras: pip install -e .[dev])')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=['--no-sandbox'])  # the system browser: nothing is downloaded
        yield b
        b.close()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the notebooks' run and the site's build (the fixtures) count here when this runs alone
def test_docs_preview_builds_every_page_without_errors(site):
    "Slow because it is the whole site: nbdev's doc processors import each page's exports and render every show_doc (from nbdev-test's outputs: no notebook runs twice)."
    pages = sorted(str(p.relative_to(site)) for p in site.rglob('*.html'))
    for must in ('index.html', 'tutorials/train_python_stdlib.html', 'explanations/run_directory.html',
                 'config.html', 'run.html', 'jobs.html', 'cli.html'):
        assert must in pages, pages
    for p in site.rglob('*.html'):
        text = p.read_text()
        assert 'Traceback (most recent call last)' not in text, p       # no cell failed while the page was built
        assert '{target=' not in text and ':::' not in text, p           # no Quarto-only markup left raw


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_docs_pages_render_api_docs_and_plots_in_chromium(browser, site, tmp_path):  # browser first: a skip costs no build
    page = browser.new_page(viewport={'width': 1280, 'height': 900})

    # the home page: the README's content and a sidebar that reaches every section
    page.goto((site/'index.html').as_uri())
    assert page.title().startswith('model_foundry')
    assert page.locator('main').get_by_text('make test').first.is_visible()
    nav = page.locator('nav.sidebar')
    for section in ('Tutorials', 'Explanations', 'API reference'): assert nav.get_by_text(section, exact=True).is_visible()
    page.screenshot(path=str(tmp_path/'index.png'), full_page=True)

    # following the sidebar to an API page: show_doc's rendered signature and docstring, and a drawn plot
    nav.get_by_role('link', name='Reports', exact=True).click()
    page.wait_for_load_state()
    assert page.url.endswith('/reports.html')
    assert page.locator('h3', has_text='plot_losses').first.is_visible()
    sig = page.locator('pre', has_text='def plot_losses(')
    assert sig.count() == 1 and sig.is_visible() and 'block_size:int' in sig.inner_text()
    assert page.get_by_text('loss.png: train and val loss against step and against tokens seen.').is_visible()
    drawn = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 300).map(i => i.getBoundingClientRect().width)")
    assert drawn and all(w > 300 for w in drawn), drawn  # decoded and laid out, not a broken-image icon
    page.screenshot(path=str(tmp_path/'reports.png'), full_page=True)

    # the tutorial shows its run's loss curve, and its links into the rest of the site work
    page.goto((site/'tutorials'/'train_python_stdlib.html').as_uri())
    assert page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 300).length") >= 1
    page.get_by_role('link', name='the run directory').first.click()
    page.wait_for_load_state()
    assert page.url.endswith('/explanations/run_directory.html') and page.locator('h1.title').inner_text().startswith('The run directory')
