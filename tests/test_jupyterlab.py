"""JupyterLab as a real part: a real server, a notebook run in the system Chromium, and the generation playground used there.

Everything the server, its kernel and JupyterLab write (config, data, runtime, settings, workspaces, IPython profile, the
foundry cache) goes under tmp_path: nothing of the user's is read or touched."""
import json, os, re, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import nbformat
import pytest
import torch

from conftest import REPO, wait_until
from test_docs import chromium  # the system browser, found as the docs test finds it

CORPUS = REPO/'tests'/'data'/'tiny.txt'
STEPS, MAX_NEW = 60, 40
PROMPT = 'the d'

TRAIN_CELL = """\
from model_foundry.config import validate_config
from model_foundry.run import train
cfg = validate_config({{'experiment_name': 'lab', 'random_seed': 0,
                       'data': {{'source_corpus': {corpus!r}, 'batch_size': 8, 'max_sequence_length': 16}},
                       'tokenizer': {{'kind': 'char'}},
                       'model': {{'layers': 1, 'embedding_size': 32, 'attention_heads': 2}},
                       'training': {{'train_steps': {steps}, 'learning_rate': 3e-3, 'warmup_steps': 5, 'eval_interval': 20,
                                    'eval_batches': 2, 'checkpoint_interval': {steps}, 'log_interval': 10}}}})
state = train(cfg, 'run', progress=False)
print(f"trained {{state['step']}} steps: {{state['status']}}, best val loss {{state['best_val_loss']:.4f}}")"""

PLAYGROUND_CELL = f"""\
from model_foundry.results import playground
playground('run', prompt='def ', max_new_tokens={MAX_NEW})"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, cache_dir):
    "A JupyterLab server on a random port with a token, rooted in a tmp folder holding the corpus; yields (url, token, root, log)."
    root, home = tmp_path/'lab', tmp_path/'jupyter'
    root.mkdir()
    shutil.copy(CORPUS, root/'tiny.txt')
    dirs = {k: home/k.lower() for k in ('JUPYTER_CONFIG_DIR', 'JUPYTER_DATA_DIR', 'JUPYTER_RUNTIME_DIR', 'JUPYTERLAB_SETTINGS_DIR',
                                        'JUPYTERLAB_WORKSPACES_DIR', 'IPYTHONDIR', 'MPLCONFIGDIR')}
    for d in dirs.values(): d.mkdir(parents=True)
    # no news / update notifications popping over the notebook
    notes = dirs['JUPYTERLAB_SETTINGS_DIR']/'@jupyterlab'/'apputils-extension'/'notification.jupyterlab-settings'
    notes.parent.mkdir(parents=True)
    notes.write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    token = os.urandom(16).hex()
    # the kernel uses the thread count of this process, so that its sampling equals the one computed here bit for bit
    env = dict(os.environ, **{k: str(v) for k, v in dirs.items()}, OMP_NUM_THREADS=str(torch.get_num_threads()),
               JUPYTER_PLATFORM_DIRS='1', PYTHONUNBUFFERED='1')
    log = open(tmp_path/'jupyterlab.log', 'w+')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyterlab', '--no-browser', '--ServerApp.ip=127.0.0.1',
                             f'--ServerApp.port={free_port()}', f'--IdentityProvider.token={token}',
                             f'--ServerApp.root_dir={root}', *(['--allow-root'] if os.geteuid() == 0 else [])],
                            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(n=4000) -> str:
        log.flush(); return (tmp_path/'jupyterlab.log').read_text()[-n:]

    def answers(url) -> bool:
        try: return urllib.request.urlopen(f'{url}api/status?token={token}', timeout=2).status == 200
        except OSError: return False

    url = None
    try:
        # the server's own record of where it listens (port_retries may have moved it off a port taken meanwhile)
        info = lambda: [json.loads(p.read_text()) for p in dirs['JUPYTER_RUNTIME_DIR'].glob('jpserver-*.json')]
        assert wait_until(lambda: info() or proc.poll() is not None, timeout=60, every=0.2) and proc.poll() is None, log_tail()
        url = info()[0]['url']
        assert wait_until(lambda: answers(url), timeout=30, every=0.2), log_tail()
        yield url, token, root, log_tail
    finally:
        if proc.poll() is None and url:  # the clean way first: the server shuts its kernels down, then exits
            try: urllib.request.urlopen(urllib.request.Request(f'{url}api/shutdown', method='POST',
                                                               headers={'Authorization': f'token {token}'}), timeout=10)
            except Exception: proc.terminate()
            try: proc.wait(timeout=20)
            except subprocess.TimeoutExpired: proc.kill()
        if proc.poll() is None: proc.terminate()
        try: proc.wait(timeout=20)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait(timeout=10)
        try: os.killpg(proc.pid, signal.SIGKILL)  # anything of this server's session still alive (an orphaned kernel)
        except ProcessLookupError: pass
        log.close()


def expected_completions(run: Path, seeds) -> dict:
    "What the playground must show for PROMPT with its default settings and each seed, computed here from the run's files."
    from model_foundry.generation import generate
    from model_foundry.results import load_run
    model, tok = load_run(run)
    # the widget's defaults: temperature 0.8, top-k min(50, vocabulary), top-p 1 (off)
    return {s: PROMPT + generate(model, tok, PROMPT, MAX_NEW, 0.8, min(50, len(tok)), None, s).text for s in seeds}


def wait_for_text(locator, want: str, timeout: float = 60) -> str:
    "Poll the element's exact text (textContent, whitespace kept) until it is `want`; return the last text seen."
    seen = [None]
    def ok():
        try: seen[0] = locator.text_content(timeout=1000)
        except Exception: return False
        return seen[0] == want
    wait_until(ok, timeout=timeout, every=0.2)
    return seen[0]


@pytest.fixture
def chromium_exe() -> str:
    "The system Chromium and Playwright, or a skip that says which is missing (the only skip tests/skip_policy.py allows here)."
    exe = chromium()
    if exe is None: pytest.skip('no Chromium on this machine (apt-get install chromium; `make test` does it where it runs as root)')
    try: import playwright.sync_api  # noqa: F401
    except ImportError: pytest.skip('playwright is not installed (it is in the dev extras: pip install -e .[dev])')
    return exe


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_jupyterlab_runs_a_notebook_and_the_playground_in_a_browser(tmp_path, chromium_exe, lab):  # the browser first: a skip starts no server
    "Slow because every part is real: a JupyterLab server, its kernel training a 60-step model, the widgets frontend in Chromium."
    from playwright.sync_api import sync_playwright
    url, token, root, log_tail = lab
    nb = nbformat.v4.new_notebook(metadata={'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}})
    nb.cells = [nbformat.v4.new_markdown_cell('# Train a tiny model, then play with it'),
                nbformat.v4.new_code_cell(TRAIN_CELL.format(corpus=str(root/'tiny.txt'), steps=STEPS)),
                nbformat.v4.new_code_cell(PLAYGROUND_CELL)]
    nbformat.write(nb, root/'play.ipynb')

    shot = tmp_path/'jupyterlab.png'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_exe, args=['--no-sandbox'])  # the system browser: nothing is downloaded
        page = browser.new_page(viewport={'width': 1400, 'height': 1000})
        page.set_default_timeout(30_000)
        try:
            page.goto(f'{url}lab/tree/play.ipynb?token={token}')
            nbpanel = page.locator('.jp-NotebookPanel:not(.lm-mod-hidden)')
            nbpanel.locator('.jp-Cell').nth(2).wait_for(timeout=60_000)              # the notebook is open, all three cells shown
            assert nbpanel.locator('.jp-Cell .jp-OutputArea-output').count() == 0    # and nothing has run yet
            # its kernel started and idle (Run All before that can end in a 'Select Kernel' dialog)
            nbpanel.locator('.jp-Notebook-ExecutionIndicator[data-status="idle"]').wait_for(timeout=60_000)

            # Run > Run All Cells, through the menu bar as a user does it; on a loaded machine the first click can land
            # before the kernel's connection is ready and run nothing (no cell queued: every prompt still `[ ]:`), and a
            # user clicks again: so does this, up to three times, only while nothing has started
            started = lambda: nbpanel.locator('.jp-InputPrompt', has_text=re.compile(r'\[(\*|\d+)\]')).count() > 0
            for attempt in range(3):
                page.locator('.lm-MenuBar-item', has_text=re.compile(r'^Run$')).click()
                page.locator('.lm-Menu-item:not(.lm-mod-disabled)', has_text=re.compile(r'^Run All Cells')).click()
                if wait_until(started, timeout=20, every=0.2): break
            assert started(), 'Run All Cells ran no cell, three times'

            # the training cell printed what the run directory on disk says
            printed = nbpanel.locator('.jp-Cell').nth(1).locator('.jp-OutputArea-output', has_text='trained')
            printed.wait_for(timeout=120_000)
            state = json.loads((root/'run'/'state.json').read_text())
            assert state['status'] == 'completed' and state['step'] == STEPS
            assert f"trained {STEPS} steps: completed, best val loss {state['best_val_loss']:.4f}" in printed.inner_text()

            # the playground cell rendered the ipywidgets panel (the JupyterLab 4 widgets frontend is live), not its text repr
            cell = nbpanel.locator('.jp-Cell').nth(2)
            panel = cell.locator('.jp-OutputArea-output .widget-vbox')
            panel.wait_for(timeout=60_000)
            assert 'VBox(' not in cell.locator('.jp-Cell-outputArea').inner_text()
            prompt = panel.locator('.widget-textarea textarea')
            seed = panel.locator('.widget-text', has=page.locator('label', has_text=re.compile(r'^seed$'))).locator('input')
            button = panel.get_by_role('button', name='Generate')
            output = panel.locator('.widget-output')
            assert prompt.input_value() == 'def ' and seed.input_value() == '0' and button.is_enabled()
            assert output.inner_text().strip() == ''

            # type a prompt, pick a seed, press Generate: the completion starts with the prompt and is exactly the sample
            # the run's model gives for that prompt, seed and the panel's settings
            # (a 60-step model often samples its end-of-text token at once: the two seeds used are the first two, from 1 on,
            # whose completions are non-empty and differ, so that the seed is seen to matter)
            want = expected_completions(root/'run', range(1, 11))
            seeds = [s for s in want if len(want[s]) > len(PROMPT)]
            seeds = [seeds[0], next(s for s in seeds if want[s] != want[seeds[0]])]
            prompt.fill(PROMPT)
            for s in (*seeds, seeds[0]):  # and back: the same seed gives the same completion again
                seed.fill(str(s)); seed.press('Enter')
                button.click()
                got = wait_for_text(output, want[s] + '\n')
                assert got == want[s] + '\n', (s, got, want[s])
                assert got.startswith(PROMPT) and len(got) > len(PROMPT) + 1
            status = panel.locator('.widget-html').inner_text()
            assert re.fullmatch(r'\d+ tokens, [\d,]+ tokens/s', status.strip()), status
            page.screenshot(path=str(shot), full_page=True)
        except Exception as e:
            try: page.screenshot(path=str(shot), full_page=True)
            except Exception: pass
            raise AssertionError(f'{type(e).__name__}: {e}\nscreenshot: {shot}\nJupyterLab log (tail):\n{log_tail()}') from e
        finally:
            browser.close()
