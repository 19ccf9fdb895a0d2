"""The GPU code paths, run on CPU wherever torch allows, so the first GPU run does not die on a
mistake a CPU could have shown.

`Runtime.gpu_paths_on(cpu)` makes a CPU run take a GPU run's choices: bf16 autocast in training and
sampling, channels_last, fused AdamW. torch.compile of the training step and of the sampler runs
for real (inductor's CPU backend), and its eager fallback is forced once each.

What only a GPU can check: the CUDA kernels and their numerics (bf16 tensor cores, TF32), the
dataset held in GPU memory or left memory-mapped with each batch copied through pinned memory
(`Runtime.place_dataset`, `to_device`; the rule, `fits_on_device`, is tested here), compile failures
only the CUDA backend raises (such as "misaligned address"; the fallback they take is the one forced
here), speed, and several GPUs.
bench/gpu_check.sh runs those on a lent GPU (docs/PERFORMANCE.md).
"""

import dataclasses

import numpy as np
import pytest
import torch

from tests.helpers import tiny_dict, write_images
from workflow.core.runtime import Runtime, fits_on_device
from workflow.models.builders import build_noise_scheduler, build_unet
from workflow.models.sampling import Denoiser, sample_batches
from workflow.stages.train import make_accelerator, setup, train_step
from workflow.tools.bench_train import fresh_accelerator_state

CPU = torch.device("cpu")
GPU_PATHS = Runtime.gpu_paths_on(CPU)


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """accelerate keeps one process-wide state: these tests switch its precision, so reset it around each."""
    fresh_accelerator_state()
    yield
    fresh_accelerator_state()


def test_runtime_choices():
    plain = Runtime.for_device(CPU)
    assert (plain.training_precision("auto"), plain.sampling_dtype("auto")) == ("no", torch.float32)
    assert (GPU_PATHS.training_precision("auto"), GPU_PATHS.sampling_dtype("auto")) == ("bf16", torch.bfloat16)
    assert GPU_PATHS.training_precision("no") == "no" and GPU_PATHS.sampling_dtype("no") == torch.float32
    assert plain.training_precision("fp16") == "fp16" and plain.sampling_dtype("bf16") == torch.bfloat16
    assert fits_on_device(100, 400) and not fits_on_device(101, 400)


def first_losses(params, images, runtime, steps=3):
    run = setup(params, images, make_accelerator(params, runtime), runtime)
    return run, [train_step(run, step).item() for step in range(steps)]


def test_training_takes_the_gpu_paths(tiny_params):
    params = tiny_params(train={"mixed_precision": "auto"})
    images = write_images(params.paths.images)
    run, losses = first_losses(params, images, GPU_PATHS)
    assert run.accelerator.mixed_precision == "bf16"
    assert run.optimizer.defaults["fused"] is True
    conv = run.eager_model.down_blocks[0].resnets[0].conv1.weight  # 16 -> 16 channels: the layouts differ
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(p.dtype == torch.float32 for p in run.eager_model.parameters())  # autocast, not bf16 weights
    assert all(np.isfinite(losses))
    fresh_accelerator_state()
    _, plain = first_losses(params, images, Runtime.for_device(CPU))
    assert losses[0] == pytest.approx(plain[0], rel=0.05)  # the same step, in bf16 autocast
    assert losses != plain


def test_compiled_training_step_equals_eager(tiny_params):
    """Losses and then weights: no warm-up, so each step's update (the compiled backward) shows in the next."""
    params = tiny_params(train={"compile": True, "ema": False, "warmup_steps": 0})
    images = write_images(params.paths.images)
    cpu = Runtime.for_device(CPU)  # both on the CPU, on a GPU host too
    run = setup(params, images, make_accelerator(params, cpu), cpu)
    from workflow.stages.train import guarded_step

    compiled = [guarded_step(run, step).item() for step in range(3)]
    assert run.model is not run.eager_model  # compiled, not fallen back
    eager_params = dataclasses.replace(params, train=dataclasses.replace(params.train, compile=False))
    eager_run = setup(eager_params, images, make_accelerator(eager_params, cpu), cpu)
    start = {name: p.detach().clone() for name, p in eager_run.eager_model.named_parameters()}
    eager = [train_step(eager_run, step).item() for step in range(3)]
    assert compiled == pytest.approx(eager, rel=1e-4)
    # Adam divides each gradient by its own scale, so float-rounding differences in small gradients show in
    # the weights: each tensor must match within a tenth of its own update (measured: under 3%), a wrong
    # compiled backward misses by its whole size. The attention key bias is left out: softmax ignores it,
    # so its gradient is rounding noise (it moves about 1e-5)
    pairs = zip(run.eager_model.named_parameters(), eager_run.eager_model.named_parameters(), strict=True)
    for (name, a), (_, b) in pairs:
        update = (b - start[name]).abs().max()
        assert update > 0, name  # three real updates reached it
        if not name.endswith("to_k.bias"):
            assert (a - b).abs().max() <= 0.1 * update, name


def tiny_unet():
    torch.manual_seed(0)
    return build_unet(dataclasses.replace(*_tiny_model()), resolution=8, channels=1).eval()


def _tiny_model():
    from workflow.core.config import params_from_dict

    return (params_from_dict(tiny_dict()).model,)


def sample(settings, runtime, unet=None):
    unet = unet or tiny_unet()
    config = build_noise_scheduler(params_sample().scheduler).config
    return np.concatenate(
        [b for _, b in sample_batches(unet, config, settings, 0, 4, CPU, progress=False, runtime=runtime)]
    )


def params_sample():
    from workflow.core.config import params_from_dict

    return params_from_dict(tiny_dict(sample={"num_inference_steps": 3, "batch_size": 4}))


def test_bf16_sampling_with_channels_last():
    settings = params_sample().sample
    plain = sample(settings, Runtime.for_device(CPU))
    gpu_like = sample(settings, GPU_PATHS)
    assert gpu_like.dtype == np.uint8 and gpu_like.shape == plain.shape
    difference = np.abs(gpu_like.astype(int) - plain.astype(int))
    assert difference.max() > 0 and difference.mean() < 8  # bf16 rounding, not a different image


def test_compiled_sampler_equals_eager():
    settings = params_sample().sample
    eager = sample(settings, Runtime.for_device(CPU))
    compiled = sample(dataclasses.replace(settings, compile=True), Runtime.for_device(CPU))
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1


def test_sampler_compile_failure_falls_back_once(monkeypatch):
    calls = []

    class BrokenOnce(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *args, **kwargs):
            calls.append(1)
            raise RuntimeError("CUDA error: misaligned address")

    monkeypatch.setattr(torch, "compile", BrokenOnce)
    settings, unet = params_sample().sample, tiny_unet()
    denoiser = Denoiser(unet, dataclasses.replace(settings, compile=True), Runtime.for_device(CPU))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(10)
    with pytest.warns(UserWarning, match="torch.compile failed .*misaligned address.*sampling eagerly"):
        first = denoiser(x, t)
    assert torch.equal(first, denoiser(x, t)) and len(calls) == 1  # eager from then on, not compiled again
    eager = Denoiser(unet, dataclasses.replace(settings, compile=False), Runtime.for_device(CPU))
    assert torch.equal(first, eager(x, t))  # the fallback is the plain eager sampler's call


def test_fused_adamw_equals_the_default():
    def one_step(runtime):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        before = layer.weight.detach().clone()
        optimizer = runtime.adamw(layer.parameters(), lr=0.1, weight_decay=0.01)
        layer(torch.ones(2, 4)).square().sum().backward()
        optimizer.step()
        return optimizer, before, layer.weight.detach()

    fused, before, w_fused = one_step(GPU_PATHS)
    plain, _, w_plain = one_step(Runtime.for_device(CPU))
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert not torch.allclose(w_fused, before) and torch.allclose(w_fused, w_plain, atol=1e-6)
