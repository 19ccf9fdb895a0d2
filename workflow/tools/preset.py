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

from workflow.core.config import ConfigError, dotted_keys, load_preset


def dvc_set_args(preset: dict, source: str = "the preset") -> list[str]:
    """`dvc exp run` arguments that set each of the preset's keys: ["-S", "train.epochs=50", ...]. Each is
    read back with the parser dvc's -S uses (hydra's): a value it would read otherwise (a backslash, a
    mapping inside a list, infinity) is a ConfigError naming the key, not a different experiment."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, args = OverridesParser.create(), []
    for key, value in dotted_keys(preset).items():
        arg = f"{key}={json.dumps(value, ensure_ascii=False)}"  # non-ASCII as itself: hydra keeps \u escapes
        try:
            read = parser.parse_overrides([arg])[0].value()
        except Exception as exc:  # hydra's OverrideParseException, among others
            read = exc
        if read != value:
            raise ConfigError(
                f"{source}: `{key}` ({value!r}) does not survive `dvc exp run -S` (it reads {read!r}): run this "
                "preset with `snakemake --configfile`, or set the value in params.yaml"
            )
        args += ["-S", arg]
    return args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow preset", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the preset, e.g. configs/tutorial-butterflies-128.yaml")
    args = parser.parse_args(argv)
    print(shlex.join(dvc_set_args(load_preset(args.file), args.file)))
