rule download:
    input:
        folder=config["data"]["folder"],  # imagefolder: data (Snakemake re-runs on a newer mtime, dvc on content)
        code=stage_code("download"),
    output:
        raw=directory(PATHS["raw"]),
    params:
        values=params_of("data.source", "data.revision", "data.config", "data.split", "data.image_column",
                         "data.label_column"),
        config=PARAMS_FILE,
    log:
        "logs/download.log",
    shell:
        stage("download")


rule preprocess:
    input:
        raw=rules.download.output.raw,
        code=stage_code("preprocess"),
    output:
        images=PATHS["images"],
        meta=PATHS["meta"],
        labels=PATHS["labels"],
    params:
        values=params_of("seed", "data.resolution", "data.channels", "data.center_crop", "data.max_images",
                         "data.min_images"),
        config=PARAMS_FILE,
    log:
        "logs/preprocess.log",
    shell:
        stage("preprocess")
