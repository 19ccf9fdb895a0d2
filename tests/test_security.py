"""What the code may load, checked on its syntax tree: weights only from safetensors or with
`torch.load(weights_only=True)`, no pickle, no remote code, YAML only through safe_load. (The token
over the whole pipeline: tests/test_text_to_image.py::test_the_text_to_image_dag_under_dvc_and_snakemake;
path traversal: tests/test_bad_inputs.py.)"""

import ast

import pytest

from tests.helpers import ROOT

MODULES = sorted((ROOT / "workflow").rglob("*.py"))


def calls(path):
    """(dotted name of the callee, {keyword: literal value or None}) of every call in `path`."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: (k.value.value if isinstance(k.value, ast.Constant) else None) for k in node.keywords}
            yield name, keywords


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nothing_is_unpickled_and_no_remote_code_runs(path):
    for name, keywords in calls(path):
        where = f"{path.name}: {name}"
        if name.endswith("torch.load"):
            assert keywords.get("weights_only") is True, where
        assert name not in ("pickle.load", "pickle.loads", "eval", "exec", "yaml.load", "yaml.unsafe_load"), where
        assert keywords.get("allow_pickle") is not True, where
        assert "trust_remote_code" not in keywords, where
        if name.endswith("from_pretrained") and not name.split(".")[0].endswith("Tokenizer"):  # vocabularies only
            assert keywords.get("use_safetensors") is True, where
        if name.endswith(("load_lora_adapter", "load_lora_weights")):
            assert keywords.get("use_safetensors") is True, where
        if name.endswith("jit.load"):  # TorchScript: only the checksum-verified Inception file (test_fid.py)
            assert path.name == "inception.py", where
