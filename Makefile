# Two commands set up a fresh machine: `make run` and `make test`.
# torch is pinned in the same pip command as everything else, so that pip never resolves a
# multi-GB CUDA build on a CPU machine. GPU users: make run TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
RUN_CONFIG ?= configs/python-stdlib.yaml
RUN_DIR    ?= runs/python-stdlib

.PHONY: test-gpu run test test-quick install install-dev export clean-nbs readme check-clean bench browser docs-preview lab

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install $(TORCH) -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP) install $(TORCH) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/foundry train $(RUN_CONFIG) --run-dir $(RUN_DIR)
	$(BIN)/foundry generate $(RUN_DIR) --prompt "def" --max-new-tokens 150 --temperature 0.8 --top-k 50 --seed 0 --num-samples 2
	$(BIN)/foundry generate $(RUN_DIR) --prompt "class" --max-new-tokens 150 --temperature 0.8 --top-k 50 --seed 1
	$(BIN)/foundry eval $(RUN_DIR) --suite suites/python.yaml

# Coverage of model_foundry/ across pytest and every Python process it starts (nbdev-test's notebooks among them):
# COVERAGE_PROCESS_START makes each Python process start coverage (coverage's .pth; [tool.coverage.run] in pyproject.toml,
# patch=subprocess passes it on), all of them writing .coverage.* in the repository root; combined and reported at the end.
# tools/coverage_imports.py (a .pth in the venv) keeps the tracer off while other packages load (most of the cost);
# tools/coverage_nbdev_test.py is nbdev-test with the notebooks' exported cells measured as their module's lines.
# pytest runs on two workers (pytest-xdist, a test file to a worker, the longest files first: tests/conftest.py), one torch
# thread each: the notebooks (nbdev-test, in tests/test_docs.py) and the docs site on one while the rest runs on the other.
COVERAGE_FLOOR ?= 90
COVERAGE_DATA  := COVERAGE_FILE="$(CURDIR)/.coverage"
MEASURED       := $(COVERAGE_DATA) COVERAGE_PROCESS_START="$(CURDIR)/pyproject.toml" COVERAGE_SOURCE="$(CURDIR)/model_foundry"
PYTEST         := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile --durations=12

test: install-dev browser
	$(BIN)/python tools/coverage_imports.py
	$(COVERAGE_DATA) $(BIN)/coverage erase
	$(MEASURED) $(PYTEST) -m "not gpu" tests
	$(COVERAGE_DATA) $(BIN)/coverage combine --quiet
	$(COVERAGE_DATA) $(BIN)/coverage report --fail-under=$(COVERAGE_FLOOR)

# The inner loop (< 3 minutes): every notebook's inline tests (nbdev-test) and the tests not marked slow, no coverage.
test-quick: install-dev
	$(PYTEST) -m "not slow and not gpu" tests

# The GPU tier: CUDA training (bf16, fp16 and its loss scaler across resume), real out-of-memory retries, the batch-size
# finder, attention implementations, inductor, QLoRA on CUDA, a CUDA checkpoint resumed on CPU. CI has no GPU.
test-gpu: install-dev
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m gpu -s --durations=12 tests

export:
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/python tools/readme.py

check-clean: export
	@test -z "$$(git status --porcelain -- nbs model_foundry README.md)" || \
	  (git status --porcelain -- nbs model_foundry README.md; echo "nbdev-export / nbdev-clean / README left a diff: run 'make export' and commit"; exit 1)

# The docs test opens pages in the system's Chromium (Debian's package; no browser is downloaded).
# Installed here where apt-get can run as root; elsewhere the test skips and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt-get) for the docs browser test"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } || \
	    echo "apt-get could not install chromium: the docs browser test will skip"; \
	  else echo "no chromium and no root apt-get: the docs browser test will skip"; fi

# The docs site without Quarto: every notebook executed, nbdev's doc processors, nbconvert -> _site/index.html.
# The canonical build stays nbdev-docs (Quarto) where Quarto is installed.
docs-preview: install-dev
	$(BIN)/python tools/docs_preview.py --out _site

bench: install
	$(BIN)/python benchmarks/train_throughput.py

# JupyterLab (dev extras, with the ipywidgets frontend the playground needs), rooted at the repository so that configs/,
# data/ and runs/ are in reach, opened on nbs/. Extra options: make lab LAB_ARGS="--port 8899 --no-browser"
lab: install-dev
	$(BIN)/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root) $(LAB_ARGS)
