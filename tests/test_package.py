"""The package stage: models/pipeline is the trained pipeline plus a model card the Hub parses, written
from the run's own artifacts. One real run of every stage on the tiny config (builtin:digits, 8 px)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from tests.helpers import check_card, tiny_dict
from workflow.core.config import ConfigError, load_params

STAGES = ("download", "preprocess", "fid_reference", "train", "sample", "evaluate", "package")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, params) of one run of every stage, in order, on the tiny config with the embedded digits."""
    from workflow.__main__ import main

    root = tmp_path_factory.mktemp("run")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_dict(data={"source": "builtin:digits"})))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for stage in STAGES:
            assert main([stage]) == 0, stage
    return root, load_params(root / "params.yaml")


def test_the_card_is_the_runs_own_and_its_snippet_runs(run):
    root, params = run
    check_card(root, params)


def test_the_folder_is_the_trained_pipeline_with_the_evaluated_sampler(run):
    """The weights are train's (hard-linked, not a second copy); the scheduler is the sampler FID was
    measured with; the folder loads with diffusers alone and passes the sample stage's checks."""
    import torch
    from diffusers import DiffusionPipeline

    from workflow.formats.pipeline import load_unet

    root, params = run
    published, trained = root / params.paths.pipeline, root / params.paths.trained
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert os.path.samefile(published / weights, trained / weights)
    assert sorted(p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()) == [
        "README.md",
        "manifest.json",
        "model_index.json",
        "samples.png",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        weights,
    ]
    pipeline = DiffusionPipeline.from_pretrained(published)
    assert type(pipeline).__name__ == "DDIMPipeline" and type(pipeline.scheduler).__name__ == "DDIMScheduler"
    trained_schedule = json.loads((trained / "scheduler/scheduler_config.json").read_text())
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert pipeline.scheduler.config[key] == trained_schedule[key]
    unet, _ = load_unet(published, torch.device("cpu"))
    assert unet.config.sample_size == params.data.resolution


def test_another_sampler_gets_its_scheduler_and_its_snippet(run):
    """dpmsolver++ has no pipeline of its own: DDPMPipeline with the DPM-Solver++ scheduler saved, its
    timestep spacing the evaluated one."""
    from diffusers import DiffusionPipeline

    from workflow.stages.package import run as package

    root, params = run
    params = dataclasses.replace(
        params,
        sample=dataclasses.replace(params.sample, sampler="dpmsolver++", timestep_spacing="trailing"),
        paths=dataclasses.replace(params.paths, pipeline="models/pipeline-dpm"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        package(params)
    pipeline = DiffusionPipeline.from_pretrained(root / "models/pipeline-dpm")
    assert type(pipeline).__name__ == "DDPMPipeline"
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipeline.scheduler.config["algorithm_type"] == "dpmsolver++"
    assert pipeline.scheduler.config["timestep_spacing"] == "trailing"
    assert "steps (trailing spacing)" in (root / "models/pipeline-dpm/README.md").read_text()  # its evaluation table
    check_card(root, params)


def test_a_missing_artifact_names_the_stage_that_makes_it(run):
    from workflow.stages.package import run as package

    root, params = run
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for key, stage in (("metrics", "evaluate"), ("meta", "preprocess"), ("grid", "sample")):
            missing = dataclasses.replace(params, paths=dataclasses.replace(params.paths, **{key: "nowhere"}))
            with pytest.raises(ConfigError, match=f"nowhere: no such file; the {stage} stage makes it"):
                package(missing)
        untrained = dataclasses.replace(params, paths=dataclasses.replace(params.paths, trained="nowhere"))
        with pytest.raises(ConfigError, match="nowhere holds no trained pipeline: run the train stage first"):
            package(untrained)
        summary = root / params.paths.train_log / "summary.json"
        saved = summary.read_text()
        try:  # an older train stage's summary, without the software versions the card lists
            summary.write_text(json.dumps({k: v for k, v in json.loads(saved).items() if k != "software"}))
            with pytest.raises(ConfigError, match=r"summary.json: missing keys \['software'\]; re-run the train"):
                package(params)
        finally:
            summary.write_text(saved)


def test_the_card_says_which_weights_were_published(run):
    """EMA weights by default; a run trained without EMA (the tutorial's recipe, the LoRA preset) says so."""
    from workflow.stages.package import run as package

    root, params = run
    assert params.train.ema and "; EMA weights." in (root / params.paths.pipeline / "README.md").read_text()
    params = dataclasses.replace(
        params,
        train=dataclasses.replace(params.train, ema=False),
        paths=dataclasses.replace(params.paths, pipeline="models/pipeline-no-ema"),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        package(params)
    card = (root / "models/pipeline-no-ema/README.md").read_text()
    assert "the weights of the last step (no EMA)." in card and "EMA weights" not in card


def test_a_class_conditional_card_names_what_was_sampled_and_keeps_its_table_whole():
    """The snippet samples a class the evaluation sampled (class 0 may have no training images) and the
    metadata counts those; a class name with | or a newline stays one table cell."""
    from workflow.core.config import params_from_dict
    from workflow.stages.package import description, usage

    params = params_from_dict(tiny_dict(model={"class_conditional": True}, sample={"guidance_scale": 1.2345678}))
    names = ["empty", "a|b", "two\nlines"]
    snippet = usage(params, object, names, sampled=[1, 2])
    assert "class_labels=[1] * 2, guidance_scale=1.2345678," in snippet and "of class 'a|b'" in snippet
    summary = {"num_parameters": 1234}
    text = description(
        params,
        {
            "kind": "builtin",
            "name": "mnist",
            "count": 3,
            "package": "p",
            "package_version": "1",
            "data_file": "f",
            "data_file_sha256": "0",
        },
        {"count": 3},
        summary,
        names,
    )
    assert "| 1 | a\\|b |\n| 2 | two lines |" in text


def test_a_card_names_a_local_folder_without_the_path_on_the_authors_disk():
    """A published card is public: a local image folder or pipeline outside the project is named, not located
    (/home/<user>/...), in the front matter, the text and the params it shows; one inside it keeps its path."""
    from diffusers import DDIMScheduler, DDPMPipeline

    from workflow.core.config import params_from_dict
    from workflow.stages.package import base_line, local_name, model_card

    cats = "/home/alice/private/cats"
    params = params_from_dict(tiny_dict(data={"source": f"imagefolder:{cats}", "folder": cats}))
    source = {"kind": "imagefolder", "path": cats, "count": 3}
    metrics = {"fid": 1.0, "kid": 0.1, "fid_num_samples": 8, "fid_num_reference": 8, "fid_weights_sha256": "0"}
    metrics["fid_weights_origin"] = "params"
    summary = dict.fromkeys(("steps", "seconds", "loss_final", "images_per_second", "num_parameters"), 1)
    summary |= {"num_processes": 1, "mixed_precision": "no", "compiled": False, "torch_threads": 2}
    summary |= {"device": "cpu", "device_name": "a CPU", "software": {"torch": "2"}}
    card = model_card(params, source, {"count": 3}, metrics, summary, DDPMPipeline, DDIMScheduler(), [])
    assert "a local image folder (`cats`)" in card
    assert "      name: cats\n      type: imagefolder:cats\n" in card  # model-index: dataset
    assert "  source: imagefolder:cats\n" in card and "  folder: cats\n" in card  # the params shown
    assert "/home/alice" not in card
    assert base_line({"kind": "local", "path": "/home/alice/models/sd"}) == "a local pipeline folder (`sd`)"
    assert [local_name(p) for p in ("data/images", "../photos", "~/photos")] == ["data/images", "photos", "photos"]
