rule fid_reference:
    input:
        images=rules.preprocess.output.images,
        code=code("fid_reference", "fid", "inception", "runtime"),
    output:
        fid_ref=P["fid_ref"],
    params:
        values=params_of("seed", "fid.num_reference", "fid.weights", "fid.weights_sha256", "fid.batch_size"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        gpu=1,
    log:
        "logs/fid_reference.log",
    shell:
        stage("fid_reference")


rule evaluate:
    input:
        samples=rules.sample.output.samples,
        fid_ref=rules.fid_reference.output.fid_ref,
        train_log=rules.train.output.train_log,
        code=code("evaluate", "reference", "fid", "inception", "runtime"),
    output:
        metrics=report(P["metrics"], caption="../captions/metrics.rst", category="Metrics"),
    params:
        values=params_of("seed", "fid.weights", "fid.weights_sha256", "fid.batch_size"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        gpu=1,
    log:
        "logs/evaluate.log",
    shell:
        stage("evaluate")


rule fid_steps:  # off unless fid.steps_sweep lists step counts; then one FID per count, for `dvc plots`
    input:
        pipeline=rules.train.output.pipeline,
        fid_ref=rules.fid_reference.output.fid_ref,
        code=code("fid_steps", "sampling", "reference", "fid", "inception", "diffusion", "model", "runtime"),
    output:
        fid_steps=P["fid_steps"],
    params:
        values=params_of("seed", "sample.sampler", "sample.eta", "sample.batch_size", "sample.mixed_precision",
                         "sample.compile", "fid.num_samples", "fid.steps_sweep", "fid.weights",
                         "fid.weights_sha256", "fid.batch_size"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        gpu=1,
    log:
        "logs/fid_steps.log",
    shell:
        stage("fid_steps")


rule report:
    input:
        raw=rules.download.output.raw,
        meta=rules.preprocess.output.meta,
        train_log=rules.train.output.train_log,
        grid=rules.sample.output.grid,
        metrics=rules.evaluate.output.metrics,
        code=code("report", "trainlog", "curves", "htmlpage"),
    output:
        report=report(P["report"], caption="../captions/run_report.rst", category="Run report"),
        loss_plot=report(P["loss_plot"], caption="../captions/loss.rst", category="Training"),
    params:
        values=params_of("seed", "paths", "data", "model", "scheduler", "train", "sample", "fid"),
        config=PARAMS_FILE,
    log:
        "logs/report.log",
    shell:
        stage("report")
