"""Shared fixtures and pytest settings (helpers that test modules import: tests/helpers.py)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from datetime import timedelta

import pytest
import yaml
from hypothesis import settings

from tests.helpers import make_repo, sh, snapshot, tiny_dict
from workflow.core.config import params_from_dict

# Session fixtures for every test module that asks: the Hugging Face mirror server (olah), `mirror`; the S3
# servers (moto, SeaweedFS), `moto` and `seaweed` (tests/s3.py); a single-node SLURM, `slurm` (tests/cluster.py).
pytest_plugins = ["tests.mirror", "tests.s3", "tests.cluster"]

# Each pytest process (each xdist worker too) has device slots of its own (workflow/core/slots.py): the stages
# the tests run never wait for another session's, a parallel worker's or the machine's other runs.
os.environ["WORKFLOW_SLOT_DIR"] = tempfile.mkdtemp(prefix="pytest-slots-")
atexit.register(shutil.rmtree, os.environ["WORKFLOW_SLOT_DIR"], ignore_errors=True)
# `make test` runs two workers on what may be two cores: torch's OpenMP threads then sleep when idle instead
# of spinning for the other process's cores (measured: two tiny pipelines side by side 18% sooner). It
# changes no result, only how idle threads wait.
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# Property tests run the same examples on every run and machine (CI included): derandomized, no example
# database carried between runs, and a deadline per example, so a value that makes the code hang fails
# the test instead of hanging it. The deadline guards against hangs only, far above any example's time
# (the slowest, a meta-device build of the largest UNet the bounds allow, takes about 2 s on the 2-core
# box and twice that on a slow day): a loaded CI machine must not fail a correct example.
# HYPOTHESIS_PROFILE=explore searches afresh (random, more examples).
HANG = timedelta(seconds=60)
settings.register_profile("ci", derandomize=True, database=None, deadline=HANG, print_blob=True)
settings.register_profile("explore", deadline=HANG, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def one_thread():
    """One torch thread for tests that step models in this process: two threads on a 2-core machine that
    is busy elsewhere crawl (OpenMP barriers: ~0.2 s a tiny step on one thread, ~10 s on two)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    """Tiny Params with every relative path landing in tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)

    def make(**overrides):
        raw = tiny_dict(**overrides)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        return params_from_dict(raw)

    return make


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory):
    """(repo, snapshot) of one uninterrupted run of the tiny end-to-end config, as `make run` makes it in a
    git checkout (`dvc exp run`, here named "baseline"), shared by the end-to-end tests and the fault
    tests, which compare their interrupted-and-resumed runs with it."""
    repo = make_repo(tmp_path_factory.mktemp("dvc"))
    sh(repo, "dvc", "exp", "run", "-n", "baseline")
    return repo, snapshot(repo)
