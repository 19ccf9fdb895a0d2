"""Reproducible image diffusion: download -> preprocess -> fid_reference -> train -> sample -> evaluate
(+ fid_sweep) -> report, and package (the trained pipeline with its model card). Text-to-image
fine-tuning adds download_model (the pretrained pipeline) and encode (latents and caption embeddings,
once) before train; for the other runs they write a record saying there is nothing to do.

Run one stage with `python -m workflow <stage>`; the whole DAG with `dvc repro` or `snakemake --cores all`.
The layers of this package, what each may import and where new code goes: docs/ARCHITECTURE.md
(tests/test_layers.py enforces it).
"""

STAGES = (
    "download",
    "download_model",
    "preprocess",
    "encode",
    "fid_reference",
    "train",
    "sample",
    "evaluate",
    "fid_sweep",
    "report",
    "package",
)
# The stages that compute on the device: each takes a device slot (workflow/core/slots.py) while it runs.
DEVICE_STAGES = ("encode", "fid_reference", "train", "sample", "evaluate", "fid_sweep")
TOOLS = ("bench", "compare", "preset", "pull", "quality")
