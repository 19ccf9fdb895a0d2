"""Training checkpoints: complete-or-absent folders of accelerate state, keyed by the run's inputs.

Layout: <paths.checkpoints>/<run key>/step-0000250/ holding what `accelerator.save_state` writes
(model, optimiser, lr schedule, EMA, RNG states) plus progress.json (step, time, loss history).
The run key hashes everything that shapes the weights, so a run only ever resumes its own
checkpoints: change the learning rate and training starts afresh, beside the old checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from workflow.artifacts import read_json, remove, write_json
from workflow.config import Params

PROGRESS = "progress.json"
_STEP_DIR = re.compile(r"step-(\d+)")


def run_key(params: Params, images_sha256: str) -> str:
    """Hash of the data, model, noise schedule, training recipe and seed (not logging cadence, nor grids)."""
    everything = params.to_dict()
    train = everything["train"]
    for cadence in ("log_every", "checkpoint_every", "checkpoints_to_keep", "progress_grids"):
        train.pop(cadence)
    identity = {"images": images_sha256, "seed": params.seed, "model": everything["model"],
                "scheduler": everything["scheduler"], "train": train}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the finished checkpoints, oldest first; temporary folders are ignored."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        match = _STEP_DIR.fullmatch(child.name)
        if match and (child / PROGRESS).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    done = complete_checkpoints(run_dir)
    return done[-1][1] if done else None


def save_checkpoint(accelerator, run_dir: Path, progress: dict, keep: int) -> Path:
    """Save on every process (accelerate needs it), publish by rename on the main one, prune to `keep`."""
    final = run_dir / f"step-{progress['step']:07d}"
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        remove(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / PROGRESS, progress)
        remove(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            remove(old)
    accelerator.wait_for_everyone()
    return final


def load_progress(checkpoint: Path) -> dict:
    return read_json(checkpoint / PROGRESS)
