# Compute rules take every core: Snakemake sets OMP_NUM_THREADS to a job's `threads` (default 1),
# which would halve CPU speed and change float summation order against a `dvc repro` run.
# models/checkpoints is deliberately not an output: Snakemake deletes a failed job's outputs,
# and the checkpoints are what a re-run resumes from.
rule train:
    input:
        images=rules.preprocess.output.images,
        labels=rules.preprocess.output.labels,
        latents=rules.encode.output.latents,
        base_model=rules.download_model.output.base_model,
        code=stage_code("train"),
    output:
        pipeline=directory(PATHS["trained"]),
        train_log=report(directory(PATHS["train_log"]), patterns=["grids/step-{step}.png"],
                         caption="../pages/captions/progress.rst", category="Training", subcategory="Progress grids"),
    params:
        values=params_of("seed", "model", "scheduler", "train"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **computing_job(gpus=config["train"]["num_processes"]),
    log:
        "logs/train.log",
    shell:
        stage("train")


rule sample:
    input:
        pipeline=rules.train.output.pipeline,
        base_model=rules.download_model.output.base_model,
        captions=rules.preprocess.output.captions,
        holdout_captions=rules.preprocess.output.holdout_captions,
        labels=rules.preprocess.output.labels,
        code=stage_code("sample"),
    output:
        samples=directory(PATHS["samples"]),
        grid=report(PATHS["grid"], caption="../pages/captions/grid.rst", category="Samples"),
    params:
        values=params_of("seed", "sample", "fid.num_samples", "model.pretrained", "data.resolution", "data.holdout"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **computing_job(),
    log:
        "logs/sample.log",
    shell:
        stage("sample")
