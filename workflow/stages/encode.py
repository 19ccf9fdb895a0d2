"""Stage encode (text-to-image runs): each training image's latent distribution and each caption's
text-encoder hidden states, computed once, so training never loads the VAE or the text encoder.

    python -m workflow encode [--params params.yaml]

Reads `paths.base_model` (download_model), `paths.images` and `paths.captions` (preprocess); writes
`paths.latents` (workflow/formats/encodings.py). With `train.random_flip`, each image is also encoded
mirrored (the VAE does not commute with a flip), and training picks the view its flip draw says.
Without `model.pretrained` it writes a record saying the run trains in pixel space, and loads nothing.
The encoders run in float32 (`encode.batch_size` images or captions per call) on the GPU if there is one;
their output is stored as `encode.storage` says (float16 by default: half the size, and refused where a
value exceeds float16's range). A batch whose call would hold more than `encode.max_activation_gib` is refused
before the encoders load (measured on the meta device from their configs).
"""

from __future__ import annotations

from workflow.core.config import ConfigError, Params
from workflow.formats.base_model import read_base
from workflow.formats.encodings import write_pixel_space


def run(params: Params) -> dict:
    base = read_base(params.paths.base_model)
    if base["kind"] == "none":
        write_pixel_space(params.paths.latents)
        return {"latent": False}
    return encode(params, base)


def encode(params: Params, base: dict) -> dict:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from workflow.core.artifacts import sha256_file
    from workflow.core.runtime import Runtime
    from workflow.formats.base_model import base_sha256
    from workflow.formats.captions import load_captions
    from workflow.formats.encodings import encoding_writer, put
    from workflow.formats.training_images import load_images
    from workflow.maths.diffusion import to_model_range
    from workflow.models.latent import check_encode_memory, encode_captions, encode_images, load_encoders

    paths, size = params.paths, params.encode.batch_size
    views = 2 if params.train.random_flip else 1
    # before any weights load, and before the dataset is hashed: a refused batch costs no read of it
    check_encode_memory(paths.base_model, params.encode, params.data.resolution, views)
    # hashed before they are read: were they replaced while encoding, the record then names the files encoded
    # (train sees the change and asks for a re-run), not the new ones beside latents of the old
    sources = {
        "base_sha256": base_sha256(paths.base_model),
        "images_sha256": sha256_file(paths.images),
        "captions_sha256": sha256_file(paths.captions),
    }
    images, captions = load_images(paths.images), load_captions(paths.captions)
    if len(captions) != len(images):
        raise ConfigError(
            f"{paths.captions}: captions for {len(captions)} images, {paths.images} holds {len(images)}; "
            "text-to-image needs `data.caption_column` (re-run download and preprocess)"
        )
    device = Runtime.detect().device
    encoders = load_encoders(paths.base_model, device)
    factor, resolution = encoders.scale_factor, images.shape[-1]
    if resolution % factor:
        raise ConfigError(
            f"`data.resolution` ({resolution}) must be divisible by the VAE's downsampling factor ({factor}) "
            f"of {params.model.pretrained}"
        )
    latent_shape = (encoders.vae.config.latent_channels, resolution // factor, resolution // factor)
    flat = [caption for image in captions for caption in image]
    text_shape = tuple(encode_captions(encoders, flat[:1]).shape[1:])
    storage = params.encode.storage
    with encoding_writer(paths.latents, len(images), views, latent_shape, len(flat), text_shape, storage) as out:
        for start in tqdm(range(0, len(images), size), desc="encode images", unit="batch"):
            pixels = to_model_range(torch.from_numpy(np.array(images[start : start + size])).to(device))
            rows = slice(start, start + size)
            for view in range(views):
                mean, logvar = encode_images(encoders.vae, pixels.flip(-1) if view else pixels)
                put(out.mean, (rows, view), mean.cpu().numpy(), "latent mean")
                put(out.logvar, (rows, view), logvar.cpu().numpy(), "latent log-variance")
        for start in tqdm(range(0, len(flat), size), desc="encode captions", unit="batch"):
            hidden = encode_captions(encoders, flat[start : start + size]).cpu().numpy()
            put(out.text, slice(start, start + size), hidden, "caption embedding")
        out.offsets[:] = np.cumsum([0] + [len(c) for c in captions])
        out.record |= {
            "scaling_factor": float(encoders.vae.config.scaling_factor),
            "vae_scale_factor": factor,
            "base": {key: base[key] for key in ("kind", "repo_id", "sha", "path") if key in base},
            **sources,
            "device": device.type,
        }
        record = dict(out.record)
    return record


def headline(record: dict, params: Params) -> str:
    if not record["latent"]:
        return f"encode: no `model.pretrained`, the run trains in pixel space -> {params.paths.latents}"
    shape = " x ".join(map(str, record["latent_shape"]))
    return (
        f"encode: {record['count']} images x {record['views']} view(s) -> latents {shape}, "
        f"{record['captions']} captions, {record['storage']} -> {params.paths.latents}"
    )
