"""dvc.yaml and the Snakefile declare one DAG: same stages, commands, deps, outs and params."""
import os

import pytest

from tests.conftest import ROOT
from workflow import STAGES


def dvc_stages():
    from dvc.repo import Repo

    repo = Repo(str(ROOT))
    stages = {}
    for stage in repo.index.stages:
        files = {d.def_path for d in stage.deps if type(d).__name__ != "ParamsDependency"}
        params = {k for d in stage.deps if type(d).__name__ == "ParamsDependency" for k in d.params}
        stages[stage.name] = {"cmd": stage.cmd, "deps": files, "params": params,
                              "outs": {o.def_path for o in stage.outs if not o.persist},
                              "persist": {o.def_path for o in stage.outs if o.persist}}
    return stages


def snakemake_rules():
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    cwd = os.getcwd()
    try:
        with SnakemakeApi() as api:
            workflow = api.workflow(resource_settings=ResourceSettings(cores=2), snakefile=ROOT / "Snakefile",
                                    workdir=ROOT)._workflow
            return {rule.name: {"cmd": rule.shellcmd, "deps": set(rule.input), "outs": set(rule.output),
                                "params": set(rule.params.values) if rule.params else set(),
                                "gpu": "gpu" in rule.resources}
                    for rule in workflow.rules if rule.name != "all"}
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
        assert (ROOT / "workflow" / f"{name}.py").is_file()


@pytest.mark.parametrize("name", STAGES)
def test_same_command_deps_outs_params(both, name):
    dvc, smk = both
    assert dvc[name]["cmd"] == smk[name]["cmd"] == f"python -m workflow {name}"
    assert dvc[name]["deps"] == smk[name]["deps"]
    assert dvc[name]["outs"] == smk[name]["outs"]
    assert dvc[name]["params"] == smk[name]["params"]


def test_declared_code_exists_and_stage_code_is_declared(both):
    dvc, _ = both
    for name, stage in dvc.items():
        code = {d for d in stage["deps"] if d.startswith("workflow/")}
        assert all((ROOT / d).is_file() for d in code), name
        assert f"workflow/{name}.py" in code


def test_checkpoints_persist_in_dvc_and_are_no_snakemake_output(both):
    dvc, smk = both
    assert dvc["train"]["persist"] == {"models/checkpoints"}
    assert not any("checkpoints" in out for rule in smk.values() for out in rule["outs"])


def test_gpu_stages_are_capped_by_the_default_profile(both):
    import yaml

    _, smk = both
    assert {n for n, r in smk.items() if r["gpu"]} == {"fid_reference", "train", "sample", "evaluate", "fid_steps"}
    profile = yaml.safe_load((ROOT / "profiles/default/config.yaml").read_text())
    assert profile["resources"] == {"gpu": 1}


def test_declared_params_are_real_keys(both):
    from workflow.config import Params

    dvc, _ = both
    valid = Params().to_dict()
    for stage in dvc.values():
        for key in stage["params"]:
            node = valid
            for part in key.split("."):
                assert part in node, key
                node = node[part]


def workflow_imports(module: str) -> set:
    """The workflow modules `module` imports, transitively (workflow/__init__.py aside)."""
    import ast

    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "workflow" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "workflow":
                todo += [a.name for a in node.names if (ROOT / "workflow" / f"{a.name}.py").is_file()]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("workflow."):
                todo.append(node.module.split(".")[1])
    return seen


@pytest.mark.parametrize("name", STAGES)
def test_declared_code_is_exactly_what_the_stage_imports(both, name):
    dvc, _ = both
    declared = {d for d in dvc[name]["deps"] if d.startswith("workflow/")}
    assert declared == {f"workflow/{m}.py" for m in workflow_imports(name)}
