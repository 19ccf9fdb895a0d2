"""Killed at any point, nothing is lost: each stage is SIGKILLed at an exact point (workflow/core/faults.py,
by step or image count, never by sleeping), nothing half-written looks complete, and a plain re-run
(the stage itself, `dvc repro`, or `snakemake --rerun-incomplete`) gives bitwise the uninterrupted result."""

import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, make_repo, repo_env, sh, snapshot, tiny_dict, write_images
from workflow.core import faults
from workflow.core.artifacts import write_json
from workflow.formats import trainlog
from workflow.stages.train import GRIDS, LIVE

WEIGHTS = "models/trained/unet/diffusion_pytorch_model.safetensors"


def test_triggers_name_a_point_and_optionally_a_value():
    assert faults.triggers("train.after_step=7", "train.after_step", 7)
    assert not faults.triggers("train.after_step=7", "train.after_step", 8)
    assert not faults.triggers("train.after_step=7", "train.checkpoint.mid_save", 7)
    assert faults.triggers("sample.after_image", "sample.after_image", 3)  # no value: the first call
    assert faults.triggers("a=1, train.after_step=2", "train.after_step", 2)
    assert not faults.triggers("artifact.before_rename=metrics.json", "artifact.before_rename", "pipeline")


def stage(workdir: Path, name: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    if fault:
        env[faults.VARIABLE] = fault
    return subprocess.run(
        [sys.executable, "-m", "workflow", name], cwd=workdir, env=env, capture_output=True, text=True, timeout=600
    )


def killed(done: subprocess.CompletedProcess) -> bool:
    return done.returncode == -signal.SIGKILL


def outputs(workdir: Path) -> dict:
    return {
        "weights": (workdir / WEIGHTS).read_bytes(),
        "history": [
            (workdir / "reports/train" / trainlog.tsv(metric)).read_text() for metric in (trainlog.LOSS, trainlog.LR)
        ],
    }


def steps_saved(workdir: Path) -> list[str]:
    """The checkpoint folders of the run, complete or temporary (not the progress grids and the
    training log beside them)."""
    (run_dir,) = (workdir / "models/checkpoints").iterdir()
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and p.name not in (GRIDS, LIVE))  # no lock file


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory):
    """A folder with the tiny params (12 steps, a checkpoint every 4, keep 2) and images, and the
    outputs of one uninterrupted `python -m workflow train` there."""
    workdir = tmp_path_factory.mktemp("train")
    (workdir / "params.yaml").write_text(yaml.safe_dump(tiny_dict()))
    write_images(workdir / "data/processed/images.npy")
    done = stage(workdir, "train")
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, outputs(workdir)


# fault -> (checkpoint folders the kill leaves, the step the re-run resumes from)
TRAIN_KILLS = {
    "train.after_step=6": (["step-0000004"], 4),  # mid-interval
    "train.checkpoint.mid_save=8": ([".step-0000008.tmp", "step-0000004"], 4),  # inside a save
    "train.checkpoint.saved=8": (["step-0000004", "step-0000008"], 8),  # right after a checkpoint
    "artifact.before_rename=trained": (["step-0000008", "step-0000012"], 12),  # all trained, not published
}


@pytest.mark.parametrize("fault", ["artifact.before_rename=out", "artifact.old_aside=out"])
def test_a_folder_replaced_by_a_killed_write_is_whole_or_absent_never_half(tmp_path, fault):
    """Killed while a new folder replaces an old one: the name holds the old folder whole, or nothing
    (the old one was renamed aside in one step), never a half-deleted mix; the next write cleans up."""
    script = (
        "import sys\n"
        "from workflow.core.artifacts import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as work:\n"
        "    for i in range(50):\n"
        "        (work / f'{i}.txt').write_text(sys.argv[2])\n"
    )
    out = tmp_path / "out"

    def write(text: str, fault: str | None = None) -> int:
        env = {**os.environ, "PYTHONPATH": str(ROOT)} | ({faults.VARIABLE: fault} if fault else {})
        return subprocess.run([sys.executable, "-c", script, str(out), text], env=env).returncode

    assert write("old") == 0
    assert write("new", fault) == -signal.SIGKILL
    if fault.startswith("artifact.before_rename"):
        assert sorted(p.read_text() for p in out.iterdir()) == ["old"] * 50
    else:
        assert not out.exists()
    assert write("new") == 0
    assert sorted(p.read_text() for p in out.iterdir()) == ["new"] * 50
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the killed write's leftovers are gone


def test_a_write_leaves_the_temporary_of_a_writer_still_running_alone(tmp_path):
    """Two processes writing one artifact at once (Snakemake's cluster jobs each write logs/params/<hash>.yaml
    as they parse the Snakefile): the second's clean-up must not delete the first's work in progress. A
    temporary of a process that is gone, or too old to name its writer, is removed."""
    out = tmp_path / "params.yaml"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".params.yaml.~{sleeper.pid}~{socket.gethostname()}~abc.tmp"
        other_host = tmp_path / ".params.yaml.~1~some-other-node~def.tmp"
        dead = tmp_path / f".params.yaml.~99999999~{socket.gethostname()}~ghi.tmp"
        unnamed = tmp_path / ".params.yaml.jkl.tmp"  # an earlier version's name
        for folder in (live, other_host, dead, unnamed):
            folder.mkdir()
        write_json(out, {"a": 1})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other_host.name])
        os.utime(other_host, (time.time() - 2 * 86400,) * 2)  # a day past: its writer is taken for gone
        write_json(out, {"a": 2})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    write_json(out, {"a": 3})
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("fault", TRAIN_KILLS)
def test_train_killed_resumes_to_the_uninterrupted_weights(train_dir, tmp_path, fault):
    source, straight = train_dir
    workdir = tmp_path / "w"
    workdir.mkdir()
    for name in ("params.yaml", "data"):
        (shutil.copytree if name == "data" else shutil.copy)(source / name, workdir / name)
    done = stage(workdir, "train", fault)
    assert killed(done), (done.returncode, done.stderr[-2000:])
    left, resume_step = TRAIN_KILLS[fault]
    if left:
        assert steps_saved(workdir) == left
    assert not (workdir / "models/trained").exists() and not (workdir / "reports/train").exists()

    # a restart from 0 would give the same bits (every draw is a function of (seed, step)): it would also
    # run step `resume_step` again, which this fault kills
    done = stage(workdir, "train", f"train.after_step={resume_step}" if resume_step else None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained 12 steps" in done.stdout
    summary = yaml.safe_load((workdir / "reports/train/summary.json").read_text())
    assert summary["resumed_from_step"] == resume_step
    assert outputs(workdir) == straight  # weights and loss history, to the bit
    assert steps_saved(workdir) == ["step-0000008", "step-0000012"]  # the temporary is gone, limit kept
    assert not list((workdir / "models").glob(".*.tmp"))  # no stale temporaries left beside the outputs


def test_sample_killed_resumes_from_its_last_whole_batch_to_the_uninterrupted_set(train_dir, tmp_path):
    """Killed after image 5 of 6 (batches of 2): images 0-3 are kept, the re-run makes 4 and 5 only, and the
    set is bitwise the uninterrupted one."""
    source, _ = train_dir
    runs = {}
    for name in ("straight", "killed"):
        workdir = tmp_path / name
        workdir.mkdir()
        params = tiny_dict(sample={"batch_size": 2}, fid={"num_samples": 6})
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
        shutil.copytree(source / "models/trained", workdir / "models/trained")
        runs[name] = workdir
    assert stage(runs["straight"], "sample").returncode == 0
    killed_run = runs["killed"]
    done = stage(killed_run, "sample", "sample.after_image=5")
    assert killed(done), (done.returncode, done.stderr[-2000:])
    assert not (killed_run / "data/samples").exists() and not (killed_run / "reports/samples").exists()
    # a restart from 0 would write image 3 again, which this fault kills
    done = stage(killed_run, "sample", "sample.after_image=3")
    assert done.returncode == 0, done.stderr[-3000:]
    record = yaml.safe_load((killed_run / "data/samples/samples.json").read_text())
    assert record["resumed_from"] == 4 and record["count"] == 6

    def files(workdir: Path) -> dict:
        pngs = [*sorted((workdir / "data/samples").glob("*.png")), workdir / "reports/samples/grid.png"]
        return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in pngs}

    assert files(killed_run) == files(runs["straight"]) and len(files(killed_run)) == 7
    assert [p.name for p in (killed_run / "data/.samples.partial").iterdir()] == ["lock"]  # images published


def dvc(repo: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    if fault is None:
        sh(repo, "dvc", "repro")
        return None
    return subprocess.run(
        ["dvc", "repro"],
        cwd=repo,
        env=repo_env(**{faults.VARIABLE: fault}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def killed_by_sigkill(dvc_stderr: str) -> bool:
    """DVC runs a stage's cmd through $SHELL: bash execs it (dvc reports -9), other shells such as dash
    wait on it and exit 128 + 9, so both spellings mean the fault point fired."""
    return re.search(r"exited with (-9|137)\b", dvc_stderr) is not None


@pytest.mark.e2e
def test_dvc_repro_after_kills_in_every_stage_equals_the_uninterrupted_run(dvc_repo, tmp_path):
    """One pipeline, killed in preprocess, train (inside its last checkpoint save), sample (mid-stream)
    and evaluate (metrics written, not yet in place), re-run each time with `dvc repro`."""
    _, uninterrupted = dvc_repo
    repo = make_repo(tmp_path)
    gone = {
        "preprocess.after_image=10": ["data/processed/images.npy", "data/processed/meta.json"],
        "train.checkpoint.mid_save=16": ["models/trained", "reports/train"],
        "sample.after_image=3": ["data/samples", "reports/samples/grid.png"],
        "artifact.before_rename=metrics.json": ["reports/metrics.json"],
    }
    for fault, absent in gone.items():
        done = dvc(repo, fault)
        assert done.returncode != 0 and killed_by_sigkill(done.stderr), (fault, done.stderr[-2000:])
        assert not [path for path in absent if (repo / path).exists()], fault
    dvc(repo)
    assert snapshot(repo) == uninterrupted


@pytest.mark.e2e
def test_snakemake_rerun_incomplete_after_a_kill_in_train(dvc_repo, tmp_path):
    _, uninterrupted = dvc_repo
    repo = make_repo(tmp_path)
    env = repo_env(**{faults.VARIABLE: "train.after_step=12"})
    done = subprocess.run(
        ["snakemake", "--cores", "2", "train"], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0 and not (repo / "models/trained").exists()
    sh(repo, "snakemake", "--cores", "2", "--rerun-incomplete", "train")
    assert (repo / WEIGHTS).read_bytes() == uninterrupted["weights"]


def limited_files(limit: int):
    """preexec_fn: files may grow to `limit` bytes; past it a write fails with EFBIG (as on a full disk)
    instead of the process being killed by SIGXFSZ. Works unprivileged, on any filesystem."""

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_full_disk_in_a_checkpoint_save_is_one_clear_error_and_loses_nothing(train_dir, tmp_path):
    source, straight = train_dir
    workdir = tmp_path / "w"
    shutil.copytree(source, workdir)
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["train"]["learning_rate"] = 1e-3  # a new run, beside the finished one
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "train"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limited_files(64 * 1024),
    )  # < the weights file
    assert done.returncode == 1, done.stderr[-3000:]
    (line,) = [ln.split("error in stage train:")[1] for ln in done.stderr.splitlines() if "error in stage" in ln]
    assert "[Errno 27] out of disk space (or over the file-size limit) while writing models/checkpoints/" in line
    assert "/step-0000004: SafetensorError" in line and "Traceback" not in done.stderr
    for path, data in before.items():  # every earlier artifact intact, byte for byte
        assert path.name == "params.yaml" or path.read_bytes() == data, path
    from workflow.formats.checkpoints import complete_checkpoints, latest_checkpoint

    runs = sorted((workdir / "models/checkpoints").iterdir(), key=lambda p: p.stat().st_mtime)
    assert [len(complete_checkpoints(r)) for r in runs] == [2, 0]
    # the failed save took its partial files with it; the progress grid made just before it and the
    # training log so far stay (a re-run makes the same grid again and re-writes the log)
    assert sorted(p.name for p in runs[1].iterdir() if p.is_dir()) == [LIVE, GRIDS]
    assert latest_checkpoint(runs[0]).name == "step-0000012"  # and the finished run still verifies


def test_full_disk_in_preprocess_names_the_artifact(tmp_path):
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"data": {"source": "builtin:digits", "resolution": 32, "channels": 3}})
    )
    env = {k: v for k, v in os.environ.items() if k != faults.VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    assert stage(tmp_path, "download").returncode == 0
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "preprocess"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limited_files(1 << 20),
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "out of disk space (or over the file-size limit) while writing data/processed/images.npy" in done.stderr
    assert not (tmp_path / "data/processed").exists() or not list((tmp_path / "data/processed").iterdir())
