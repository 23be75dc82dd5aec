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

.PHONY: run test install install-dev export clean-nbs readme check-clean bench

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

test: install-dev
	$(BIN)/nbdev-test --n-workers 2
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -m "not gpu" tests

export:
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/python tools/readme.py

check-clean: export
	@test -z "$$(git status --porcelain -- nbs model_foundry README.md)" || \
	  (git status --porcelain -- nbs model_foundry README.md; echo "nbdev-export / nbdev-clean / README left a diff: run 'make export' and commit"; exit 1)

bench: install
	$(BIN)/python benchmarks/train_throughput.py
