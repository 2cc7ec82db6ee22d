# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
DEMO_DIR ?= demo-output

# The newest dependencies on Python 3.13 (zarr 3.4+), in a venv of their own.
PY313 ?= $(shell PYENV_VERSION=3.13.0 pyenv which python3.13 2>/dev/null || command -v python3.13)
VENV_NEWEST ?= .venv-newest

.PHONY: demo test test-newest test-minimum lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is pinned in pyproject (==2.13.*): pip takes the CPU build from local disk.
$(STAMP_RUN): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[demo]'
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) check
	touch $@ $(STAMP_RUN)

demo: $(STAMP_RUN)
	$(PY) -m examples.digits.run --out $(DEMO_DIR)

test: $(STAMP_DEV)
	$(PY) -m pytest -q

# CI's second run: a fresh venv on Python 3.13, newest releases of everything.
test-newest:
	@test -n "$(PY313)" || { echo "python3.13 not found (pyenv install 3.13)"; exit 2; }
	$(PY313) -m venv $(VENV_NEWEST)
	$(VENV_NEWEST)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_NEWEST)/bin/python -m pip install --quiet --upgrade -e '.[dev]'
	$(VENV_NEWEST)/bin/python -m pip check
	$(VENV_NEWEST)/bin/python -m pytest -q

# The lowest versions pyproject.toml declares (.ci/minimum.txt), on Python 3.11:
# the dev extras first, then the runtime dependencies taken down to their minimums.
VENV_MINIMUM ?= .venv-minimum
test-minimum:
	$(PYTHON) -m venv $(VENV_MINIMUM)
	$(VENV_MINIMUM)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_MINIMUM)/bin/python -m pip install --quiet -e '.[dev]'
	$(VENV_MINIMUM)/bin/python -m pip install --quiet -r .ci/minimum.txt
	$(VENV_MINIMUM)/bin/python -m pip check
	$(VENV_MINIMUM)/bin/python -m pytest -q

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check gramlin_analyze tests benchmarks examples
	$(VENV)/bin/ruff format --check gramlin_analyze tests benchmarks examples
	$(VENV)/bin/mypy

bench: $(STAMP_DEV)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/capture.py --repeats 5
	$(PY) benchmarks/reduce.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build dist *.egg-info $(VENV_NEWEST) $(VENV_MINIMUM)
