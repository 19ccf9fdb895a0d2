"""Which source files a module is made of: itself and every workflow module it imports, transitively,
read from the sources with ast (nothing is imported or run).

    from workflow.core.code_deps import stage_code
    stage_code("train")   # ["workflow/core/artifacts.py", ..., "workflow/stages/train.py"]

The Snakefile declares each rule's code with it, tests/test_dag.py checks that dvc.yaml lists the same
files, and tests/test_layers.py checks the layer rules on the same graph. The sub-packages' __init__.py
files hold no code (tests/test_layers.py), so they are not counted; the top package's holds the stage
list (workflow.STAGES), which counts where it is imported.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # workflow/
ROOT = PACKAGE_DIR.parent


def module_path(module: str) -> Path:
    """workflow.stages.train -> <root>/workflow/stages/train.py (a package's __init__.py)."""
    path = ROOT.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def is_module(module: str) -> bool:
    return module_path(module).is_file()


@functools.cache
def direct_imports(module: str) -> frozenset[str]:
    """The workflow modules `module` imports, anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(module_path(module).read_text(), str(module_path(module)))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "workflow"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "workflow":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if is_module(f"{node.module}.{a.name}")}
    return frozenset(m for m in found if is_module(m) and (m == "workflow" or module_path(m).name != "__init__.py"))


def closure(module: str) -> set[str]:
    """`module` and everything it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += direct_imports(name)
    return seen


def stage_code(stage: str) -> list[str]:
    """The files of a stage's code, relative to the project root, sorted."""
    return sorted(module_path(m).relative_to(ROOT).as_posix() for m in closure(f"workflow.stages.{stage}"))


def code_sha256(stage: str) -> str:
    """One hash of the contents of a stage's code files (names included): what DVC and Snakemake see change."""
    digest = hashlib.sha256()
    for name in stage_code(stage):
        digest.update(f"{name}\0".encode() + (ROOT / name).read_bytes() + b"\0")
    return digest.hexdigest()
