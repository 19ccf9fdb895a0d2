# make setup   create .venv with the pinned stack (requirements.txt)
# make run     setup + dvc repro on the default params (embedded MNIST, CPU is fine)
# make test    setup + the test dependencies (requirements-test.txt) + the whole test suite
# make smk     setup + the same pipeline through Snakemake

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The stages run as `python -m workflow ...`: put the venv first so dvc and snakemake find it.
export PATH := $(BIN):$(PATH)
export PYTHONPATH := $(CURDIR)

.PHONY: setup run test smk clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

run: setup
	dvc repro
	@echo "report: reports/index.html   metrics: reports/metrics.json"

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

test: $(VENV)/.installed-test
	python -m pytest

smk: setup
	snakemake --cores all

clean-outputs:
	rm -rf data/raw data/processed data/samples models/pipeline models/checkpoints reports/train reports/samples reports/index.html reports/metrics.json
