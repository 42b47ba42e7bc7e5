# `make test` and `make demo` work on a fresh clone: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench lint clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

venv: $(STAMP)

# pytest exits 5 when it collects nothing: that is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: $(STAMP)
	$(PY) demo.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
