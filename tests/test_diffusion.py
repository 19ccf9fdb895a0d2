import numpy as np
import pytest
import torch

from workflow.core.config import ConfigError, Model, Params, Scheduler
from workflow.maths.diffusion import (
    apply_flip,
    batch_indices,
    diffusion_loss,
    step_noise,
    stream_seed,
    to_model_range,
    training_target,
)
from workflow.models.builders import build_noise_scheduler, build_sampler, build_unet, set_steps


def test_each_epoch_visits_every_image_once():
    n, batch = 10, 4
    seen = np.concatenate([batch_indices(0, s, batch, n) for s in range(5)])  # 20 draws = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])  # reshuffled each epoch


def test_data_order_is_a_function_of_seed_and_step():
    assert np.array_equal(batch_indices(3, 7, 5, 11), batch_indices(3, 7, 5, 11))
    assert not np.array_equal(batch_indices(3, 7, 5, 11), batch_indices(4, 7, 5, 11))


def test_step_noise_is_a_function_of_seed_and_step():
    """Every process draws the whole global batch from the (seed, step) stream (its shard is then a slice:
    tests/test_train.py), so the draw may depend on nothing else."""
    noise, t, flip = step_noise(0, 5, (4, 1, 8, 8), 1000, "cpu")
    again = step_noise(0, 5, (4, 1, 8, 8), 1000, "cpu")
    assert all(torch.equal(a, b) for a, b in zip((noise, t, flip), again, strict=True))
    assert not torch.equal(noise, step_noise(0, 6, (4, 1, 8, 8), 1000, "cpu")[0])
    assert stream_seed(0, 1) != stream_seed(1, 0)


def test_pixels_map_to_minus_one_one_and_flip_mirrors():
    x = to_model_range(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
    assert x.tolist() == [[[[-1.0, 1.0]]]]
    flipped = apply_flip(torch.cat([x, x]), torch.tensor([True, False]))
    assert flipped[0].tolist() == [[[1.0, -1.0]]] and flipped[1].tolist() == [[[-1.0, 1.0]]]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_target_by_prediction_type(kind):
    scheduler = build_noise_scheduler(Scheduler(prediction_type=kind))
    clean, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    t = torch.tensor([10, 900])
    target = training_target(scheduler, clean, noise, t)
    expected = {"epsilon": noise, "sample": clean, "v_prediction": scheduler.get_velocity(clean, noise, t)}[kind]
    assert torch.equal(target, expected)
    assert diffusion_loss(target, target).item() == 0.0


def test_unet_follows_params():
    unet = build_unet(Model(block_out_channels=(16, 32, 32), attention_levels=(1,), norm_num_groups=8), 8, 3)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert unet(torch.zeros(2, 3, 8, 8), torch.tensor([1, 2])).sample.shape == (2, 3, 8, 8)


def test_tutorial_attention_placement():
    """The tutorial puts attention at the 5th down block and the 2nd up block of six."""
    unet = build_unet(Model(block_out_channels=(32,) * 6, attention_levels=(4,), norm_num_groups=8), 32, 3)
    assert [i for i, b in enumerate(unet.config.down_block_types) if b.startswith("Attn")] == [4]
    assert [i for i, b in enumerate(unet.config.up_block_types) if b.startswith("Attn")] == [1]


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++"])
def test_samplers_share_the_training_schedule(name):
    noise_scheduler = build_noise_scheduler(Params().scheduler)
    sampler = build_sampler(name, noise_scheduler.config, "leading")
    assert sampler.config.num_train_timesteps == 1000
    assert torch.allclose(sampler.alphas_cumprod, noise_scheduler.alphas_cumprod)
    if name == "dpmsolver++":
        assert sampler.config.algorithm_type == "dpmsolver++" and sampler.config.solver_order == 2


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmsolver++"])
def test_trailing_spacing_starts_from_the_last_training_timestep(name):
    """sample.timestep_spacing: "trailing" starts 50 steps at t = 999 (pure noise) and ends at 19; "leading",
    diffusers' default, starts DDPM and DDIM at 980 and ends at 0 (DPM-Solver++: 950 to 19)."""
    config = build_noise_scheduler(Params().scheduler).config
    trailing, leading = build_sampler(name, config, "trailing"), build_sampler(name, config, "leading")
    trailing.set_timesteps(50)
    leading.set_timesteps(50)
    assert trailing.timesteps.tolist() == list(range(999, 0, -20))
    assert leading.timesteps[0] == (950 if name == "dpmsolver++" else 980)
    assert leading.timesteps[-1] == (19 if name == "dpmsolver++" else 0)
    # null keeps the schedule's own: "leading" for the models trained here, in memory as saved with the model
    assert build_sampler(name, config, None).config.timestep_spacing == "leading"
    assert build_sampler(name, {**config, "timestep_spacing": "trailing"}, None).config.timestep_spacing == "trailing"
    # a config that sets none (SD 1.x's scheduler_config.json) leaves the sampler's diffusers default
    unset = {k: v for k, v in config.items() if k not in ("timestep_spacing", "_use_default_values")}
    default = "linspace" if name == "dpmsolver++" else "leading"
    assert build_sampler(name, unset, None).config.timestep_spacing == default


@pytest.mark.parametrize("spacing, steps", [("linspace", 25), ("trailing", 30)])
def test_ddim_is_refused_where_its_step_misses_its_next_timestep(spacing, steps):
    """diffusers' DDIMScheduler steps from t to t - 1000 // steps whatever its timesteps are: with linspace
    spacing, or trailing with a step count not dividing 1000, that is not the next timestep."""
    config = build_noise_scheduler(Params().scheduler).config
    with pytest.raises(ConfigError, match=rf"ddim with timestep spacing '{spacing}' in {steps} steps"):
        set_steps(build_sampler("ddim", config, spacing), steps)
    for fine, n in (("leading", steps), ("trailing", 25), ("linspace", steps)):
        for name in ("ddim", "ddpm", "dpmsolver++"):
            if (name, fine) != ("ddim", "linspace"):
                sampler = build_sampler(name, config, fine)
                set_steps(sampler, n)
                assert len(sampler.timesteps) == n
