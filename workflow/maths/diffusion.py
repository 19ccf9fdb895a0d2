"""The diffusion maths of training, as plain functions on tensors (no I/O, no state).

Also the run's random streams: everything random in a training step is a function of
(seed, step), so a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def stream_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys, e.g. (seed, step) or (seed, image index)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Dataset indices of the global batch at `step`: epochs are seeded permutations laid end to end."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, n)
    return np.array(
        [_epoch_permutation(seed, int(e), n)[o] for e, o in zip(epochs, offsets, strict=True)], dtype=np.int64
    )


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float -1..1."""
    return images_uint8.float().div_(127.5).sub_(1.0)


def step_noise(
    seed: int, step: int, shape: tuple, num_train_timesteps: int, device, noise_offset: float = 0.0
) -> tuple:
    """(noise, timesteps, flip mask) for the whole global batch of `step`, from the (seed, step) stream.

    Drawn for the global batch on every process, so each process's shard equals the matching
    slice of a single-process run. The offset noise (one value per image and channel) is drawn
    last, so switching it on leaves the other draws unchanged."""
    g = torch.Generator(device=device).manual_seed(stream_seed(seed, step))
    noise = torch.randn(shape, generator=g, device=device)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=g, device=device)
    flip = torch.rand(shape[0], generator=g, device=device) < 0.5
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*shape[:2], 1, 1), generator=g, device=device)
    return noise, timesteps, flip


LABEL_STREAM, LATENT_STREAM = 1, 2  # a step's other streams: label dropout; the latent draws and caption choice


def latent_draws(seed: int, step: int, shape: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise for sampling each image's latent from its distribution, a uniform number per image that picks
    one of its captions) for the global batch of `step`. A stream of its own: step_noise's draws are the
    same whether or not the run is latent."""
    g = torch.Generator(device=device).manual_seed(stream_seed(seed, step, LATENT_STREAM))
    noise = torch.randn(shape, generator=g, device=device)
    return noise, torch.rand(shape[0], generator=g, device=device)


def pick_captions(offsets: torch.Tensor, index: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The caption row of each image `index`: one of its captions offsets[i] .. offsets[i + 1] - 1, chosen by
    `uniform` (in [0, 1)), as the reference script's random.choice per step."""
    first, count = offsets[index], offsets[index + 1] - offsets[index]
    return first + torch.minimum((uniform * count).long(), count - 1)


def latent_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """A draw from a VAE's latent distribution, scaled for the UNet: what diffusers'
    `vae.encode(x).latent_dist.sample() * scaling_factor` computes, with the noise given."""
    return (mean + torch.exp(0.5 * logvar) * noise) * scaling_factor


def apply_flip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the images where `flip` is true (augmentation on the device, no host round trip)."""
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to predict, by the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    raise AssertionError(f"unhandled prediction type {kind}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-image loss weights of Min-SNR-gamma (Hang et al. 2023), by prediction type."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps).float()
    clipped = torch.clamp(snr, max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        # min(snr, gamma) / snr -> 1 as snr -> 0: the terminal step of a zero-terminal-SNR schedule
        # (rescale_betas_zero_snr) would otherwise weigh 0/0 = NaN
        return torch.where(snr > 0, clipped / snr, torch.ones_like(snr))
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # "sample": the x0 loss already carries a factor snr


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in float32 whatever the autocast dtype; per-image `weights` if given."""
    if weights is None:
        return F.mse_loss(prediction.float(), target.float())
    per_image = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_image * weights).mean()


# --- class conditioning and classifier-free guidance (Ho & Salimans 2022) --------------------------


def label_dropout_mask(seed: int, step: int, batch_size: int, rate: float, device) -> torch.Tensor:
    """Which labels of the global batch of `step` become "no class": its own (seed, step, 1) stream,
    so conditioning leaves every other draw of the step unchanged."""
    g = torch.Generator(device=device).manual_seed(stream_seed(seed, step, LABEL_STREAM))
    return torch.rand(batch_size, generator=g, device=device) < rate


def drop_labels(labels: torch.Tensor, drop: torch.Tensor, null_class: int) -> torch.Tensor:
    """`labels` with the entries `drop` marks replaced by the "no class" index."""
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def guided(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond); w = 1 conditional, 0 unconditional."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sample_classes(classes: list[int], shares, count: int, columns: int) -> np.ndarray:
    """The class of samples 0..count-1 of a FID sample set. First `columns` rounds of `classes` in turn
    (sample r + k * c is classes[r]: the grid's rows), then the rest apportioned so each class's total
    follows `shares` (its number of training images: FID compares with images drawn at those
    proportions), by largest remainders, interleaved so that any prefix keeps the proportions too."""
    classes = np.asarray(classes, dtype=np.int64)
    shares = np.asarray(shares, dtype=np.float64)
    head = np.tile(classes, columns)
    rest = count - len(head)
    if rest < 0 or len(shares) != len(classes) or shares.min() < 0 or shares.sum() <= 0:
        raise ValueError(f"cannot give {count} samples to classes {classes.tolist()} with shares {shares.tolist()}")
    # what each class still needs beyond its grid columns to reach its share of `count`
    need = np.clip(count * shares / shares.sum() - columns, 0, None)
    need = need if need.sum() > 0 else shares
    exact = rest * need / need.sum()
    extra = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - extra), kind="stable")
    extra[by_remainder[: rest - int(extra.sum())]] += 1
    # sample j of a class with n extra sits at (j + 1/2) / n of the tail
    position = np.concatenate([(np.arange(n) + 0.5) / max(n, 1) for n in extra])
    owner = np.repeat(classes, extra)
    return np.concatenate([head, owner[np.argsort(position, kind="stable")]]).astype(np.int64)
