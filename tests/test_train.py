"""The training stage on a tiny model: it learns, it is deterministic, and resume is exact."""

import dataclasses
import fcntl
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from tests.helpers import ROOT, blocked_on_flock, train_history, wait_for, write_images
from workflow.core.config import ConfigError
from workflow.formats import checkpoints, trainlog
from workflow.formats.training_images import load_images
from workflow.formats.training_images import write_images as save_images
from workflow.stages.train import _process_slice
from workflow.stages.train import run as train

WEIGHTS = "models/trained/unet/diffusion_pytorch_model.safetensors"


def log_files(params) -> dict:
    """The training log's files (dvclive's layout), by path relative to train_log: their bytes."""
    log = Path(params.paths.train_log)
    return {
        p.relative_to(log).as_posix(): p.read_bytes()
        for p in sorted(log.rglob("*"))
        if p.is_file() and p.parts[len(log.parts)] not in ("grids", "summary.json")
    }


def weights(path=WEIGHTS):
    return load_file(path)


def same_weights(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_writes_a_loadable_pipeline_and_history(tiny_params):
    params = tiny_params()
    write_images(params.paths.images)
    info = train(params)
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(params.paths.trained)
    assert type(pipeline).__name__ == "DDPMPipeline" and pipeline.unet.config.sample_size == 8
    rows = train_history(params)
    assert rows["step"].tolist() == list(range(1, 13))
    assert rows["lr"][0] == 0.0 and rows["lr"][2] == pytest.approx(2e-3)  # warm-up, then peak
    summary = json.loads((Path(params.paths.train_log) / "summary.json").read_text())
    assert summary == info and summary["steps"] == 12 and np.isfinite(summary["loss_final"])
    assert summary["loss_final"] < rows["loss"][0]  # it learns
    assert summary["num_parameters"] == sum(p.numel() for p in pipeline.unet.parameters())
    assert set(summary["software"]) == {"python", "torch", "diffusers", "accelerate"} and summary["device_name"]


def test_saved_weights_are_the_ema_weights(tiny_params):
    from diffusers import UNet2DModel

    params = tiny_params()
    write_images(params.paths.images)
    info = train(params)
    last = checkpoints.latest_checkpoint(next(Path(params.paths.checkpoints).iterdir()))
    assert checkpoints.load_progress(last)["step"] == info["steps"]  # the state the weights were saved from
    raw = load_file(last / "model.safetensors")  # the raw (non-EMA) weights accelerate saved
    shadow = torch.load(last / checkpoints.TRAINING_STATE, weights_only=True)["ema"]["shadow_params"]
    names = [name for name, _ in UNet2DModel.from_pretrained(params.paths.trained, subfolder="unet").named_parameters()]
    saved = weights()
    assert len(shadow) == len(names) == len(saved)
    assert all(np.array_equal(saved[name], average.numpy()) for name, average in zip(names, shadow, strict=True))
    assert not same_weights(raw, saved)


def test_process_shards_partition_each_micro_batch():
    """Each rank takes its slice of every micro-batch of the global batch (train_step): over the ranks and
    micro-batches the slices cover each position once, in order, so a multi-process step sees the same
    images, noise and timesteps as one process."""
    size, micro_batches, ranks = 24, 3, 4
    micro = size // micro_batches
    positions = [
        position
        for m in range(micro_batches)
        for rank in range(ranks)
        for position in range(size)[
            _process_slice(m * micro, micro, SimpleNamespace(num_processes=ranks, process_index=rank))
        ]
    ]
    assert positions == list(range(size))


def test_two_runs_are_bitwise_identical(tiny_params, tmp_path):
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    first = weights()
    for folder in ("models",):
        shutil.rmtree(folder)
    train(params)
    assert same_weights(first, weights())


def test_resume_gives_the_uninterrupted_weights(tiny_params, monkeypatch):
    """Train 12 steps straight; then 8 steps, stop, and resume to 12: the weights must be equal to the bit,
    and only steps 9-12 run again (every draw is a function of (seed, step), so a silent restart from 0
    would give the same bits: the steps taken tell them apart)."""
    from workflow.stages import train as train_stage

    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    straight = weights()
    run_dir = next(Path(params.paths.checkpoints).iterdir())
    assert [s for s, _ in checkpoints.complete_checkpoints(run_dir)] == [8, 12]  # keeps the last 2
    shutil.rmtree(run_dir / "step-0000012")
    shutil.rmtree(params.paths.trained)
    (run_dir / ".step-0000016.tmp").mkdir()  # an interrupted save is never resumed from
    taken, step_function = [], train_stage.train_step
    monkeypatch.setattr(train_stage, "train_step", lambda run, step: taken.append(step) or step_function(run, step))
    info = train(params)
    assert info["resumed_from_step"] == 8 and taken == [8, 9, 10, 11]
    assert same_weights(straight, weights())
    assert train_history(params)["step"].tolist() == list(range(1, 13))  # the history survives the resume


def test_the_log_is_dvclives_and_a_resume_rewrites_it_bitwise(tiny_params):
    """loss and lr per step, images/s per log interval and the summary, in dvclive's layout with no
    timestamps; a run resumed from step 8 after logging to 12 re-writes the log from its checkpoint,
    to the byte of the uninterrupted run's (the throughput aside: it is measured)."""
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    straight = log_files(params)
    assert set(straight) == {
        "metrics.json",
        *(trainlog.tsv(m) for m in (trainlog.LOSS, trainlog.LR, trainlog.THROUGHPUT)),
    }
    assert straight[trainlog.tsv(trainlog.LOSS)].decode().splitlines()[0] == "step\tloss"
    rates = straight[trainlog.tsv(trainlog.THROUGHPUT)].decode().splitlines()
    assert rates[0] == "step\timages_per_second" and [r.split("\t")[0] for r in rates[1:]] == ["4", "8", "12"]
    summary = json.loads(straight["metrics.json"])
    assert summary["step"] == 12 and set(summary["train"]) == {"loss", "lr", "images_per_second"}
    assert summary["train"]["loss"] == train_history(params)["loss"][-1]
    run_dir = next(Path(params.paths.checkpoints).iterdir())
    shutil.rmtree(run_dir / "step-0000012")  # as if killed after logging step 12, before its checkpoint
    shutil.rmtree(params.paths.trained)
    assert train(params)["resumed_from_step"] == 8
    resumed = log_files(params)
    for metric in (trainlog.LOSS, trainlog.LR):
        assert resumed[trainlog.tsv(metric)] == straight[trainlog.tsv(metric)], metric
    assert resumed[trainlog.tsv(trainlog.THROUGHPUT)].decode().count("\n") == len(rates)


def test_the_log_leaves_the_repository_around_it_alone(tiny_params, tmp_path):
    """In a git repository without commits and without DVC (`make run` there runs `dvc repro`),
    dvclive's own repository set-up would fail ("Empty git repo") or `dvc init` it."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    params = tiny_params(train={"max_steps": 4})
    write_images(params.paths.images)
    train(params)
    assert train_history(params)["step"].tolist() == [1, 2, 3, 4]
    assert not (tmp_path / ".dvc").exists()


def test_changed_recipe_does_not_resume_foreign_checkpoints(tiny_params):
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    other = tiny_params(train={"learning_rate": 1e-3})
    info = train(other)
    assert info["resumed_from_step"] == 0
    assert len(list(Path(params.paths.checkpoints).iterdir())) == 2


def test_a_run_in_a_copy_of_the_workspace_resumes_from_the_workspaces_checkpoints(tiny_params, tmp_path, monkeypatch):
    """As DVC runs a `--temp` or queued experiment: in a copy of the workspace, DVC_ROOT naming the workspace.
    An interrupted run's copy is gone, but its checkpoints are the workspace's: the next copy resumes them,
    to the uninterrupted weights, and leaves no checkpoint of its own; git ignores them where they are."""
    from workflow.stages import train as train_stage

    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    straight = weights()
    (run_dir,) = Path(params.paths.checkpoints).absolute().iterdir()
    shutil.rmtree(run_dir / "step-0000012")  # as if the run was stopped after step 8's checkpoint
    copy = tmp_path / ".dvc/tmp/exps/tmp1234"  # where DVC puts it
    shutil.copytree("data", copy / "data")
    (copy / ".dvc").mkdir()  # DVC opens the copy as a project of its own
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    taken, step_function = [], train_stage.train_step
    monkeypatch.setattr(train_stage, "train_step", lambda run, step: taken.append(step) or step_function(run, step))
    info = train(params)
    assert info["resumed_from_step"] == 8 and taken == [8, 9, 10, 11]
    assert same_weights(straight, weights()) and not (copy / "models/checkpoints").exists()
    assert [s for s, _ in checkpoints.complete_checkpoints(run_dir)] == [8, 12]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path, capture_output=True, text=True
    ).stdout
    assert "models/trained/" in status and "checkpoints" not in status


def test_the_workspace_of_a_stage_is_dvc_roots_only_for_dvcs_own_copies(tmp_path):
    """DVC_ROOT names the workspace a `--temp` or queued experiment's copy came from; a stage run anywhere
    else (a shell or another project's stage that has DVC_ROOT set) keeps its own folder."""
    root = tmp_path / "repo"
    copy, temp = root / ".dvc/tmp/exps/tmpab12", root / ".dvc/tmp/exps/standalone/tmpcd34"  # queued, --temp
    (copy / ".dvc").mkdir(parents=True)  # DVC opens a copy as a project of its own
    (copy / "sub/.dvc").mkdir(parents=True)  # a DVC project in a subfolder of its git repository
    (copy / "sub/stage").mkdir()
    (temp / ".dvc").mkdir(parents=True)
    elsewhere = tmp_path / "other"
    assert checkpoints.workspace(copy, str(root)) == root
    assert checkpoints.workspace(copy / "sub/stage", str(root)) == root / "stage"
    assert checkpoints.workspace(temp, str(root)) == root
    assert checkpoints.workspace(root / "stage", str(root)) == root / "stage"
    assert checkpoints.workspace(elsewhere, str(root)) == elsewhere
    assert checkpoints.workspace(elsewhere, None) == elsewhere
    linked = tmp_path / "linked"  # .dvc/tmp a link to scratch space, as on clusters
    (linked / ".dvc").mkdir(parents=True)
    (linked / ".dvc/tmp").symlink_to(tmp_path / "scratch", target_is_directory=True)
    (tmp_path / "scratch/exps/tmpef56/.dvc").mkdir(parents=True)
    assert checkpoints.workspace((linked / ".dvc/tmp/exps/tmpef56").resolve(), str(linked)) == linked


def test_a_run_covered_by_a_held_lock_of_another_recipe_is_an_error_not_a_wait(tmp_path, monkeypatch):
    """`python -m workflow train` locked its recipe, then waited for a device; meanwhile the images or the
    code changed, so its training has another key: waiting for that one with the devices held could
    deadlock against a run that has the lock and waits for the devices."""
    monkeypatch.setenv(checkpoints.HELD_ENV, str(tmp_path / "old-key" / checkpoints.TRAINER_LOCK))
    (tmp_path / "new-key").mkdir()
    changed = r"changed while this run waited: it locked .*old-key.*run it again"
    with pytest.raises(ConfigError, match=changed), checkpoints.sole_trainer(tmp_path / "new-key"):
        pass


def test_ranks_launched_by_hand_never_wait_for_a_recipe_being_trained(tmp_path, monkeypatch):
    """`accelerate launch -m workflow train` started by hand: rank 0 would wait while the other ranks wait
    for it in the rendezvous, until that times out. It stops the launch instead, naming the way that waits;
    the other ranks take no lock."""
    lock = tmp_path / checkpoints.TRAINER_LOCK
    monkeypatch.delenv(checkpoints.HELD_ENV, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with open(lock, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        monkeypatch.setenv("RANK", "1")
        with checkpoints.sole_trainer(tmp_path) as fd:
            assert fd is None
        monkeypatch.setenv("RANK", "0")
        by_hand = r"launch started by hand cannot wait .* `python -m workflow train`"
        with pytest.raises(ConfigError, match=by_hand), checkpoints.sole_trainer(tmp_path):
            pass
    with checkpoints.sole_trainer(tmp_path) as fd:  # free: rank 0 takes it for the launch
        assert fd is not None and not blocked_on_flock(os.getpid(), lock)
        assert os.environ[checkpoints.HELD_ENV] == str(lock.resolve())
    assert checkpoints.HELD_ENV not in os.environ


def test_a_second_run_of_a_recipe_being_trained_waits_then_resumes_what_it_saved(tiny_params, tmp_path):
    """Two experiments of one recipe (a queued sweep of sampling params): the second waits on the first's
    lock on the run's folder, then trains nothing, taking the first's final checkpoint. Here the test holds
    the lock the first run would hold, so the order is certain."""
    params = tiny_params()
    write_images(params.paths.images)
    first = train(params)
    trained = weights()
    run_dir = Path(params.paths.checkpoints) / first["run_key"]
    shutil.rmtree(params.paths.trained)
    lock, said = run_dir / checkpoints.TRAINER_LOCK, tmp_path / "stderr.txt"
    with open(lock, "a+") as held, open(said, "w") as stderr:  # a file, not a pipe: no read can hang the test
        fcntl.flock(held, fcntl.LOCK_EX)
        second = subprocess.Popen(
            [sys.executable, "-m", "workflow", "train"],
            stderr=stderr,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        wait_for(lambda: blocked_on_flock(second.pid, lock) or second.poll() is not None, "the run to block")
        # said before it blocked; other lines may come first (a device slot on a GPU host, a warning)
        assert f"waiting: another run is training this recipe into {run_dir}" in said.read_text()
        assert second.poll() is None and not Path(params.paths.trained).exists()
    assert second.wait(timeout=300) == 0, said.read_text()[-3000:]
    assert same_weights(trained, weights())
    assert json.loads(Path(params.paths.train_log, "summary.json").read_text())["resumed_from_step"] == 12


def test_missing_images_is_a_clear_error(tiny_params):
    with pytest.raises(
        ConfigError, match=r"images.npy \(`paths.images`\): no such file; the preprocess stage makes it"
    ):
        train(tiny_params())


def test_the_training_set_is_the_files_mapping_not_a_copy_of_it(tmp_path):
    """train reads images.npy copy-on-write: torch takes it without complaint (writable), its pages are the
    file's (one copy in memory for every rank of a machine, not one each), and a write stays in memory."""
    path = tmp_path / "images.npy"
    images = np.arange(5 * 1 * 4 * 4, dtype=np.uint8).reshape(5, 1, 4, 4)
    save_images(path, images)
    mapped = load_images(path, copy_on_write=True)
    assert isinstance(mapped, np.memmap) and Path(mapped.filename) == path.resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a read-only array
        tensor = torch.from_numpy(np.ascontiguousarray(mapped))
    assert tensor.data_ptr() == mapped.ctypes.data
    tensor[0] = 255
    assert np.array_equal(np.load(path), images)


def test_non_finite_loss_names_the_step(tiny_params):
    params = tiny_params()
    # past the loader's bounds (learning_rate <= 1), which a Params built in code skips: the loss overflows at once
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, learning_rate=1e30, max_grad_norm=1e30)
    )
    write_images(params.paths.images)
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train(params)
    assert not Path(params.paths.trained).exists()


def train_with_an_overflow_at_step(params, step: int, scaler=None):
    """train_loop from scratch, the gradients of `step` made non-finite in its real backward pass (as a
    bf16 or fp32 overflow would) while its loss stays finite; with `scaler`, a real GradScaler, as fp16
    on a GPU has. Returns (the training, its checkpoint folder)."""
    import torch

    from workflow.stages.train import make_accelerator, setup, train_loop

    images = write_images(params.paths.images)
    accelerator = make_accelerator(params)
    accelerator.scaler = scaler  # before setup's prepare, so the optimiser steps through it
    training = setup(params, images, accelerator)
    backward_passes = []

    def overflow(grad):  # one backward pass per step here (no accumulation)
        backward_passes.append(1)
        return grad * torch.inf if len(backward_passes) == step else grad

    training.eager_model.conv_in.weight.register_hook(overflow)
    folder = Path(params.paths.checkpoints) / "run"
    train_loop(training, folder)
    return training, folder


def test_non_finite_gradient_norm_names_the_step_before_its_checkpoint(tiny_params, one_thread):
    """A finite loss with non-finite gradients: clipping scales the update by NaN, so the weights of that
    step are NaN. At a checkpoint step (8) they were saved, and only step 9's loss stopped the run."""
    params = tiny_params(train={"progress_grids": False})
    message = r"^gradient norm is inf at step 8 \(its loss [0-9.]+ was finite\): .* Earlier checkpoints are intact"
    with pytest.raises(FloatingPointError, match=message):
        train_with_an_overflow_at_step(params, 8)
    run_dir = Path(params.paths.checkpoints) / "run"
    assert [s for s, _ in checkpoints.complete_checkpoints(run_dir)] == [4]


def test_a_step_the_grad_scaler_skips_is_not_an_error(tiny_params, one_thread):
    """fp16's GradScaler: an inf gradient norm is its signal to skip the step (and lower its scale)."""
    import torch

    params = tiny_params(train={"progress_grids": False})
    training, run_dir = train_with_an_overflow_at_step(params, 8, torch.amp.GradScaler("cpu"))
    assert [s for s, _ in checkpoints.complete_checkpoints(run_dir)] == [8, 12]
    assert training.lr_scheduler.last_epoch == 11  # the skipped step left the lr schedule where it was
    assert all(torch.isfinite(w).all() for w in training.eager_model.parameters())


def test_progress_grids_survive_a_resume_and_leave_the_weights_alone(tiny_params):
    """One grid per checkpoint in train_log/grids; a resumed run has them all, bitwise; grids off: same weights."""
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    with_grids = weights()
    grids = Path(params.paths.train_log) / "grids"
    names = ["step-0000004.png", "step-0000008.png", "step-0000012.png"]
    assert sorted(p.name for p in grids.iterdir()) == names
    assert Image.open(grids / names[0]).size == (4 * (8 + 2) + 2,) * 2  # 4 x 4 cells of 8 px, padded
    straight = {n: (grids / n).read_bytes() for n in names}
    assert len(set(straight.values())) == 3  # the model changes between checkpoints
    run_dir = next(Path(params.paths.checkpoints).iterdir())
    shutil.rmtree(run_dir / "step-0000012")  # the grid of step 4 outlives its pruned checkpoint
    shutil.rmtree(params.paths.train_log)
    assert train(params)["resumed_from_step"] == 8
    assert {n: (grids / n).read_bytes() for n in names} == straight
    shutil.rmtree("models")
    shutil.rmtree(params.paths.train_log)
    train(tiny_params(train={"progress_grids": False}))
    assert same_weights(with_grids, weights())
    assert not grids.exists()


def test_last_progress_grid_is_the_sample_stages_grid(tiny_params):
    """The final grid uses the saved EMA weights and the sample stage's noise streams: DDIM-25 gives the same PNG."""
    from workflow.stages.sample import run as sample

    params = tiny_params(
        sample={"sampler": "ddim", "num_inference_steps": 25, "grid_size": 4, "batch_size": 16}, fid={"num_samples": 16}
    )
    write_images(params.paths.images)
    train(params)
    sample(params)
    last = Path(params.paths.train_log) / "grids" / "step-0000012.png"
    assert np.array_equal(np.array(Image.open(last)), np.array(Image.open(params.paths.grid)))
