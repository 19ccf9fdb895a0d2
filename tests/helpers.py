"""Helpers that more than one test module uses: constants and plain functions, no tests, no fixtures.

What belongs here: anything a test module needs from elsewhere in tests/ (fixtures and pytest settings
go in conftest.py; the Hub mirror in mirror.py, the headless browser in browser.py); test modules and
conftest.py import helpers from here, never from conftest.py or from another test module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from workflow.core.artifacts import manifest_damage
from workflow.core.config import Params, overlay
from workflow.formats import trainlog

ROOT = Path(__file__).resolve().parents[1]

# The one tiny configuration: every stage runs in seconds on a 2-core CPU. Tests that need other values
# derive them from it with tiny_dict(section={key: value}).
TINY = {
    "seed": 0,
    "data": {"source": "builtin:mnist", "resolution": 8, "channels": 1, "max_images": 32},
    "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1], "norm_num_groups": 8},
    "train": {
        "batch_size": 8,
        "max_steps": 12,
        "warmup_steps": 2,
        "log_every": 4,
        "checkpoint_every": 4,
        "checkpoints_total_limit": 2,
    },
    "sample": {"sampler": "ddim", "num_inference_steps": 4, "grid_size": 2, "batch_size": 6},
    "fid": {"num_samples": 6, "num_reference": 6, "batch_size": 6},
}


def merged(raw: dict, **overrides) -> dict:
    """A copy of `raw` with `section={key: value}` overrides merged into its sections (other values replace)."""
    return overlay(raw, overrides)


def tiny_dict(**overrides) -> dict:
    """TINY with `section={key: value}` overrides merged in."""
    return merged(TINY, **overrides)


# The tiny params of a whole pipeline run in a test repository (make_repo): 64 images, 16 steps, a
# checkpoint (and a progress grid) at steps 8 and 16; every other value as in params.yaml.
TINY_REPO = tiny_dict(
    data={"max_images": 64, "min_images": 2},
    train={"batch_size": 16, "max_steps": 16, "checkpoint_every": 8},
    sample={"batch_size": 8},
    fid={"num_samples": 8, "num_reference": 8, "batch_size": 8},
)
PACKAGED_WEIGHTS = "models/pipeline/unet/diffusion_pytorch_model.safetensors"
QUALITY = ("fid", "kid", "train_loss_final", "num_parameters", "fid_num_samples", "fid_num_reference")


def write_images(path: str | Path, n: int = 24, channels: int = 1, size: int = 8, seed: int = 0) -> np.ndarray:
    """A small uint8 N x C x H x W array, as preprocess writes it."""
    images = np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    return images


def train_history(params: Params) -> dict:
    """The training log's loss and learning-rate rows (dvclive's files under paths.train_log), parsed."""
    log = Path(params.paths.train_log)
    texts = [(log / trainlog.tsv(metric)).read_text() for metric in (trainlog.LOSS, trainlog.LR)]
    return trainlog.parse_history(*texts, str(log))


# --- test repositories: a copy of the project, run with the real dvc and snakemake ----------------------


def repo_env(**extra: str) -> dict:
    """This process's environment as a test repository's commands get it: no PYTHONPATH (they run the
    copy's code), and this venv's `python`, `dvc` and `snakemake` first on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def run(repo: Path, *cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cmd` in `repo`, as a user runs it there; the caller checks the outcome."""
    return subprocess.run(cmd, cwd=repo, env=repo_env(), capture_output=True, text=True, timeout=timeout)


def sh(repo: Path, *cmd: str, timeout: int = 600) -> str:
    """`cmd` in `repo`, which must succeed: its stdout."""
    done = run(repo, *cmd, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


# What a run records about itself: never copied, so a test repository starts with no run, whatever
# the checkout holds (after `make run` its dvc.lock names outputs only the checkout's cache has).
RUN_RECORDS = {"dvc.lock"}


def project_files(source: Path = ROOT) -> list:
    """The files git tracks in `source` (as they are in its working tree), less the run records:
    untracked files and results a run leaves behind are not part of the project (`git add` a new
    file for the end-to-end tests to see it)."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached"], cwd=source, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    return [name for name in files if name and name not in RUN_RECORDS and (source / name).is_file()]


def make_repo(path: Path, source: Path = ROOT, **overrides) -> Path:
    """A git repository with the project's files (as a fresh clone has them) and TINY_REPO's params,
    with `section={key: value}` overrides merged in."""
    for name in project_files(source):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, path / name)
    params = merged(merged(yaml.safe_load((source / "params.yaml").read_text()), **TINY_REPO), **overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"],
    ):
        subprocess.run(cmd, cwd=path, check=True)
    return path


def snapshot(repo: Path) -> dict:
    """What two runs of the pipeline in `repo` must agree on, bit for bit."""
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    return {
        "weights": (repo / PACKAGED_WEIGHTS).read_bytes(),
        "samples": [p.read_bytes() for p in sorted((repo / "data/samples").glob("*.png"))],
        "images": (repo / "data/processed/images.npy").read_bytes(),
        "grids": [p.read_bytes() for p in sorted((repo / "reports/train/grids").glob("*.png"))],
        "quality": {k: metrics[k] for k in QUALITY},
    }


# --- the model card (the package stage) ------------------------------------------------------------------


def card_parts(card: str) -> tuple[dict, str]:
    """(the YAML front matter, parsed; the Markdown body) of a model card."""
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def card_snippet(body: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    return code


def check_card(root: Path, params: Params) -> None:
    """The card in `root`/paths.pipeline against the artifacts of the run in `root`, value for value;
    its three usage lines run as written, from `root`."""
    from huggingface_hub import ModelCard

    paths = params.paths
    folder = root / paths.pipeline
    meta, body = card_parts((folder / "README.md").read_text())
    metrics = json.loads((root / paths.metrics).read_text())
    source = json.loads((root / paths.raw / "SOURCE.json").read_text())
    summary = json.loads((root / paths.train_log / "summary.json").read_text())

    conditional = (folder / "class_names.json").is_file()  # a class-conditional model, with its pipeline.py
    task = "class-conditional-image-generation" if conditional else "unconditional-image-generation"
    assert meta["library_name"] == "diffusers" and meta.get("pipeline_tag") == (None if conditional else task)
    assert {"diffusers", task} <= set(meta["tags"])
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == task
    if source["kind"] == "hf":
        assert meta["datasets"] == [source["repo_id"]] == [result["dataset"]["type"]]
        assert result["dataset"]["revision"] == source["sha"] and result["dataset"]["split"] == source["split"]
        assert result["dataset"].get("config") == source.get("config")
    else:
        from workflow.stages.package import local_name

        local = params.data.kind == "imagefolder"
        named = f"imagefolder:{local_name(params.data.location)}" if local else params.data.source
        assert "datasets" not in meta and result["dataset"]["type"] == named
    scores = {m["type"]: m for m in result["metrics"]}
    assert set(scores) == {"fid", "kid"}
    for kind, score in scores.items():
        assert score["value"] == metrics[kind]
        assert score["args"]["num_samples"] == metrics["fid_num_samples"] == params.fid.num_samples
        assert score["args"]["num_reference"] == metrics["fid_num_reference"]
        assert score["args"]["sampler"] == params.sample.sampler
        assert score["args"]["num_inference_steps"] == params.sample.num_inference_steps
        # null: the schedule's own, "leading" in every pipeline the tests make
        assert score["args"]["timestep_spacing"] == (params.sample.timestep_spacing or "leading")
        if conditional:
            assert score["args"]["guidance_scale"] == params.sample.guidance_scale
    parsed = ModelCard.load(folder / "README.md").data  # the Hub's own parser
    assert parsed.library_name == "diffusers" and {r.metric_type for r in parsed.eval_results} == {"fid", "kid"}

    assert "](samples.png)" in body
    assert (folder / "samples.png").read_bytes() == (root / paths.grid).read_bytes()
    (recipe,) = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
    assert yaml.safe_load(recipe) == {
        "seed": params.seed,
        **{k: params.to_dict()[k] for k in ("data", "model", "scheduler", "train")},
    }
    assert f"{summary['steps']:,} steps" in body and summary["device_name"] in body
    assert all(f"{name} {version}" in body for name, version in summary["software"].items())
    assert manifest_damage(folder) is None

    code = card_snippet(body)
    assert len(code.splitlines()) == 3 and f"from_pretrained({paths.pipeline!r}" in code
    here = os.getcwd()
    os.chdir(root)
    try:
        namespace = {}
        exec(code, namespace)  # noqa: S102 -- the card's own text, as a reader would paste it
    finally:
        os.chdir(here)
    images = namespace["images"]
    size = params.data.resolution
    count = params.sample.grid_size if conditional else params.sample.grid_size**2
    assert len(images) == count and all(im.size == (size, size) for im in images)
    assert len({im.tobytes() for im in images}) == len(images)  # distinct samples, not a constant


def wait_for(condition, what: str, seconds: float = 120.0) -> None:
    """Until `condition()`; `seconds` is a hang guard, not a bound anything is measured against."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def blocked_on_flock(pid: int, path: Path) -> bool:
    """Whether process `pid` waits for a flock on `path` (/proc/locks lists a waiter as `-> FLOCK`)."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        waiter = fields[1] == "->" and fields[2] == "FLOCK" and fields[5] == str(pid)
        if waiter and int(fields[6].split(":")[2]) == inode:
            return True
    return False
