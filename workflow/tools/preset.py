"""Presets: a configs/*.yaml file holds only what a recipe changes from the defaults (params.yaml).

    make run CONFIG=configs/tutorial-butterflies-128.yaml                # a DVC experiment; params.yaml untouched
    snakemake --cores all --configfile configs/tutorial-butterflies-128.yaml
    python -m workflow preset configs/tutorial-butterflies-128.yaml      # its `dvc exp run` arguments

A preset is checked on its own, over the defaults, before anything runs: an unknown key or a bad value
is one ConfigError naming the key and the preset file. `python -m workflow preset FILE` then prints
one `-S key=value` argument per key it sets, shell-quoted, which `make run CONFIG=FILE` hands to
`dvc exp run --temp` (values as JSON, which dvc's -S parser reads: lists, null and quoted strings).
The arguments are first applied as dvc applies them (its own `apply_overrides`) to a copy of
params.yaml and read back as the stages read it: a value that would arrive otherwise (a backslash, an
interpolation `${...}`, `on` read as true, a mapping inside a list) is a ConfigError naming the key,
never a different experiment.
Read as a params file on its own (`--params configs/x.yaml`, as the bench commands do), a preset is
itself over the defaults.
A tool beside the stages: it reads the preset and prints, nothing else.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import tempfile
from pathlib import Path

from workflow.core.config import ConfigError, dotted_keys, load_params, load_preset, params_from_dict


def dvc_set_args(preset: dict, source: str = "the preset", params_file: str | Path = "params.yaml") -> list[str]:
    """`dvc exp run` arguments that set each of the preset's keys: ["-S", "train.epochs=50", ...], checked
    to arrive as the preset says over `params_file` (see the module's docstring)."""
    wanted = dotted_keys(preset)
    # non-ASCII as itself: dvc's parser (hydra's) keeps a \\u escape as text
    overrides = [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in wanted.items()]
    arrived = _applied(overrides, params_file, source)
    expected = dotted_keys(params_from_dict(preset, source=source).to_dict())
    for key in wanted:
        if arrived.get(key) != expected[key]:
            raise ConfigError(
                f"{source}: `{key}` ({wanted[key]!r}) does not survive `dvc exp run -S` (it arrives as "
                f"{arrived.get(key)!r}): run this preset with `snakemake --configfile`, or set it in params.yaml"
            )
    return [arg for override in overrides for arg in ("-S", override)]


def _applied(overrides: list[str], params_file: str | Path, source: str) -> dict:
    """The params, dotted, after dvc applies `overrides` to a copy of `params_file`."""
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "params.yaml"
        shutil.copy(params_file, copy)
        try:
            apply_overrides(str(copy), overrides)
        except Exception:  # hydra's and OmegaConf's errors, among others: name the key that fails alone
            _name_the_failing_override(overrides, params_file, copy, source)
            raise
        try:
            return dotted_keys(load_params(copy).to_dict())
        except ConfigError as exc:
            raise ConfigError(f"{source}, as `dvc exp run -S` writes it: {exc}") from None


def _name_the_failing_override(overrides: list[str], params_file: str | Path, copy: Path, source: str) -> None:
    from dvc.utils.hydra import apply_overrides

    for override in overrides:
        shutil.copy(params_file, copy)
        try:
            apply_overrides(str(copy), [override])
        except Exception as exc:
            raise ConfigError(
                f"{source}: `{override.split('=', 1)[0]}` cannot be passed to `dvc exp run -S` "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): run this preset with "
                "`snakemake --configfile`"
            ) from None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow preset", description=__doc__.splitlines()[0])
    parser.add_argument("file", help="the preset, e.g. configs/tutorial-butterflies-128.yaml")
    args = parser.parse_args(argv)
    print(shlex.join(dvc_set_args(load_preset(args.file), args.file)))
