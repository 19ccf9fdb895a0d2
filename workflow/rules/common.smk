# Helpers shared by the rules: the config every job runs with, paths, each stage's code, params and command.
import hashlib
import os
from pathlib import Path

import yaml
from snakemake.utils import update_config

from workflow.core.artifacts import write_bytes
from workflow.core.code_deps import stage_code
from workflow.core.config import load_preset, params_from_dict

# The config: params.yaml, then each --configfile (a preset holds only what it changes), then --config,
# merged by Snakemake. A preset is checked on its own first, so a mistake in it names its file.
for preset in workflow.overwrite_configfiles:
    load_preset(os.path.relpath(preset))


def typed(value):
    """--config reads a nested value's scalars as strings (`--config 'train={max_steps: 8}'` gives "8"):
    read each again as YAML, as it would be read from a file."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return yaml.safe_load(value) if isinstance(value, str) else value


def config_sources():
    files = [os.path.relpath(path) for path in workflow.overwrite_configfiles]
    return " + ".join(["params.yaml", *files, *(["--config"] if workflow.config_settings.config else [])])


def params_file(params):
    """The merged config as a file named by its content (logs/params/<sha256>.yaml): every job runs with it,
    runs of different configs never share one, and a cluster job's own parse of the Snakefile finds it."""
    text = yaml.safe_dump(params.to_dict(), sort_keys=False)
    path = Path("logs/params") / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        write_bytes(path, text.encode())
    return path


update_config(config, typed(dict(workflow.config_settings.config)))
PARAMS_FILE = params_file(params_from_dict(config, source=config_sources()))  # validated when parsed
PATHS = config["paths"]

TEXT_TO_IMAGE = config["model"]["pretrained"] is not None  # encode computes only then

# The light stages run on the submit host; on a cluster (snakemake --profile profiles/slurm) the others
# are SLURM jobs. Locally this changes nothing.
localrules:
    download,
    download_model,
    preprocess,
    report,
    package,


if not TEXT_TO_IMAGE:  # encode only writes a record saying the run is in pixel space

    localrules:
        encode,


def folder_contents(folder, read):
    """A tracked input folder and every file under it. Snakemake compares a directory input by its own
    mtime, which an edited or added file one level down leaves as it was; dvc hashes the contents. With
    the files listed, an edited file is newer than the output and an added or removed one changes the
    job's input set: either re-runs the job, as under dvc. Only where the source `read`s the folder:
    otherwise its files are not the job's input, and a large folder need not be walked."""
    if not read:
        return [folder]
    files = sorted(str(p) for p in Path(folder).rglob("*") if p.is_file()) if os.path.isdir(folder) else []
    return [folder, *(f.replace("{", "{{").replace("}", "}}") for f in files)]  # braces are wildcards to Snakemake


def params_of(*keys):
    """{dotted key: value} of the params a stage reads; Snakemake re-runs the job when one changes."""
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values


def stage(name):
    """dvc.yaml's command for the stage, run on the merged config (`{params.config}`, a Path: Snakemake's
    params trigger records only plain values, so the file's name, which changes with any param, re-runs
    nothing; each job's `values` decide). Its stderr goes to the terminal and to the rule's log."""
    return "{{ python -m workflow %s --params {params.config} 2>&1 1>&3 | tee {log} >&2; }} 3>&1" % name


def computing_job(gpus=1):
    """A computing stage's resources: what a cluster job asks for (params.yaml's `cluster`), and locally
    `gpu`, which counts against the pool `--resources gpu=N` sets (unlimited unless given)."""
    cluster = config["cluster"]
    return {
        "gpu": gpus if cluster["gpu"] else 0,
        "cpus_per_task": cluster["cpus_per_task"],
        "mem_mb": cluster["mem_mb"],
        "runtime": cluster["runtime"],
    }
