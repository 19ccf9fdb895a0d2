"""The JSON records one stage writes and another reads (SOURCE.json, meta.json, summary.json,
samples.json, metrics.json): written with workflow.core.artifacts.write_json, read here, so a
missing, broken or incomplete record is one error naming the stage that makes it.

    from workflow.formats.records import read_record
    read_record("reports/metrics.json", "evaluate", keys=("fid", "kid"))
"""

from __future__ import annotations

import json
from pathlib import Path

from workflow.core.config import ConfigError


def read_record(path: str | Path, stage: str, keys=()) -> dict:
    """The JSON object at `path` (with `keys`: just those, each required)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; the {stage} stage makes it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); re-run the `{stage}` stage") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}; re-run the `{stage}` stage")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}; re-run the {stage} stage")
    return {k: data[k] for k in keys} if keys else data
