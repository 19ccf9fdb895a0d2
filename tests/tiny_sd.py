"""The tests' tiny Stable Diffusion 1.x pipeline with random weights, in the Hub's layout
(workflow/tools/random_pipeline.py builds it, and SD 1.5-sized ones for the benchmark).

    from tests.tiny_sd import save_tiny_sd
    folder = save_tiny_sd(tmp / "tiny-sd")     # model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/

A UNet2DConditionModel with cross-attention (1 M parameters), an AutoencoderKL that downsamples by 2 (two
blocks, so `vae_scale_factor` is 2, not SD's 8), a two-layer CLIPTextModel, a hand-written CLIP vocabulary
(captions become 16 tokens: hidden states 16 x 32) and SD's PNDMScheduler; safetensors weights only.
"""

from __future__ import annotations

from pathlib import Path

from workflow.tools.random_pipeline import save_random_pipeline


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    return save_random_pipeline(folder, "tiny", seed)
