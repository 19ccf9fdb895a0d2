"""dvc.yaml and the Snakefile declare one DAG: same stages, commands, deps, outs and params."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, sh
from workflow import STAGES
from workflow.core.code_deps import stage_code
from workflow.formats import trainlog


def dvc_stages():
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    stages = {}
    for stage in repo.index.stages:
        files = {d.def_path for d in stage.deps if type(d).__name__ != "ParamsDependency"}
        params = {k for d in stage.deps if type(d).__name__ == "ParamsDependency" for k in d.params}
        stages[stage.name] = {
            "cmd": stage.cmd,
            "deps": files,
            "params": params,
            "outs": {o.def_path for o in stage.outs if not o.persist},
            "persist": {o.def_path for o in stage.outs if o.persist},
        }
    return stages


CLUSTER_RESOURCES = ("gpu", "cpus_per_task", "mem_mb", "runtime")


def snakemake_rules():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    cwd = os.getcwd()
    try:
        with SnakemakeApi() as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=2), snakefile=ROOT / "Snakefile", workdir=ROOT
            )._workflow
            return {
                rule.name: {
                    "cmd": rule.shellcmd,
                    "deps": set(rule.input),
                    "outs": set(rule.output),
                    "params": set(rule.params.values) if rule.params else set(),
                    "params_file": dict(rule.params.items()).get("config"),
                    "log": list(rule.log),
                    "resources": {k: rule.resources[k] for k in CLUSTER_RESOURCES if k in rule.resources},
                    "local": rule.name in workflow._localrules,
                }
                for rule in workflow.rules
                if rule.name != "all"
            }
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def both():
    return dvc_stages(), snakemake_rules()


def test_one_vocabulary_of_stage_names(both):
    dvc, smk = both
    assert list(dvc) == list(STAGES)
    assert set(smk) == set(STAGES)
    for name in STAGES:
        assert (ROOT / "workflow" / "stages" / f"{name}.py").is_file()


def snakemake_command(dvc_cmd: str) -> str:
    """dvc.yaml's command as the Snakefile runs it: on the merged config, its stderr also in the rule's log."""
    return "{{ " + dvc_cmd + " --params {params.config} 2>&1 1>&3 | tee {log} >&2; }} 3>&1"


def test_the_report_declares_every_section_it_shows(both):
    """The page shows every param, one card per section: each section must re-run it when it changes."""
    from workflow.core.config import Params

    dvc, _ = both
    assert dvc["report"]["params"] == set(Params().to_dict())


@pytest.mark.parametrize("name", STAGES)
def test_same_command_deps_outs_params(both, name):
    dvc, smk = both
    assert dvc[name]["cmd"] == f"python -m workflow {name}"
    assert smk[name]["cmd"] == snakemake_command(dvc[name]["cmd"])
    assert smk[name]["log"] == [f"logs/{name}.log"]
    # Snakemake lists a tracked folder's files beside it (common.smk's folder_contents): they are that dep
    folders = {d for d in dvc[name]["deps"] if (ROOT / d).is_dir()}
    assert dvc[name]["deps"] == {d for d in smk[name]["deps"] if not any(d.startswith(f + "/") for f in folders)}
    assert dvc[name]["outs"] == smk[name]["outs"]
    assert dvc[name]["params"] == smk[name]["params"]


def test_snakemake_walks_a_tracked_folder_only_where_the_source_reads_it(both):
    """Snakemake sees an edit inside data.folder only through file inputs (an imagefolder: source, e2e in
    tests/test_hf_mirror.py); with the default source the folder is not read, so not walked either."""
    _, smk = both
    assert "data/images" in smk["download"]["deps"] and "data/images/README.md" not in smk["download"]["deps"]
    assert "models/local" in smk["download_model"]["deps"]
    assert "models/local/README.md" not in smk["download_model"]["deps"]


def test_every_snakemake_job_runs_on_the_merged_config(both):
    """Without --configfile or --config the merged config is params.yaml, in a file named by its content."""
    import hashlib

    from workflow.core.config import load_params

    _, smk = both
    (path,) = {rule["params_file"] for rule in smk.values()}
    assert path.parent.as_posix() == "logs/params"
    text = (ROOT / path).read_bytes()
    assert path.stem == hashlib.sha256(text).hexdigest()[:16]
    assert load_params(ROOT / path) == load_params(ROOT / "params.yaml")


def test_snakemake_lint_reports_only_the_software_definition(tmp_path):
    """`snakemake --lint`: every rule has a log, the Snakefile a min_version, and so on; what remains is
    the conda/container lint, which the README says does not apply (one pinned venv, requirements.txt)."""
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["snakemake", "--lint"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lints = [line.strip() for line in done.stderr.splitlines() if line.startswith("    * ")]
    assert done.stderr.count("Lints for rule ") == len(STAGES), done.stderr
    assert set(lints) == {"* Specify a conda environment or container for each rule.:"}, done.stderr
    assert "Lints for snakefile" not in done.stderr
    assert 'min_version("' in (ROOT / "Snakefile").read_text()


def test_declared_code_exists_and_stage_code_is_declared(both):
    dvc, _ = both
    for name, stage in dvc.items():
        code = {d for d in stage["deps"] if d.startswith("workflow/")}
        assert all((ROOT / d).is_file() for d in code), name
        assert f"workflow/stages/{name}.py" in code


def test_checkpoints_are_no_output_of_either_tool(both):
    """Resume state: DVC would delete an output before a run (persist aside), and tell a clone that pulled
    everything that train changed (its checkpoints missing); Snakemake deletes a failed job's outputs."""
    dvc, smk = both
    assert not any(stage["persist"] for stage in dvc.values())
    for stages in both:
        assert not any("checkpoints" in out for stage in stages.values() for out in stage["outs"])


def dvc_cached_outs():
    from dvc.repo import Repo

    return {o.def_path for stage in Repo(str(ROOT)).index.stages for o in stage.outs if o.use_cache}


def test_every_cached_output_is_git_ignored_from_the_start():
    """dvc repro would append a missing entry to a tracked .gitignore (and autostage it): a fresh clone's
    first run would leave the tree modified, and Snakemake's outputs would show as untracked files."""
    import subprocess

    outs = sorted(dvc_cached_outs())
    assert "reports/fid_steps.csv" in outs and "data/processed/images.npy" in outs
    result = subprocess.run(["git", "check-ignore", "--no-index", *outs], cwd=ROOT, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == outs


COMPUTING = {"fid_reference", "train", "sample", "evaluate", "fid_sweep"}


def test_computing_stages_ask_a_cluster_for_what_params_yaml_says(both):
    """On a cluster the computing stages are jobs that ask for params.yaml's `cluster` values (train a GPU
    per process, the others one); the light stages run on the submit host."""
    import yaml

    _, smk = both
    assert {name for name, rule in smk.items() if not rule["local"]} == COMPUTING
    cluster = yaml.safe_load((ROOT / "params.yaml").read_text())["cluster"]
    assert cluster["gpu"] is True
    for name in COMPUTING:
        assert smk[name]["resources"] == {
            "gpu": 1,  # params.yaml's train.num_processes is 1
            "cpus_per_task": cluster["cpus_per_task"],
            "mem_mb": cluster["mem_mb"],
            "runtime": cluster["runtime"],
        }, name
    assert all(not smk[name]["resources"].get("gpu") for name in smk.keys() - COMPUTING)
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm" and profile["slurm-status-command"] == "squeue"
    assert "resources" not in yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())  # no global cap


def test_declared_params_are_real_keys(both):
    from workflow.core.config import Params

    dvc, _ = both
    valid = Params().to_dict()
    for stage in dvc.values():
        for key in stage["params"]:
            node = valid
            for part in key.split("."):
                assert part in node, key
                node = node[part]


@pytest.mark.parametrize("name", STAGES)
def test_declared_code_is_exactly_what_the_stage_imports(both, name):
    dvc, _ = both
    declared = {d for d in dvc[name]["deps"] if d.startswith("workflow/")}
    assert declared == set(stage_code(name))


PLOT_AXES = {  # each top-level plot's x and y columns, as dvc.yaml declares them
    "Training loss": ("step", "loss"),
    "Learning rate": ("step", "lr"),
    "Training throughput": ("step", "images_per_second"),
    "FID against sampling steps": ("num_inference_steps", "fid"),
    "FID against the guidance scale": ("guidance_scale", "fid"),
}


def test_the_metrics_and_plots_dvc_shows_follow_params_paths(tmp_path):
    """dvc.yaml's top-level metrics and plots name params.yaml's `paths`, like its stages: a training log
    and sweeps moved there are what `dvc metrics show` and `dvc plots show` read."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    moved = {"train_log": "logs/run-1", "fid_steps": "sweeps/steps.csv", "fid_guidance": "sweeps/guidance.csv"}
    params["paths"].update(moved)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sh(tmp_path, "dvc", "init", "--no-scm", "-q")
    trainlog.start(tmp_path / moved["train_log"], [[1, 0.5, 1e-3], [2, 0.25, 2e-3]], [[2, 100.0]]).end()
    (tmp_path / "sweeps").mkdir()
    (tmp_path / moved["fid_steps"]).write_text("num_inference_steps,fid\n25,30.5\n50,20.5\n")
    (tmp_path / moved["fid_guidance"]).write_text("guidance_scale,fid\n1.0,12.5\n")

    metrics = json.loads(sh(tmp_path, "dvc", "metrics", "show", "--json"))[""]["data"]
    assert metrics[f"{moved['train_log']}/metrics.json"]["data"] == {
        "train": {"loss": 0.25, "lr": 0.002, "images_per_second": 100.0},
        "step": 2,
    }
    plots = json.loads(sh(tmp_path, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    drawn = {}
    for title, (plot,) in plots["data"].items():
        x, y = PLOT_AXES[title]
        drawn[title] = [(row[x], row[y]) for row in plot["content"]["data"]["values"]]
    assert drawn == {
        "Training loss": [("1", "0.5"), ("2", "0.25")],
        "Learning rate": [("1", "0.001"), ("2", "0.002")],
        "Training throughput": [("2", "100.0")],
        "FID against sampling steps": [("25", "30.5"), ("50", "20.5")],
        "FID against the guidance scale": [("1.0", "12.5")],
    }
