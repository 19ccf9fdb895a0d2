"""Damaged artifacts are detected, never used: a truncated or altered checkpoint is skipped (with a
warning) for the one before, and resuming from it still gives the uninterrupted weights; a damaged
pipeline is refused by the sample stage, and damaged training images or FID reference statistics by each
stage that reads them, with a message naming the file and the stage that makes it."""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.helpers import ROOT, write_images
from workflow.core import faults
from workflow.core.config import ConfigError, load_params
from workflow.formats import checkpoints
from workflow.stages import download, evaluate, fid_reference, fid_sweep, preprocess
from workflow.stages.sample import run as sample
from workflow.stages.train import run as train

WEIGHTS = "models/trained/unet/diffusion_pytorch_model.safetensors"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def trained(tiny_params):
    """Tiny params, trained once (12 steps, checkpoints at 8 and 12 kept); returns (params, weights,
    restore), where restore() puts models/ back as that run left it."""
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    shutil.copytree("models", "models-backup")

    def restore():
        shutil.rmtree("models")
        shutil.copytree("models-backup", "models")

    return params, load_file(WEIGHTS), restore


def resume_at_step_4(path: Path) -> None:
    """Still JSON, same size: only the manifest's sha256 can tell."""
    text = path.read_text()
    assert '"step": 12,' in text
    path.write_text(text.replace('"step": 12,', '"step": 4, ', 1))


CHECKPOINT_DAMAGE = [
    ("model.safetensors", truncate),
    ("optimizer.bin", flip_a_byte),
    ("training_state.pt", truncate),
    ("random_states_0.pkl", None),
    ("manifest.json", truncate),  # the record of the others: unreadable, so nothing is trusted
    ("progress.json", truncate),  # not JSON: would fail the resume with a traceback
    ("progress.json", resume_at_step_4),  # would resume at the wrong step
]


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(trained):
    params, straight, restore = trained
    for name, damage in CHECKPOINT_DAMAGE:
        restore()
        (run_dir,) = Path(params.paths.checkpoints).iterdir()
        target = run_dir / "step-0000012" / name
        damage(target) if damage else target.unlink()
        shutil.rmtree(params.paths.trained)
        with pytest.warns(UserWarning, match=f"step-0000012 is damaged .*{name}.*trying the one before"):
            info = train(params)
        assert info["resumed_from_step"] == 8, name
        resumed = load_file(WEIGHTS)
        assert all((resumed[k] == straight[k]).all() for k in straight), name  # the uninterrupted weights
        assert checkpoints.latest_checkpoint(run_dir).name == "step-0000012"  # re-saved, intact again

    restore()  # every checkpoint damaged: training starts afresh, to the same weights
    (run_dir,) = Path(params.paths.checkpoints).iterdir()
    for step in ("step-0000008", "step-0000012"):
        truncate(run_dir / step / "model.safetensors")
    with pytest.warns(UserWarning, match="damaged"):
        assert train(params)["resumed_from_step"] == 0
    resumed = load_file(WEIGHTS)
    assert all((resumed[k] == straight[k]).all() for k in straight)


def test_a_checkpoint_just_saved_is_never_pruned_for_a_damaged_later_one(trained):
    """Resumed from scratch past damaged checkpoints at 8 and 12 (limit 2), the run's step-4 checkpoint
    must survive its own pruning: a kill after step 6 resumes from it, not from nothing."""
    params, _, restore = trained
    restore()
    (run_dir,) = Path(params.paths.checkpoints).iterdir()
    for step in ("step-0000008", "step-0000012"):
        truncate(run_dir / step / "model.safetensors")
    env = {**os.environ, "PYTHONPATH": str(ROOT), faults.VARIABLE: "train.after_step=6"}
    killed = subprocess.run([sys.executable, "-m", "workflow", "train"], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [step for step, _ in checkpoints.complete_checkpoints(run_dir)] == [4]
    assert checkpoints.latest_checkpoint(run_dir).name == "step-0000004"


PIPELINE_DAMAGE = [
    ("unet/diffusion_pytorch_model.safetensors", truncate),
    ("unet/config.json", flip_a_byte),
    ("scheduler/scheduler_config.json", None),
]


def test_sample_refuses_a_damaged_pipeline_naming_the_file(trained):
    import torch

    from workflow.core.artifacts import write_manifest

    params, _, restore = trained
    for name, damage in PIPELINE_DAMAGE:
        restore()
        target = Path(params.paths.trained) / name
        damage(target) if damage else target.unlink()
        with pytest.raises(ConfigError, match=f"models/trained is damaged .*{name}.*re-run the train stage"):
            sample(params)
        assert not Path(params.paths.samples).exists()

    restore()  # pickled (.bin) weights instead of safetensors, consistent with the manifest: never unpickled
    unet = Path(params.paths.trained) / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({}, unet / "diffusion_pytorch_model.bin")
    write_manifest(params.paths.trained)
    with pytest.raises(ConfigError, match="not a loadable pipeline with safetensors weights"):
        sample(params)


def as_float32(path: Path) -> None:
    """A readable .npy, but not the uint8 images preprocess writes."""
    np.save(path, np.load(path).astype(np.float32))


def as_npz(path: Path) -> None:
    """A zip archive where a .npy belongs (np.load opens it as one)."""
    with open(path, "wb") as f:
        np.savez(f, images=np.zeros((2, 1, 8, 8), np.uint8))


# (file, damage, the stages that read it, the stage that makes it)
INTERMEDIATE_DAMAGE = [
    ("images", truncate, ("fid_reference", "train"), "preprocess"),
    ("images", as_float32, ("fid_reference", "train"), "preprocess"),
    ("images", as_npz, ("fid_reference", "train"), "preprocess"),
    ("fid_ref", truncate, ("evaluate", "fid_sweep"), "fid_reference"),
    ("fid_ref", flip_a_byte, ("evaluate", "fid_sweep"), "fid_reference"),  # an array's CRC no longer matches
]
READERS = {
    "fid_reference": fid_reference.run,
    "train": train,
    "evaluate": evaluate.run,
    "fid_sweep": fid_sweep.run,  # (with a sweep: it reads nothing without one)
}


@pytest.fixture
def prepared(tiny_params):
    """Tiny params (one FID sweep point), preprocessed and with FID reference statistics, as the pipeline
    makes them."""
    tiny_params(fid={"steps_sweep": [2]})
    params = load_params("params.yaml")
    download.run(params)
    preprocess.run(params)
    fid_reference.run(params)
    return params


@pytest.mark.parametrize(
    "key, damage, readers, maker", INTERMEDIATE_DAMAGE, ids=[f"{c[0]}-{c[1].__name__}" for c in INTERMEDIATE_DAMAGE]
)
def test_damaged_intermediate_files_are_refused_naming_the_file_and_its_stage(prepared, key, damage, readers, maker):
    params = prepared
    path = getattr(params.paths, key)
    damage(Path(path))
    for reader in readers:
        with pytest.raises(ConfigError, match=f"^{re.escape(path)}: .*; re-run the {maker} stage$"):
            READERS[reader](params)
    assert not Path(params.paths.trained).exists() and not Path(params.paths.metrics).exists()
