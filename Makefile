# Two commands on a fresh machine: `make demo` (the whole pipeline on procedural data) and `make test`.
# Each creates .venv and installs the package with its dev extras the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: install demo test test-slow test-all bench clean

# constraints.txt pins the exact versions we test with; pyproject.toml only states the supported ranges
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dualsynth demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PY) -m pytest -q -n auto

# tests on the real datasets in ../shared and long trainings
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_threads.py
	$(PY) benchmarks/bench_vqvae.py
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_prior_gate.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
