"""The tiny pipeline through `snakemake --profile profiles/slurm` on a real single-node SLURM
(tests/cluster.py): each computing stage is a SLURM job, submitted by snakemake-executor-plugin-slurm,
and the result is bitwise the local `dvc exp run`'s."""

import re
import subprocess
import sys

import pytest

from tests.helpers import make_repo, repo_env, snapshot

pytestmark = pytest.mark.e2e

COMPUTING = {"fid_reference", "train", "sample", "evaluate", "fid_sweep"}
# What each job asks for, within the test cluster's one node (2 CPUs, 4000 MB, one GPU device).
CLUSTER = "cluster={cpus_per_task: 2, mem_mb: 1500, runtime: 10}"


def test_the_tiny_pipeline_on_slurm_equals_the_local_run(slurm, dvc_repo, tmp_path):
    _, local = dvc_repo
    repo = make_repo(tmp_path)
    env = repo_env(SLURM_CONF=slurm.env["SLURM_CONF"])
    env["PATH"] = slurm.env["PATH"].split(":", 1)[0] + ":" + env["PATH"]  # the client wrappers first
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--profile",
            "profiles/slurm",
            "--config",
            CLUSTER,
            # the plugin's first look at a job: after 1 s, not 40 (the jobs here take seconds)
            "--slurm-init-seconds-before-status-checks",
            "1",
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # the plugin waits forever if it cannot read a job's state: fail instead
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    assert snapshot(repo) == local

    # each computing stage was a SLURM job, asking for what `cluster` says, and completed; nothing else ran there
    jobs = {job_id: rule for rule, job_id in re.findall(r"slurm_logs/rule_(\w+)/(?:\S*/)?(\d+)\.log", done.stderr)}
    assert sorted(jobs.values()) == sorted(COMPUTING), done.stderr[-3000:]
    records = {
        re.search(r"\bJobId=(\d+)", line).group(1): line
        for line in slurm.jobcomp.read_text().splitlines()
        if f"WorkDir={repo} " in line
    }
    assert set(records) == set(jobs), records
    for job_id, line in records.items():
        assert "JobState=COMPLETED" in line and "ExitCode=0:0" in line, (jobs[job_id], line)
        # what it asked for (slurmctld keeps a finished job's record for MinJobAge, 3,600 s)
        shown = subprocess.run(
            ["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True, check=True
        ).stdout
        for field in ("NumCPUs=2 ", "TimeLimit=00:10:00 ", "MinMemoryNode=1500M ", "gres:gpu:1"):
            assert field in shown, (jobs[job_id], field, shown)
