# adbench: `make demo` and `make test` work from a fresh clone (they create .venv and install everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch/torchvision pair installed first; override for your platform, e.g. make install TORCH="torch torchvision"
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slurm lint bench reproduce clean

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
	@echo "make test: the Slurm tests (-m slurm) were not run: they need a Slurm cluster; as root, make test-slurm starts one"

# The tests marked slurm, against a one-node Slurm with accounting on localhost (root: installs Debian's packages).
SLURM_LOCAL_DIR ?= /tmp/adbench-slurm
test-slurm: install
	export SLURM_LOCAL_DIR=$(SLURM_LOCAL_DIR) SLURM_CONF=$(SLURM_LOCAL_DIR)/slurm.conf; \
	scripts/slurm_local.sh start && $(BIN)/python -m pytest -m slurm tests/test_slurm.py; \
	rc=$$?; scripts/slurm_local.sh stop; exit $$rc

# Every detector on the same data (MTD under ADBENCH_DATA, else synthetic), 256 px, Lite0: results/bench.md.
bench: install
	$(BIN)/python scripts/bench.py

# The published grid (4 detectors x MVTec AD + BTAD x 3 seeds, paper settings): a GPU job; needs the datasets.
reproduce: install
	@echo "make reproduce: the four flow detectors at paper settings on MVTec AD + BTAD, 3 seeds (a GPU job; needs mvtec/ and btad/ under ADBENCH_DATA: adbench download mvtec, adbench download btad). Cells: adbench sweep grids/reproduce.toml --dry-run"
	$(BIN)/adbench sweep grids/reproduce.toml --results-dir results/reproduce $(SWEEP_ARGS)
	$(BIN)/adbench report --results-dir results/reproduce --output results/reproduce.md

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
