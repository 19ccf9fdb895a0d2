# make setup   create .venv with the pinned stack (requirements.txt)
# make run      setup + the pipeline on the default params (embedded MNIST, CPU is fine), recorded
#               as a DVC experiment (`dvc exp run`; plain `dvc repro` outside a git checkout)
# make run CONFIG=configs/<preset>.yaml   a preset, as a DVC experiment run beside the workspace
# make compare  reports/experiments.html: this commit's experiments side by side
# make pull     the workspace's DVC outputs from the default remote (REMOTE=s3 for another), every object
#               checked against its md5: a corrupt one is named and never checked out (python -m workflow pull)
# make test     setup + the test dependencies (requirements-test.txt) + Chromium + SLURM + ruff (lint, format) + the whole test suite
# make smk      setup + the same pipeline through Snakemake (CONFIG=... as `--configfile`)

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The stages run as `python -m workflow ...`: put the venv first so dvc and snakemake find it.
export PATH := $(BIN):$(PATH)
export PYTHONPATH := $(CURDIR)

.PHONY: setup run compare pull test browser slurm smk clean-outputs

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "the pinned stack (numpy, snakemake, diffusers) needs Python 3.11 or newer: make PYTHON=python3.11 ..." >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# `dvc exp run` is `dvc repro` that also records the run as an experiment, so `make compare` shows
# it beside later `dvc exp run -S ...` experiments (their results replace it in the workspace).
# With CONFIG, the preset's keys become `dvc exp run -S key=value` arguments (checked first: a mistake
# stops here, naming the key and the file), and `--temp` runs the experiment in a copy of the workspace:
# params.yaml (your edits included in the run) and the workspace's results stay as they are. Outside a
# git work tree (an unpacked archive) it is a plain `dvc repro`, with DVC's core.no_scm set in
# .dvc/config.local (unset again once the folder is a git checkout with a commit).
run: setup
ifdef CONFIG
	@git rev-parse --verify --quiet HEAD >/dev/null 2>&1 || \
		{ echo "make run CONFIG=... records a DVC experiment: it needs a git checkout with a commit" >&2; exit 2; }
	overrides="$$(python -m workflow preset '$(CONFIG)')" && eval "dvc exp run --temp $$overrides"
	@echo "compare runs: dvc exp show, make compare   its outputs and params in the workspace: dvc exp apply NAME"
else
	if git rev-parse --verify --quiet HEAD >/dev/null 2>&1; then \
		{ ! grep -qs no_scm .dvc/config.local || dvc config --local --unset core.no_scm; }; dvc exp run; else \
		git rev-parse --is-inside-work-tree >/dev/null 2>&1 || dvc config --local core.no_scm true; dvc repro; fi
	@echo "report: reports/index.html   metrics: reports/metrics.json   compare runs: make compare"
endif

compare: setup
	python -m workflow compare

pull: setup
	python -m workflow pull $(if $(REMOTE),-r '$(REMOTE)')

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -r requirements-test.txt
	touch $@

# ruff first: a lint or formatting slip fails in seconds, before the suite. The suite runs on
# TEST_WORKERS processes (pytest-xdist), each taking a whole test module at a time (its module fixtures
# are made once): most of a test's time is one process importing torch or starting dvc, so two workers
# keep both cores of a small box busy.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test browser slurm
	ruff check .
	ruff format --check .
	python -m pytest -n $(TEST_WORKERS) --dist loadfile

# The page tests open the reports in Debian's headless Chromium through its chromedriver.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# The cluster test (tests/test_slurm.py) starts a single-node SLURM from Debian's packages: no daemon of
# theirs is started here (the test runs its own, on loopback, from a scratch folder).
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v slurmctld >/dev/null && command -v slurmd >/dev/null && \
		command -v munged >/dev/null && command -v sbatch >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge; }

smk: setup
	snakemake --cores all $(if $(CONFIG),--configfile '$(CONFIG)')

# The default paths' outputs; the folders' tracked .gitignore and README files stay.
clean-outputs:
	rm -rf data/raw data/samples models/base models/trained models/pipeline models/checkpoints reports/train reports/index.html reports/loss.png reports/metrics.json reports/fid_steps.csv reports/fid_guidance.csv reports/experiments.html reports/snakemake.html
	find data/processed reports/samples -mindepth 1 ! -name .gitignore -exec rm -rf {} +
