"""The layer map of docs/ARCHITECTURE.md, enforced on the imports the code really has (read with ast,
function-level imports included): which layer may import which, no stage importing another, no import
cycle, no I/O in the maths, each file name owned by one format module, one contract for every stage.
(That every imported third-party package is declared in requirements.txt: tests/test_requirements.py.)"""

import ast
from pathlib import Path

import pytest

from workflow import STAGES, TOOLS
from workflow.core.code_deps import ROOT, direct_imports, module_path

# layer -> the layers its modules may import (their own layer included where listed)
MAY_IMPORT = {
    "core": {"core"},
    "maths": set(),
    "formats": {"core", "formats"},
    "models": {"core", "maths", "models"},
    "sources": {"core", "formats", "sources"},
    "pages": {"core", "formats", "pages"},
    "stages": {"core", "maths", "formats", "models", "sources", "pages"},
    "tools": {"core", "maths", "formats", "models", "sources", "pages", "stages", "tools"},
}
# What counts as I/O in the maths: modules that reach files, processes or the network, and these calls.
IO_MODULES = {
    "os",
    "io",
    "pathlib",
    "shutil",
    "json",
    "csv",
    "pickle",
    "tempfile",
    "subprocess",
    "PIL",
    "yaml",
    "requests",
    "urllib",
    "socket",
    "glob",
    "sys",
}
IO_CALLS = {
    "open",
    "print",
    "input",
    "np.load",
    "np.save",
    "np.savez",
    "np.loadtxt",
    "np.savetxt",
    "torch.load",
    "torch.save",
    "torch.jit.load",
}
# File names that one stage writes and another reads: only their owner module spells them in code.
OWNED_NAMES = {
    "summary.json": "formats/trainlog.py",
    "samples.json": "formats/sample_set.py",
    "SOURCE.json": "formats/raw_dataset.py",
    "progress.json": "formats/checkpoints.py",
    "partial.json": "formats/sample_set.py",
    "model_index.json": "formats/base_model.py",
    "grids": "formats/trainlog.py",
    "LABELS.json": "formats/raw_dataset.py",
    "CAPTIONS.json": "formats/raw_dataset.py",
    "BASE.json": "formats/base_model.py",
    "class_names.json": "formats/pipeline.py",
}


def modules() -> list[str]:
    files = sorted((ROOT / "workflow").rglob("*.py"))
    return [".".join(f.relative_to(ROOT).with_suffix("").parts) for f in files]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def tree(module: str) -> ast.Module:
    return ast.parse(module_path(module).read_text(), str(module_path(module)))


def imported_names(module: str) -> set[str]:
    """Every module name `module` imports (top-level package and full dotted name)."""
    names = set()
    for node in ast.walk(tree(module)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names | {n.split(".")[0] for n in names}


def test_every_module_sits_in_a_layer():
    loose = [m for m in modules() if layer_of(m) is None and m not in ("workflow.__init__", "workflow.__main__")]
    assert not loose, f"modules outside the layer packages: {loose}"
    assert {layer_of(m) for m in modules()} - {None} == set(MAY_IMPORT)


@pytest.mark.parametrize("module", [m for m in modules() if layer_of(m)])
def test_imports_follow_the_layer_map(module):
    layer = layer_of(module)
    # the top package (workflow/__init__.py: the stage names) is open to every layer
    wrong = {m for m in direct_imports(module) if m != "workflow" and layer_of(m) not in MAY_IMPORT[layer]}
    assert not wrong, f"{module} ({layer}) may import only {sorted(MAY_IMPORT[layer])}; it imports {sorted(wrong)}"


@pytest.mark.parametrize("module", [m for m in modules() if layer_of(m) == "stages"])
def test_no_stage_imports_another(module):
    assert not {m for m in direct_imports(module) if layer_of(m) == "stages"}


def test_the_entry_point_imports_only_the_ground():
    assert {layer_of(m) for m in direct_imports("workflow.__main__") if m != "workflow"} <= {"core"}


def test_no_import_cycle():
    """Depth-first search over the module graph; a back edge is a cycle, reported as its path."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for nxt in sorted(direct_imports(module)):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[module] = "done"

    for module in modules():
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", [m for m in modules() if layer_of(m) == "maths"])
def test_the_maths_does_no_io(module):
    assert not imported_names(module) & IO_MODULES, f"{module} imports {imported_names(module) & IO_MODULES}"
    calls = {ast.unparse(n.func) for n in ast.walk(tree(module)) if isinstance(n, ast.Call)}
    assert not calls & IO_CALLS, f"{module} calls {calls & IO_CALLS}"


def code_strings(module: str) -> set[str]:
    """The string constants of a module's code: docstrings and comments are prose, not code."""
    parsed = tree(module)  # one tree: ids of a second parse's nodes could be the first's, freed and reused
    docstrings = set()
    for node in ast.walk(parsed):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return {
        n.value
        for n in ast.walk(parsed)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


@pytest.mark.parametrize("name", sorted(OWNED_NAMES))
def test_each_shared_file_name_has_one_owner(name):
    """A format change touches one file: the name a file is written and read under lives in its owner."""
    spelled = {
        module_path(m).relative_to(ROOT / "workflow").as_posix()
        for m in modules()
        if any(s == name or s.endswith(f"/{name}") for s in code_strings(m))
    }
    assert spelled == {OWNED_NAMES[name]}


def top_level_names(module: str) -> set[str]:
    return {n.name for n in tree(module).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def has_main_block(module: str) -> bool:
    return "if __name__ ==" in module_path(module).read_text()


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_the_one_contract(stage):
    """run(params) -> summary and headline(summary, params) -> str; runnable only through the one CLI."""
    module = f"workflow.stages.{stage}"
    names = top_level_names(module)
    assert {"run", "headline"} <= names and "main" not in names
    run = next(n for n in tree(module).body if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert [a.arg for a in run.args.args] == ["params"]
    assert not has_main_block(module)


def test_the_stages_and_tools_are_exactly_the_commands():
    stages = {m.split(".")[-1] for m in modules() if layer_of(m) == "stages" and not m.endswith("__init__")}
    assert stages == set(STAGES)
    for tool in TOOLS:
        assert "main" in top_level_names(f"workflow.tools.{tool}")


def test_only_the_entry_point_runs_as_a_script():
    scripts = [m for m in modules() if has_main_block(m)]
    assert scripts == ["workflow.__main__"]


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_package_markers_hold_no_code(package):
    body = tree(f"workflow.{package}.__init__").body
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_the_stage_code_snakemake_declares_is_the_import_closure():
    from workflow.core.code_deps import stage_code

    for stage in STAGES:
        files = stage_code(stage)
        assert f"workflow/stages/{stage}.py" in files
        assert all(Path(ROOT / f).is_file() for f in files)
        assert not any(f.startswith("workflow/stages/") and f != f"workflow/stages/{stage}.py" for f in files)
