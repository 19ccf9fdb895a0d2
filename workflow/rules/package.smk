rule package:  # models/pipeline: the trained pipeline + its model card, ready for `hf upload`
    input:
        pipeline=rules.train.output.pipeline,
        base_model=rules.download_model.output.base_model,
        grid=rules.sample.output.grid,
        metrics=rules.evaluate.output.metrics,
        raw=rules.download.output.raw,
        meta=rules.preprocess.output.meta,
        train_log=rules.train.output.train_log,
        labels=rules.preprocess.output.labels,
        code=stage_code("package"),
    output:
        pipeline=directory(PATHS["pipeline"]),
    params:
        values=params_of("seed", "data", "model", "scheduler", "train", "sample"),  # what the model card shows
        config=PARAMS_FILE,
    log:
        "logs/package.log",
    shell:
        stage("package")
