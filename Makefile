# The two README commands: `make run` (install, the default DAG, then results/report.html) and `make test`.
VENV ?= .venv
CORES ?= 2
GPUS ?= $(shell nvidia-smi -L 2>/dev/null | wc -l)
BIN := $(VENV)/bin
REPORT ?= results/report.html

.PHONY: install run test dry-run report

install: $(VENV)/.certbench-installed

$(VENV)/.certbench-installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

# The DAG, then the report (every table inline, every figure, the audit verdict on its first page).
run: install
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPUS)
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPUS) --report $(REPORT)

dry-run: install
	$(BIN)/snakemake -n --cores 8 --resources gpu=2

report: install
	$(BIN)/snakemake --cores $(CORES) --resources gpu=$(GPUS) --report $(REPORT)

# Lint and format checks first (seconds), then the tests.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/snakefmt --check Snakefile workflow
	$(BIN)/python -m pytest -q -n 2
