"""A real single-node SLURM on loopback for the tests: munge + slurmctld + slurmd from Debian's packages.

    def test_x(slurm):                     # the session fixture (a pytest plugin: tests/conftest.py)
        subprocess.run([..., "snakemake", "--profile", "profiles/slurm"], env=slurm.env)
        slurm.jobcomp.read_text()          # SLURM's record of every finished job (JobId=..., JobState=...)

`make test` installs the packages (slurmctld, slurmd, slurm-client, munge); without them the tests that
ask for the fixture skip, saying so. The cluster runs as the current user from a scratch folder in /tmp
(munge needs every folder above its socket to be world-executable, which pytest's own tmp folders are
not), on two free ports, so two test sessions on one machine each get their own. tests/slurm/ holds the
configuration: one node `c1` with 2 CPUs and one GPU device (/dev/null, so a GPU job gets
CUDA_VISIBLE_DEVICES=0), no accounting daemon and no cgroups. Teardown cancels the jobs, then stops the
daemons by their PIDs (never by name: other sessions' daemons may share the machine).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.helpers import ROOT
from tests.mirror import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
# Client commands get SLURM_CONF from a wrapper first on PATH: the jobstep plugin strips SLURM_* from the
# environment of its inner `srun` (which then cannot find the cluster), but keeps PATH.
CLIENTS = ("srun", "sbatch", "squeue", "scancel", "scontrol", "sinfo", "sacct")


def program(name: str) -> str | None:
    """Its path; the daemons sit in /usr/sbin, which an ordinary user's PATH may lack."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")


def missing_programs() -> list:
    return [name for name in (*DAEMONS, *CLIENTS) if program(name) is None]


def wait_until(check, what: str, processes: dict, folder: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for name, process in processes.items():
            if process.poll() is not None:
                log = folder / f"{name}.out"
                pytest.fail(f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"SLURM: {what} within {timeout:.0f} s; logs in {folder}")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm():
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): `make test` installs it (Debian packages)")
    folder = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    folder.chmod(0o755)
    for sub in ("state", "spool", "bin"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    template = (ROOT / "tests/slurm/slurm.conf.in").read_text()
    conf.write_text(
        template.format(
            d=folder,
            host=socket.gethostname().split(".")[0],
            user=getpass.getuser(),
            ctl_port=free_port(),
            d_port=free_port(),
        )
    )
    shutil.copy(ROOT / "tests/slurm/gres.conf", folder / "gres.conf")
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    for name in CLIENTS:
        wrapper = folder / "bin" / name
        wrapper.write_text(f'#!/bin/sh\nSLURM_CONF={conf} exec {program(name)} "$@"\n')
        wrapper.chmod(0o755)
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{folder / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    commands = {
        "munged": [
            program("munged"),
            "-F",
            f"--socket={folder / 'munge.sock'}",
            f"--key-file={key}",
            f"--pid-file={folder / 'munged.pid'}",
            f"--seed-file={folder / 'munged.seed'}",
        ],
        "slurmctld": [program("slurmctld"), "-D", "-i"],
        "slurmd": [program("slurmd"), "-D", "-N", "c1"],
    }
    ready = {
        "munged": (lambda: (folder / "munge.sock").exists(), "munged's socket"),
        "slurmctld": (lambda: run_ok(["scontrol", "ping"], env), "slurmctld answering"),
        "slurmd": (lambda: node_state(env) == "idle", "node c1 idle"),
    }
    processes = {}
    try:
        for name, command in commands.items():
            with open(folder / f"{name}.out", "wb") as out:
                processes[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            check, what = ready[name]
            wait_until(check, what, processes, folder)
        yield SimpleNamespace(dir=folder, env=env, jobcomp=folder / "jobcomp.log")
    finally:
        if "slurmd" in processes:  # a running job's slurmstepd outlives slurmd: cancel the jobs first
            subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True, check=False)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and running_jobs(env):
                time.sleep(0.2)
        for process in reversed(processes.values()):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def run_ok(command: list, env: dict) -> bool:
    return subprocess.run(command, env=env, capture_output=True, check=False).returncode == 0


def node_state(env: dict) -> str:
    listed = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
    return listed.stdout.strip()


def running_jobs(env: dict) -> str:
    return subprocess.run(["squeue", "-h", "-t", "R,CG"], env=env, capture_output=True, text=True, check=False).stdout
