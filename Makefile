# qsmnet front door. `make demo` and `make test` each do all the set-up they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qsmnet-installed
DEMO_DIR ?= demo

.PHONY: setup demo test test-full benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# A bare `torch` requirement would pull several GB of CUDA wheels: install the CPU build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# A short training run (1-3 min), a simulated BIDS subject reconstructed with the shipped model
# and TV (and the demo model), scored against the simulated truth (scripts/demo.py).
demo: $(STAMP)
	$(PY) scripts/demo.py --out $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest

test-full: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_DIR)
