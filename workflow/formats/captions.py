"""The training captions (`paths.captions`, JSON): each training image's captions, in the order of
`paths.images` (one or several per image; training picks one at random per step). Written by
preprocess (an empty list for an uncaptioned dataset, so the file is always there for DVC and
Snakemake), read by encode.

    write_captions("data/processed/captions.json", [["a red fox"], ["a cat", "a grey cat"], ...])
    captions = load_captions("data/processed/captions.json")     # list of lists of str
    prompts, source = fid_prompts(params)     # what the FID sample set of a text-to-image model is made from
"""

from __future__ import annotations

from pathlib import Path

from workflow.core.artifacts import write_json
from workflow.core.config import ConfigError, Params
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


def fid_prompts(params: Params) -> tuple[list[str], str]:
    """(the prompt of each image of the FID sample set, what they are the captions of): the first caption of
    held-out image i mod N (`data.holdout`), else of training image i mod N: the captions of the images
    FID compares the samples with, one for one where the reference takes all N and num_samples is a
    multiple of N, else in distribution (the reference is then a seeded subset)."""
    held_out = params.data.holdout > 0
    path = params.paths.holdout_captions if held_out else params.paths.captions
    captions = [image[0] for image in load_captions(path)]
    if not captions:
        raise ConfigError(f"{path}: no captions; text-to-image needs `data.caption_column` (re-run preprocess)")
    prompts = [captions[i % len(captions)] for i in range(params.fid.num_samples)]
    return prompts, "held-out images" if held_out else "training images"
