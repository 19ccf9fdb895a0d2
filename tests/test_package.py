"""The package stage: models/pipeline is the trained pipeline plus a model card the Hub parses, written
from the run's own artifacts. One real run of every stage on the tiny config (builtin:digits, 8 px)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_dict
from workflow.core.artifacts import manifest_damage
from workflow.core.config import ConfigError, Params, load_params

STAGES = ("download", "preprocess", "fid_reference", "train", "sample", "evaluate", "package")


def card_parts(card: str) -> tuple[dict, str]:
    """(the YAML front matter, parsed; the Markdown body) of a model card."""
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def card_snippet(body: str) -> str:
    (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    return code


def check_card(root: Path, params: Params) -> None:
    """The card in `root`/paths.pipeline against the artifacts of the run in `root`, value for value;
    its three usage lines run as written, from `root`."""
    from huggingface_hub import ModelCard

    paths = params.paths
    folder = root / paths.pipeline
    meta, body = card_parts((folder / "README.md").read_text())
    metrics = json.loads((root / paths.metrics).read_text())
    source = json.loads((root / paths.raw / "SOURCE.json").read_text())
    summary = json.loads((root / paths.train_log / "summary.json").read_text())

    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"diffusers", "unconditional-image-generation"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["task"]["type"] == "unconditional-image-generation"
    if source["kind"] == "hf":
        assert meta["datasets"] == [source["repo_id"]] == [result["dataset"]["type"]]
        assert result["dataset"]["revision"] == source["sha"] and result["dataset"]["split"] == source["split"]
        assert result["dataset"].get("config") == source.get("config")
    else:
        assert "datasets" not in meta and result["dataset"]["type"] == params.data.source
    scores = {m["type"]: m for m in result["metrics"]}
    assert set(scores) == {"fid", "kid"}
    for kind, score in scores.items():
        assert score["value"] == metrics[kind]
        assert score["args"]["num_samples"] == metrics["fid_num_samples"] == params.fid.num_samples
        assert score["args"]["num_reference"] == metrics["fid_num_reference"]
        assert score["args"]["sampler"] == params.sample.sampler
        assert score["args"]["num_inference_steps"] == params.sample.num_inference_steps
    parsed = ModelCard.load(folder / "README.md").data  # the Hub's own parser
    assert parsed.library_name == "diffusers" and {r.metric_type for r in parsed.eval_results} == {"fid", "kid"}

    assert "](samples.png)" in body
    assert (folder / "samples.png").read_bytes() == (root / paths.grid).read_bytes()
    (recipe,) = re.findall(r"```yaml\n(.*?)```", body, flags=re.S)
    assert yaml.safe_load(recipe) == {"seed": params.seed, **{k: params.to_dict()[k]
                                                             for k in ("data", "model", "scheduler", "train")}}
    assert f"{summary['steps']:,} steps" in body and summary["device_name"] in body
    assert all(f"{name} {version}" in body for name, version in summary["software"].items())
    assert manifest_damage(folder) is None

    code = card_snippet(body)
    assert len(code.splitlines()) == 3 and f'from_pretrained("{paths.pipeline}")' in code
    here = os.getcwd()
    os.chdir(root)
    try:
        namespace = {}
        exec(code, namespace)  # noqa: S102 -- the card's own text, as a reader would paste it
    finally:
        os.chdir(here)
    images = namespace["images"]
    size = params.data.resolution
    assert len(images) == params.sample.grid_size ** 2 and all(im.size == (size, size) for im in images)
    assert len({im.tobytes() for im in images}) == len(images)  # distinct samples, not a constant


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
        "README.md", "manifest.json", "model_index.json", "samples.png", "scheduler/scheduler_config.json",
        "unet/config.json", weights]
    pipeline = DiffusionPipeline.from_pretrained(published)
    assert type(pipeline).__name__ == "DDIMPipeline" and type(pipeline.scheduler).__name__ == "DDIMScheduler"
    trained_schedule = json.loads((trained / "scheduler/scheduler_config.json").read_text())
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
        assert pipeline.scheduler.config[key] == trained_schedule[key]
    unet, _ = load_unet(published, torch.device("cpu"))
    assert unet.config.sample_size == params.data.resolution


def test_another_sampler_gets_its_scheduler_and_its_snippet(run):
    """dpmsolver++ has no pipeline of its own: DDPMPipeline with the DPM-Solver++ scheduler saved."""
    from diffusers import DiffusionPipeline

    from workflow.stages.package import run as package

    root, params = run
    params = dataclasses.replace(params, sample=dataclasses.replace(params.sample, sampler="dpmsolver++"),
                                 paths=dataclasses.replace(params.paths, pipeline="models/pipeline-dpm"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        package(params)
    pipeline = DiffusionPipeline.from_pretrained(root / "models/pipeline-dpm")
    assert type(pipeline).__name__ == "DDPMPipeline"
    assert type(pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipeline.scheduler.config["algorithm_type"] == "dpmsolver++"
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
