"""The training captions (`paths.captions`, JSON): each training image's captions, in the order of
`paths.images` (one or several per image; training picks one at random per step). Written by
preprocess (an empty list for an uncaptioned dataset, so the file is always there for DVC and
Snakemake), read by encode.

    write_captions("data/processed/captions.json", [["a red fox"], ["a cat", "a grey cat"], ...])
    captions = load_captions("data/processed/captions.json")     # list of lists of str
"""

from __future__ import annotations

from pathlib import Path

from workflow.core.artifacts import write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record


def write_captions(path: str | Path, captions: list[list[str]]) -> None:
    write_json(path, {"captions": [list(c) for c in captions]})


def load_captions(path: str | Path) -> list[list[str]]:
    captions = read_record(path, "preprocess", ("captions",))["captions"]
    if not isinstance(captions, list) or not all(
        isinstance(c, list) and c and all(isinstance(t, str) and t for t in c) for c in captions
    ):
        raise ConfigError(f"{path}: every image needs a list of non-empty captions; re-run preprocess")
    return captions
