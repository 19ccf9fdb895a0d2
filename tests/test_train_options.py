"""Training options of issue 4: accumulation, epochs, Min-SNR, noise offset, compile fallback,
non-finite loss, several processes (auto precision: tests/test_gpu_paths_on_cpu.py)."""

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file

from tests.helpers import ROOT, train_history, write_images
from workflow.core.config import Scheduler
from workflow.formats import checkpoints
from workflow.maths.diffusion import min_snr_weights, step_noise
from workflow.models.builders import build_noise_scheduler
from workflow.stages.train import run as train
from workflow.stages.train import total_steps

# Two CPU ranks need two cores: check_cpu_ranks refuses more ranks than cores on a machine without a GPU.
TWO_CORES = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU ranks need two cores")

WEIGHTS = "models/trained/unet/diffusion_pytorch_model.safetensors"


def trained_weights(params):
    shutil.rmtree("models", ignore_errors=True)
    info = train(params)
    return info, load_file(WEIGHTS)


def step_gradients(params, images):
    """The gradients the optimiser receives at step 0 (captured instead of stepping)."""
    from workflow.stages.train import make_accelerator, setup, train_step

    run = setup(params, images, make_accelerator(params))
    captured = {}

    def capture():
        captured.update({n: p.grad.clone() for n, p in run.eager_model.named_parameters()})

    run.optimizer.step = capture
    train_step(run, 0)
    return captured


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
def test_gradient_accumulation_is_a_memory_knob_only(tiny_params):
    """The same global batch in 1 or 4 micro-batches gives the same gradients (not only the same
    Adam step, which would hide a wrong scale)."""
    params = tiny_params()
    images = write_images(params.paths.images)
    whole = step_gradients(params, images)
    split = step_gradients(tiny_params(train={"gradient_accumulation_steps": 4}), images)
    for name, grad in whole.items():
        assert torch.allclose(grad, split[name], rtol=1e-4, atol=1e-7), name


def test_epochs_count_optimiser_steps(tiny_params):
    params = tiny_params(train={"max_steps": None, "epochs": 2})  # 24 images, batch 8 -> 6 steps
    write_images(params.paths.images)
    assert total_steps(params, 24) == 6
    info = train(params)
    assert info["steps"] == 6
    assert train_history(params)["step"].tolist() == list(range(1, 7))
    # exact arithmetic: 1.1 epochs of 100 images at batch 10 is 11 steps (in floats, 11.000000000000002 -> 12)
    assert total_steps(tiny_params(train={"max_steps": None, "epochs": 1.1, "batch_size": 10}), 100) == 11


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights(kind):
    scheduler = build_noise_scheduler(Scheduler(prediction_type=kind))
    t = torch.tensor([0, 500, 999])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=5.0)
    expected = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[kind]
    assert torch.allclose(min_snr_weights(scheduler, t, 5.0), expected.float(), rtol=1e-5)


def test_min_snr_weights_at_zero_terminal_snr_are_finite():
    """With rescale_betas_zero_snr the last step's SNR is 0: epsilon's weight min(snr, gamma) / snr tends
    to 1 there (diffusers' scripts set it so), not 0/0."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(rescale_betas_zero_snr=True)
    t = torch.tensor([0, 500, 999])
    weights = min_snr_weights(scheduler, t, 5.0)
    assert float(scheduler.alphas_cumprod[999]) < 1e-6 and weights[2] == 1.0
    assert torch.isfinite(weights).all() and weights[0] < 1.0 and weights[1] == 1.0


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_min_snr_training_runs_for_each_objective(tiny_params, kind):
    params = tiny_params(train={"max_steps": 4, "min_snr_gamma": 5.0}, scheduler={"prediction_type": kind})
    write_images(params.paths.images)
    assert np.isfinite(train(params)["loss_final"])


def test_noise_offset_adds_a_constant_per_image_and_channel():
    plain, t0, f0 = step_noise(0, 3, (4, 3, 8, 8), 1000, "cpu")
    offset, t1, f1 = step_noise(0, 3, (4, 3, 8, 8), 1000, "cpu", noise_offset=0.1)
    shift = offset - plain
    assert torch.equal(t0, t1) and torch.equal(f0, f1)  # the other draws are unchanged
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6) and shift.abs().max() > 0.01


def test_failing_compile_falls_back_to_eager(tiny_params, monkeypatch):
    """A compiler crash (as torch.compile gave at 64 px on an H100) must not end the run."""

    class Broken(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            raise RuntimeError("CUDA error: misaligned address")

    monkeypatch.setattr(torch, "compile", Broken)
    params = tiny_params(train={"max_steps": 4, "compile": True})
    write_images(params.paths.images)
    with pytest.warns(UserWarning, match="torch.compile failed .*misaligned address.*training eagerly"):
        info = train(params)
    assert info["compiled"] is False and info["steps"] == 4
    _, eager = trained_weights(tiny_params(train={"max_steps": 4}))
    assert all(np.array_equal(eager[k], load_file(WEIGHTS)[k]) for k in eager)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tiny_params):
    params = tiny_params(train={"warmup_steps": 0, "checkpoint_every": 1, "log_every": 1, "max_steps": 50})
    # past the loader's bounds (learning_rate <= 1), which a Params built in code skips: the loss overflows soon
    params = dataclasses.replace(
        params, train=dataclasses.replace(params.train, learning_rate=1e30, max_grad_norm=1e30)
    )
    write_images(params.paths.images)
    with pytest.raises(FloatingPointError, match=r"at step (\d+)") as err:
        train(params)
    bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
    run_dir = Path(params.paths.checkpoints) / os.listdir(params.paths.checkpoints)[0]
    kept = checkpoints.complete_checkpoints(run_dir)
    assert [step for step, _ in kept] == list(range(1, bad_step))[-2:]  # up to the step before, never the bad one
    assert not Path(params.paths.trained).exists()


def test_more_cpu_ranks_than_cores_are_refused_before_anything_is_taken(tiny_params, capsys):
    """Without a GPU each rank is a whole torch process on the same cores and memory: `train.num_processes`
    above the cores this process may use is refused, before the recipe's lock, a device slot or a rank."""
    from workflow.__main__ import main
    from workflow.core.launch import check_cpu_ranks
    from workflow.core.slots import usable_gpus

    cores = len(os.sched_getaffinity(0))
    check_cpu_ranks(cores, gpus=0)
    check_cpu_ranks(cores + 1, gpus=1)  # GPU ranks are counted against the GPUs (device slots)
    if usable_gpus():
        return  # the stage below would launch GPU ranks
    params = tiny_params(train={"max_steps": 2, "num_processes": cores + 1, "batch_size": 2 * (cores + 1)})
    write_images(params.paths.images)
    assert main(["train", "--params", "params.yaml"]) == 1
    assert capsys.readouterr().err == (
        f"error in stage train: `train.num_processes` {cores + 1} on a machine without a GPU, which gives this "
        f"process {cores} CPU cores: at most one rank per core (a single process already uses every core)\n"
    )
    assert not Path(params.paths.checkpoints).exists()  # no recipe folder, no lock taken


@pytest.mark.e2e
@TWO_CORES
def test_two_processes_match_one(tiny_params, tmp_path):
    """`train.num_processes: 2`: the stage launches 2 ranks itself (accelerate launch; gloo on CPU), the ranks
    agree (checked inside train), and the result equals the single-process run with the same global batch
    within float tolerance. The user's own `accelerate config` file is not read: its gpu_ids would replace
    the device slots' CUDA_VISIBLE_DEVICES (one id, as here, even stops a multi-GPU launch)."""
    params = tiny_params(train={"max_steps": 4})
    write_images(params.paths.images)
    _, single = trained_weights(params)
    shutil.rmtree("models")
    tiny_params(train={"max_steps": 4, "num_processes": 2})
    user_config = tmp_path / "hf/accelerate/default_config.yaml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: fp16\nuse_cpu: false\n"
        "debug: false\nnum_processes: 8\nnum_machines: 1\ngpu_ids: '5'\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "WORKFLOW_SLOT_DIR": str(tmp_path / "slots"),
        "HF_HOME": str(tmp_path / "hf"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "train", "--params", "params.yaml"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = yaml.safe_load((Path(params.paths.train_log) / "summary.json").read_text())
    assert summary["num_processes"] == 2
    multi = load_file(WEIGHTS)
    diffs = np.concatenate([np.abs(single[k] - multi[k]).ravel() for k in single])
    # Gradients agree to float rounding (the all-reduce sums in another order); Adam divides each
    # coordinate by sqrt(v), which turns rounding on near-zero gradients into lr-sized differences
    # on a few coordinates. So: nearly all weights equal to rounding, none off by a whole step.
    assert np.quantile(diffs, 0.999) <= 1e-6
    assert diffs.max() <= 0.05 * 2e-3


def processes_of(slot_dir: Path) -> list[int]:
    """The live processes started with WORKFLOW_SLOT_DIR=slot_dir (read from /proc)."""
    mark = f"WORKFLOW_SLOT_DIR={slot_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return found


@pytest.mark.e2e
@TWO_CORES
def test_a_killed_stage_leaves_its_slot_held_until_its_ranks_are_gone(tiny_params, tmp_path):
    """The launcher inherits the slot's lock: SIGKILL to `python -m workflow train` (the OOM killer, a
    forced queue kill) must not free the slot while the ranks it launched still train on its devices."""
    import contextlib
    import signal

    from tests.helpers import wait_for
    from tests.test_slots import slot_env
    from workflow.core.artifacts import try_lock

    params = tiny_params(train={"max_steps": 100_000, "num_processes": 2, "checkpoint_every": 1})
    write_images(params.paths.images)
    slots = tmp_path / "slots"
    env = slot_env(tmp_path, slots=1) | {"OMP_NUM_THREADS": "1"}  # its slots: tmp_path / "slots"
    stage = subprocess.Popen(
        [sys.executable, "-m", "workflow", "train", "--params", "params.yaml"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any(Path(params.paths.checkpoints).glob("*/step-*")), "the ranks' first checkpoint", 180)
        stage.kill()
        stage.wait(timeout=30)
        assert processes_of(slots), "the launcher and its ranks went with the stage"
        assert try_lock(slots / "slot-0.lock") is None  # still held: by the launcher
        (run_dir,) = Path(params.paths.checkpoints).iterdir()
        assert try_lock(run_dir / checkpoints.TRAINER_LOCK) is None  # so is the recipe's: no second run trains it
    finally:
        for pid in processes_of(slots):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def slot_free() -> bool:  # once the last holder has exited (SIGKILL is not instant)
        handle = try_lock(slots / "slot-0.lock")
        if handle is not None:
            handle.close()
        return handle is not None

    wait_for(slot_free, "the slot to be freed with its last holder", 60)


@pytest.mark.e2e
@TWO_CORES
def test_a_multi_process_run_waits_for_its_recipe_before_it_launches_a_rank(tiny_params, tmp_path):
    """Two runs of one recipe with `train.num_processes: 2`: the second waits in the process the user
    started, before any rank exists, so no two runs can each hold part of what training needs and meet
    nobody. Here the test holds the lock the first run would hold; once free, the run trains."""
    from tests.helpers import blocked_on_flock, wait_for
    from tests.test_slots import slot_env
    from workflow.stages.train import training_data

    params = tiny_params(train={"max_steps": 2, "num_processes": 2})
    write_images(params.paths.images)
    run_dir = checkpoints.run_folder(params.paths.checkpoints, training_data(params).key)
    env = slot_env(tmp_path, slots=1) | {"OMP_NUM_THREADS": "1"}
    with open(run_dir / checkpoints.TRAINER_LOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stage = subprocess.Popen(
            [sys.executable, "-m", "workflow", "train", "--params", "params.yaml"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lock = run_dir / checkpoints.TRAINER_LOCK
        wait_for(lambda: blocked_on_flock(stage.pid, lock) or stage.poll() is not None, "the run to block")
        assert stage.poll() is None, stage.communicate()[1][-3000:]  # blocked, not ended
        children = Path(f"/proc/{stage.pid}/task/{stage.pid}/children").read_text().split()
        assert children == []  # no launcher, so no rank: nothing waits to meet
        assert not (tmp_path / "slots").exists()  # nor any device slot taken: a waiting run holds no GPU
    rest = stage.communicate(timeout=300)[1]
    assert stage.returncode == 0, rest[-3000:]
    assert "waiting: another run is training this recipe" in rest
    summary = yaml.safe_load((Path(params.paths.train_log) / "summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 2 and summary["resumed_from_step"] == 0


def test_resume_with_accumulation_is_bitwise_and_counts_optimiser_steps(tiny_params):
    """diffusers#3467: with accumulation, a resumed run must neither skip nor repeat steps."""
    params = tiny_params(train={"max_steps": 8, "gradient_accumulation_steps": 2, "checkpoint_every": 4})
    write_images(params.paths.images)
    _, straight = trained_weights(params)
    run_dir = next(Path(params.paths.checkpoints).iterdir())
    shutil.rmtree(run_dir / "step-0000008")
    shutil.rmtree(params.paths.trained)
    info = train(params)
    assert info["resumed_from_step"] == 4 and info["steps"] == 8
    resumed = load_file(WEIGHTS)
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    assert train_history(params)["step"].tolist() == list(range(1, 9))
