"""Presets: a configs/*.yaml file holds only what a recipe changes from the defaults (params.yaml).

    make run CONFIG=configs/tutorial-butterflies-128.yaml                # a DVC experiment; params.yaml untouched
    snakemake --cores all --configfile configs/tutorial-butterflies-128.yaml
    python -m workflow preset configs/tutorial-butterflies-128.yaml      # its `dvc exp run` arguments

A preset is checked on its own, over the defaults, before anything runs: an unknown key or a bad value
is one ConfigError naming the key and the preset file. `python -m workflow preset FILE` then prints
one `-S key=value` argument per key it sets, shell-quoted, which `make run CONFIG=FILE` hands to
`dvc exp run --temp` (values as JSON, which dvc's -S parser reads: lists, null and quoted strings).
Read as a params file on its own (`--params configs/x.yaml`, as the bench commands do), a preset is
itself over the defaults.
A tool beside the stages: it reads the preset and prints, nothing else.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from workflow.config import params_from_dict, read_params_file


def load_preset(path: str | Path) -> dict:
    """The preset's keys, checked over the defaults (a mistake names the key and `path`)."""
    raw = read_params_file(path)
    params_from_dict(raw, source=str(path))
    return raw


def leaves(raw: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every value a nested mapping sets (lists are values)."""
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def dvc_set_args(preset: dict) -> list[str]:
    """`dvc exp run` arguments that set each of the preset's keys: ["-S", "train.epochs=50", ...]."""
    return [arg for key, value in leaves(preset).items() for arg in ("-S", f"{key}={json.dumps(value)}")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow preset", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the preset, e.g. configs/tutorial-butterflies-128.yaml")
    args = parser.parse_args(argv)
    print(shlex.join(dvc_set_args(load_preset(args.file))))
