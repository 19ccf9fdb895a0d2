"""Stable Diffusion 1.x pipelines with random weights: at SD 1.5's shapes, or tiny.

    save_random_pipeline("/tmp/sd15", "sd15")   # UNet 859.5 M, VAE 83.7 M, CLIP text encoder 123.1 M parameters
    save_random_pipeline("/tmp/tiny", "tiny")   # a 1 M-parameter UNet, a VAE that downsamples by 2: the tests'

What `bench encode --random` times where no real weights can be had (the lent GPU machines reach no
Hub): a step costs the same whatever the weights' values, so SD 1.5's shapes time as SD 1.5 does. The
layout is the Hub's (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; safetensors),
so `model.pretrained: folder:<path>` and download_model take it as they take a real one. The tokenizer's
vocabulary is written here by hand in CLIP's format (SD 1.x's files: vocab.json, merges.txt,
special_tokens_map.json, tokenizer_config.json): 256 byte symbols, the same with `</w>`, a few merges and
the two specials. The scheduler is SD's PNDM. Seeded: the same bytes every time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MERGES = ["t h", "th e</w>", "a n", "an d</w>", "o n", "i n", "e r", "a r</w>"]
SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
# {shapes: (UNet, VAE, CLIP text encoder, tokenizer max length, text vocabulary rows)}; sd15 = SD 1.5's configs
SHAPES = {
    "sd15": (
        {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        },
        {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512},
        {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        77,
        49408,
    ),
    "tiny": (
        {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
            "attention_head_dim": 8,
        },
        {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 16},
        {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4},
        16,
        None,  # as many rows as the hand-written vocabulary
    ),
}


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


def write_tokenizer(folder: Path, max_length: int) -> dict[str, int]:
    """SD 1.x's tokenizer files into `folder`; the vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")  # line 1 is skipped
    special = {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1], "unk_token": SPECIAL[1], "pad_token": SPECIAL[1]}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return vocab


def components(shapes: str, vocab: dict[str, int]) -> dict:
    """The UNet, VAE and text encoder of `shapes`, built with random weights (in the current default device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet, vae, text, max_length, rows = SHAPES[shapes]
    levels = len(vae["block_out_channels"])
    return {
        "unet": UNet2DConditionModel(in_channels=4, out_channels=4, norm_num_groups=32, **unet),
        "vae": AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            latent_channels=4,
            norm_num_groups=32,
            **vae,
        ),
        "text_encoder": CLIPTextModel(
            CLIPTextConfig(
                vocab_size=rows or len(vocab),
                max_position_embeddings=max_length,
                bos_token_id=vocab[SPECIAL[0]],
                eos_token_id=vocab[SPECIAL[1]],
                pad_token_id=vocab[SPECIAL[1]],
                **text,
            )
        ),
    }


def save_random_pipeline(folder: str | Path, shapes: str = "tiny", seed: int = 0) -> Path:
    """The pipeline of `shapes` ("sd15" | "tiny") with random weights, in `folder` (replaced if there)."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    tokenizer_dir = folder.parent / f".{folder.name}-tokenizer"
    vocab = write_tokenizer(tokenizer_dir, SHAPES[shapes][3])
    torch.manual_seed(seed)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, set_alpha_to_one=False
    )
    pipe = StableDiffusionPipeline(
        **components(shapes, vocab),
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "tokenizer")  # transformers 5 writes tokenizer.json only: SD 1.x's files instead
    shutil.move(tokenizer_dir, folder / "tokenizer")
    return folder
