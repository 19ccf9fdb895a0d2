"""Reproducible unconditional image diffusion: download -> preprocess -> fid_reference -> train ->
sample -> evaluate (+ fid_steps) -> report, and package (the trained pipeline with its model card). Run one stage with `python -m workflow <stage>`; the whole DAG with
`dvc repro` or `snakemake --cores all`.
"""
STAGES = ("download", "preprocess", "fid_reference", "train", "sample", "evaluate", "fid_steps", "report",
          "package")
