"""The pretrained pipeline's encoders (`paths.base_model`): the VAE that maps images to latents and the
tokenizer + text encoder that map captions to the hidden states the UNet attends to.

    encoders = load_encoders("models/base", device)
    mean, logvar = encode_images(encoders.vae, pixels)           # pixels: float -1..1, N x 3 x H x W
    hidden = encode_captions(encoders, ["a red fox", ...])       # N x L x D, L = the tokenizer's max length

The same calls serve the encode stage (once per dataset) and any on-the-fly encoding (the reference
script's way, which the tests and the benchmark compare against), so both compute exactly the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workflow.core.config import ConfigError


@dataclass
class Encoders:
    vae: torch.nn.Module
    tokenizer: object
    text_encoder: torch.nn.Module

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along a side (8 for SD; a VAE with fewer blocks downsamples less)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def load_encoders(base: str | Path, device: torch.device) -> Encoders:
    """The VAE, tokenizer and text encoder of the pipeline in `base` (float32, as saved) on `device`, in eval mode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    base = str(base)  # diffusers' pipeline layout: one subfolder per component
    try:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{base}: cannot load the pretrained encoders ({exc}); re-run download_model") from None
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval().to(device)  # float32, as loaded
    return Encoders(vae, tokenizer, text_encoder)


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of each image's latent distribution, the log-variance clamped as diffusers does."""
    dist = vae.encode(pixels).latent_dist
    return dist.mean, dist.logvar


def token_ids(encoders: Encoders, captions: list[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's max length, as the reference script makes them."""
    length = encoders.tokenizer.model_max_length
    tokens = encoders.tokenizer(list(captions), max_length=length, padding="max_length", truncation=True)
    return torch.tensor(tokens.input_ids, dtype=torch.long)


@torch.no_grad()
def encode_captions(encoders: Encoders, captions: list[str]) -> torch.Tensor:
    """The text encoder's last hidden states, N x L x D."""
    device = next(encoders.text_encoder.parameters()).device
    return encoders.text_encoder(token_ids(encoders, captions).to(device), return_dict=False)[0]
