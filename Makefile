# The two README commands: `make run` (install, then the default DAG) and `make test`.
VENV ?= .venv
CORES ?= 2
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
BIN := $(VENV)/bin

.PHONY: install run test dry-run report

install: $(VENV)/.certbench-installed

$(VENV)/.certbench-installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

run: install
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPUS)

dry-run: install
	$(BIN)/snakemake -n --cores 8 --resources gpu=2

report: install
	$(BIN)/snakemake --cores $(CORES) --report results/report.html

test: install
	$(BIN)/python -m pytest -q -n 2
