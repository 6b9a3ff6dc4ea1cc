# skytune — `make demo` and `make test` do all set-up on a fresh machine.
#   make demo    venv + install + the demo job end to end on this machine (tiny model, CPU ok)
#   make test    dev extras + unit and integration tests (what CI runs)
#   make lint    ruff
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PIP     := $(BIN)/pip install -q -c constraints.txt
STAMP   := $(VENV)/.stamp

.PHONY: demo test lint install install-dev clean

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

clean:
	rm -rf $(VENV) runs models .skytune
