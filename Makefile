# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
DEMO_DIR ?= demo-output

.PHONY: demo test lint bench clean

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

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check gramlin_analyze tests benchmarks examples

bench: $(STAMP_DEV)
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/capture.py --repeats 5
	$(PY) benchmarks/reduce.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build dist *.egg-info
