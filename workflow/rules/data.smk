rule download:
    input:  # data.folder: with an imagefolder: source, file by file (dvc: by content)
        folder=folder_contents(config["data"]["folder"], config["data"]["source"].startswith("imagefolder:")),
        code=stage_code("download"),
    output:
        raw=directory(PATHS["raw"]),
    params:
        values=params_of("data.source", "data.revision", "data.config", "data.split", "data.image_column",
                         "data.label_column", "data.caption_column"),
        config=PARAMS_FILE,
    log:
        "logs/download.log",
    shell:
        stage("download")


rule download_model:  # text-to-image: the pretrained pipeline's parts; otherwise a record saying there is none
    input:  # model.folder: with a folder: pipeline, file by file (dvc: by content)
        folder=folder_contents(config["model"]["folder"], str(config["model"]["pretrained"]).startswith("folder:")),
        code=stage_code("download_model"),
    output:
        base_model=directory(PATHS["base_model"]),
    params:
        values=params_of("model.pretrained", "model.revision"),
        config=PARAMS_FILE,
    log:
        "logs/download_model.log",
    shell:
        stage("download_model")


rule preprocess:
    input:
        raw=rules.download.output.raw,
        code=stage_code("preprocess"),
    output:
        images=PATHS["images"],
        meta=PATHS["meta"],
        labels=PATHS["labels"],
        captions=PATHS["captions"],
        holdout_images=PATHS["holdout_images"],
        holdout_captions=PATHS["holdout_captions"],
    params:
        values=params_of("seed", "data.resolution", "data.channels", "data.center_crop", "data.max_images",
                         "data.min_images", "data.holdout"),
        config=PARAMS_FILE,
    log:
        "logs/preprocess.log",
    shell:
        stage("preprocess")


rule encode:  # text-to-image: latents and caption embeddings, once; otherwise a record saying the run is in pixels
    input:
        base_model=rules.download_model.output.base_model,
        images=rules.preprocess.output.images,
        captions=rules.preprocess.output.captions,
        code=stage_code("encode"),
    output:
        latents=directory(PATHS["latents"]),
    params:
        values=params_of("encode.batch_size", "encode.max_activation_gib", "encode.storage", "train.random_flip"),
        config=PARAMS_FILE,
    threads: workflow.cores  # CPU runs use every core, as under dvc
    resources:
        **(computing_job() if TEXT_TO_IMAGE else {}),
    log:
        "logs/encode.log",
    shell:
        stage("encode")
