"""The pretrained pipeline's encoders (`paths.base_model`): the VAE that maps images to latents and the
tokenizer + text encoder that map captions to the hidden states the UNet attends to.

    encoders = load_encoders("models/base", device)
    mean, logvar = encode_images(encoders.vae, pixels)           # pixels: float -1..1, N x 3 x H x W
    hidden = encode_captions(encoders, ["a red fox", ...])       # N x L x D, L = the tokenizer's max length

The same calls serve the encode stage (once per dataset) and any on-the-fly encoding (the reference
script's way, which the tests and the benchmark compare against), so both compute exactly the same.
check_encode_memory refuses, from the configs alone, an `encode.batch_size` over `encode.max_activation_gib`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from workflow.core.config import ConfigError, Encode
from workflow.models.memory import GIB, peak_bytes


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


def encode_peak_bytes(vae_config, text_config, batch: int, resolution: int, views: int) -> dict[str, int]:
    """Bytes the encode stage's calls hold at once at their fullest, the inputs included and the weights not:
    the VAE's over `batch` images of `resolution` (with `views` 2, the mirrored copy beside them) and the text
    encoder's over `batch` captions of its full token length (an upper bound: the tokenizer pads to at most
    that). Counted on meta-device copies built from the configs: nothing is allocated."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    with torch.device("meta"):
        vae, text_encoder = AutoencoderKL.from_config(vae_config), CLIPTextModel(text_config)

    def images():
        pixels = torch.zeros(batch, vae.config.in_channels, resolution, resolution, device="meta")
        encode_images(vae, pixels.flip(-1) if views > 1 else pixels)

    def captions():
        ids = torch.zeros(batch, text_config.max_position_embeddings, dtype=torch.long, device="meta")
        text_encoder(ids, return_dict=False)

    return {"vae": peak_bytes(images), "text_encoder": peak_bytes(captions)}


def check_encode_memory(base: str | Path, settings: Encode, resolution: int, views: int) -> dict[str, float]:
    """Refuse, before the encoders' weights load, an `encode.batch_size` whose VAE or text encoder call would
    hold more than `encode.max_activation_gib` (encode_peak_bytes on the configs in `base`). Returns the GiB."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    try:
        vae_config = AutoencoderKL.load_config(str(base), subfolder="vae")
        text_config = CLIPTextConfig.from_json_file(Path(base) / "text_encoder" / "config.json")  # no weights
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{base}: cannot read the pretrained encoders' configs ({exc}); re-run download_model"
        ) from None
    peaks = encode_peak_bytes(vae_config, text_config, settings.batch_size, resolution, views)
    gib = {name: nbytes / GIB for name, nbytes in peaks.items()}
    what = {
        "vae": f"images at `data.resolution` {resolution}"
        + (" and their mirror images (`train.random_flip`)" if views > 1 else "")
        + " in the VAE encoder",
        "text_encoder": "captions in the text encoder",
    }
    for name, size in gib.items():
        if size > settings.max_activation_gib:
            raise ConfigError(
                f"`encode.batch_size` ({settings.batch_size:,}) {what[name]} of {base} hold about {size:,.1f} GiB "
                f"at once, over `encode.max_activation_gib` ({settings.max_activation_gib:,}): lower "
                "`encode.batch_size`, or raise the cap"
            )
    return gib


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
