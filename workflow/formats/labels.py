"""The training labels (`paths.labels`, JSON): the class names and each training image's class, in the
order of `paths.images`. Written by preprocess (empty lists for an unlabelled dataset, so the file is
always there for DVC and Snakemake), read by train.

    write_labels("data/processed/labels.json", ["0", "1", ...], [5, 0, 4, ...])
    classes, labels = load_labels("data/processed/labels.json")     # names, int64 array
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workflow.core.artifacts import write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record


def write_labels(path: str | Path, classes: list[str], labels: list[int]) -> None:
    write_json(path, {"classes": list(classes), "labels": [int(c) for c in labels]})


def load_labels(path: str | Path) -> tuple[list[str], np.ndarray]:
    record = read_record(path, "preprocess", ("classes", "labels"))
    classes, labels = list(record["classes"]), np.asarray(record["labels"], dtype=np.int64)
    if labels.size and not (labels.min() >= 0 and labels.max() < len(classes)):
        raise ConfigError(f"{path}: a label is out of range for its {len(classes)} classes; re-run preprocess")
    return classes, labels
