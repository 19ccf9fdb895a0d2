"""A tiny Stable Diffusion 1.x pipeline with random weights, saved in the Hub's layout, for the tests.

    from tests.tiny_sd import save_tiny_sd
    folder = save_tiny_sd(tmp / "tiny-sd")     # model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/

The real layout at a small size: a UNet2DConditionModel with cross-attention, an AutoencoderKL that
downsamples by 2 (two blocks, so `vae_scale_factor` is 2, not SD's 8), a two-layer CLIPTextModel and a
CLIP tokenizer whose vocabulary is written here by hand (SD 1.x's files: vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json), a PNDMScheduler as SD's own. Weights are safetensors
only, as `model.pretrained` downloads them. Seeded: the same folder bytes every time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MAX_LENGTH = 16  # the tokenizer's model_max_length: hidden states are 16 x 32 per caption
MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "a r</w>"]
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]


def byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol table (CLIP's BPE works on these), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def clip_vocabulary() -> dict[str, int]:
    """CLIP's vocabulary order: 256 byte symbols, the same with `</w>`, one entry per merge, the specials."""
    base = byte_symbols()
    tokens = base + [s + "</w>" for s in base] + [m.replace(" ", "") for m in MERGES] + SPECIAL
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer(folder: Path) -> dict[str, int]:
    """SD 1.x's tokenizer files into `folder`; the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")  # line 1 is skipped
    special = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """The tiny pipeline in `folder` (replaced if there); returns `folder`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer_dir = folder.parent / f".{folder.name}-tokenizer"
    vocab = write_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LENGTH,
            bos_token_id=vocab[SPECIAL[0]],
            eos_token_id=vocab[SPECIAL[1]],
            pad_token_id=vocab[SPECIAL[1]],
        )
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")  # transformers 5 writes tokenizer.json only: SD 1.x's files instead
    shutil.move(tokenizer_dir, folder / "tokenizer")
    return folder
