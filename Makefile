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

# Train the default model on simulated phantoms, then predict a simulated BIDS subject.
demo: $(STAMP)
	$(PY) scripts/train.py paths.output_dir=$(DEMO_DIR)/train
	$(VENV)/bin/qsmnet simulate --out $(DEMO_DIR)/bids --subject demo --seed 7
	$(VENV)/bin/qsmnet predict --bids $(DEMO_DIR)/bids --method $(DEMO_DIR)/train/checkpoints/last.ckpt --overwrite
	@echo "chi map: $(DEMO_DIR)/bids/derivatives/qsmnet/sub-demo/anat/"

test: $(STAMP)
	$(PY) -m pytest

test-full: $(STAMP)
	$(PY) -m pytest -m "slow or not slow"

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache $(DEMO_DIR)
