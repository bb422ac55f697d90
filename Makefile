# Everything runs in a virtual environment this Makefile creates (.venv):
# torchvision from the package index only imports beside the index's own torch build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ttcompress demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_tt_linear.py --repeats 3
	$(BIN)/python benchmarks/bench_cp_conv.py
	$(BIN)/python benchmarks/bench_finetune.py --epochs 3

clean:
	rm -rf $(VENV) build *.egg-info
