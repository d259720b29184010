# adbench: `make demo` and `make test` work from a fresh clone (they create .venv and install everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair installed first; override for your platform, e.g. make install TORCH="torch torchvision"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# FastFlow on the built-in synthetic dataset with the offline EfficientNet-Lite0 backbone (a few minutes on 2 cores).
demo: install
	$(BIN)/adbench run --model fastflow --dataset synthetic --category all --results-dir results/demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
