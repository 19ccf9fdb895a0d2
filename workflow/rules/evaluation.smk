rule fid_reference:
    input:
        images=rules.preprocess.output.images,
        holdout_images=rules.preprocess.output.holdout_images,
        labels=rules.preprocess.output.labels,
        code=stage_code("fid_reference"),
    output:
        fid_ref=PATHS["fid_ref"],
    params:
        values=params_of("seed", "data.holdout", "sample.classes", "fid.num_reference", "fid.weights",
                         "fid.weights_sha256", "fid.batch_size", "fid.max_activation_gib"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **computing_job(),
    log:
        "logs/fid_reference.log",
    shell:
        stage("fid_reference")


rule evaluate:
    input:
        samples=rules.sample.output.samples,
        fid_ref=rules.fid_reference.output.fid_ref,
        train_log=rules.train.output.train_log,
        code=stage_code("evaluate"),
    output:
        metrics=report(PATHS["metrics"], caption="../pages/captions/metrics.rst", category="Metrics"),
    params:
        values=params_of("seed", "fid.weights", "fid.weights_sha256", "fid.batch_size", "fid.max_activation_gib"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **computing_job(),
    log:
        "logs/evaluate.log",
    shell:
        stage("evaluate")


rule fid_sweep:  # off unless fid.steps_sweep or fid.guidance_sweep lists values; then one FID per value, for `dvc plots`
    input:
        pipeline=rules.train.output.pipeline,
        fid_ref=rules.fid_reference.output.fid_ref,
        base_model=rules.download_model.output.base_model,
        captions=rules.preprocess.output.captions,
        holdout_captions=rules.preprocess.output.holdout_captions,
        labels=rules.preprocess.output.labels,
        code=stage_code("fid_sweep"),
    output:
        fid_steps=PATHS["fid_steps"],
        fid_guidance=PATHS["fid_guidance"],
    params:
        values=params_of("seed", "sample.sampler", "sample.num_inference_steps", "sample.eta", "sample.timestep_spacing",
                         "sample.batch_size", "sample.max_activation_gib", "sample.mixed_precision", "sample.compile",
                         "sample.guidance_scale", "sample.classes",
                         "sample.grid_size", "sample.negative_prompt", "model.pretrained", "data.resolution", "data.holdout",
                         "fid.num_samples", "fid.steps_sweep", "fid.guidance_sweep", "fid.weights",
                         "fid.weights_sha256", "fid.batch_size", "fid.max_activation_gib"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **computing_job(),
    log:
        "logs/fid_sweep.log",
    shell:
        stage("fid_sweep")


rule report:
    input:
        raw=rules.download.output.raw,
        meta=rules.preprocess.output.meta,
        train_log=rules.train.output.train_log,
        grid=rules.sample.output.grid,
        metrics=rules.evaluate.output.metrics,
        fid_steps=rules.fid_sweep.output.fid_steps,
        fid_guidance=rules.fid_sweep.output.fid_guidance,
        base_model=rules.download_model.output.base_model,
        code=stage_code("report"),
    output:
        report=report(PATHS["report"], caption="../pages/captions/run_report.rst", category="Run report"),
        loss_plot=report(PATHS["loss_plot"], caption="../pages/captions/loss.rst", category="Training"),
    params:
        values=params_of("seed", "paths", "data", "model", "scheduler", "train", "sample", "fid", "encode", "cluster"),
        config=PARAMS_FILE,
    log:
        "logs/report.log",
    shell:
        stage("report")
