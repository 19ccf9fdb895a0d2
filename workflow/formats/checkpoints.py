"""Training checkpoints: complete, verified-or-ignored folders of training state, keyed by the run's inputs.

Layout: <paths.checkpoints>/<run key>/step-0000250/ holding what `accelerator.save_state` writes
(model weights as safetensors; optimiser and RNG states, which accelerate loads with
`torch.load(weights_only=True)`), training_state.pt (lr schedule and EMA: tensors and numbers only,
loaded with `weights_only=True` as well; accelerate's own custom-object path unpickles with
`weights_only=False`, so it is not used), progress.json (step, time, loss history) and manifest.json
(size and sha256 of every other file, progress.json included), written last. The folder is built as
.step-0000250.tmp and renamed into place, so a save cut short is never mistaken for a checkpoint; one
whose files no longer match its manifest (truncated, corrupted) is skipped with a warning in favour of
the one before. The run key hashes everything that shapes the weights, the train stage's code included, so a
run only ever resumes its own checkpoints: change the learning rate, or edit the training code (which
re-runs train under DVC and Snakemake), and training starts afresh, beside the old checkpoints, instead
of "resuming" a finished run of other code in zero steps.

A relative paths.checkpoints is the workspace's (run_folder): for an experiment DVC runs in a copy
(`dvc exp run --temp`, `make run CONFIG=...`, a queued one), the workspace it came from, which DVC names
in DVC_ROOT, not the copy; so an interrupted copy resumes on its next run, and experiments of one recipe
(a queue varying sampling alone) train it once. Anywhere else (the workspace, Snakemake, a direct call):
the current folder. Each run's folder holds a .gitignore of its own: never committed, wherever it is.
One run at a time trains a key (sole_trainer); another waits for it, then resumes from what it saved.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import sys
import warnings
from pathlib import Path

import torch

from workflow.core.artifacts import (
    atomic_path,
    disk_full_guard,
    manifest_damage,
    read_json,
    remove,
    try_lock,
    write_json,
    write_manifest,
)
from workflow.core.code_deps import code_sha256
from workflow.core.config import ConfigError, Params
from workflow.core.faults import maybe_fault
from workflow.core.launch import in_rank

PROGRESS = "progress.json"
TRAINING_STATE = "training_state.pt"
_STEP_DIR = re.compile(r"step-(\d+)")
WORKSPACE_ENV = "DVC_ROOT"  # set by DVC for every stage: the workspace, even when the stage runs in a copy
TRAINER_LOCK = ".training.lock"
HELD_ENV = "WORKFLOW_TRAINING_LOCK"  # the lock a process holds for the training it runs or launches
IGNORE_ALL = "# training checkpoints: resume state, never committed (workflow/formats/checkpoints.py)\n*\n"


def run_key(params: Params, images_sha256: str, labels_sha256: str | None = None) -> str:
    """Hash of the data, model, noise schedule, training recipe, seed and the train stage's code (not
    logging cadence, grids, nor the size caps, which only decide whether a run may start). A text-to-image
    run's data is its encoded set: `images_sha256` is then that of its record, which names the images,
    captions and pretrained pipeline."""
    everything = params.to_dict()
    train = everything["train"]
    for cadence in ("log_every", "checkpoint_every", "checkpoints_total_limit", "progress_grids", "max_activation_gib"):
        train.pop(cadence)
    everything["model"].pop("max_parameters")
    everything["model"].pop("folder")  # where a folder: pipeline is read from; its content is in the data key
    train.pop("gradient_checkpointing")  # recomputes the same activations: memory, not weights
    if not params.model.class_conditional:
        train.pop("label_dropout")  # no labels to drop: it does not shape the weights
    for key in ("pretrained", "revision"):  # pixel runs: keys as before; text-to-image: the data key names
        everything["model"].pop(key)  # the pipeline by content (the encoded set's record), not by its address
    if params.model.pretrained is None:
        train.pop("lora_rank")
    identity = {
        "images": images_sha256,
        "seed": params.seed,
        "model": everything["model"],
        "scheduler": everything["scheduler"],
        "train": train,
        "code": code_sha256("train"),
    }
    if labels_sha256 is not None:  # class-conditional: the labels shape the weights too
        identity["labels"] = labels_sha256
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_folder(checkpoints: str | Path, key: str) -> Path:
    """<paths.checkpoints>/<key>, a relative paths.checkpoints taken in the workspace (workspace()); made,
    with a .gitignore that git reads as ignoring it whole."""
    root = Path(checkpoints)
    here = Path.cwd()
    if not root.is_absolute() and (place := workspace(here, os.environ.get(WORKSPACE_ENV))) != here:
        root = place / root  # else kept relative, as messages name it
    run_dir = root / key
    run_dir.mkdir(parents=True, exist_ok=True)
    ignore = run_dir / ".gitignore"
    if not ignore.is_file():
        with atomic_path(ignore) as tmp:
            tmp.write_text(IGNORE_ALL)
    return run_dir


def workspace(cwd: Path, dvc_root: str | None) -> Path:
    """The folder a relative path is the workspace's in: for a stage DVC runs in a copy of the workspace
    (<DVC_ROOT>/.dvc/tmp/exps/<copy>/...), the same place in DVC_ROOT; anywhere else, `cwd`. DVC_ROOT is
    only believed for its own copies: a shell, or a stage of another project, may have it set."""
    if not dvc_root:
        return cwd
    root, here = Path(dvc_root).resolve(), cwd.resolve()
    copies = (root / ".dvc" / "tmp" / "exps").resolve()  # .dvc/tmp may be a link to scratch space
    if copies not in here.parents:
        return cwd
    # the copy's own DVC project (DVC opens the copy as one, so it has its .dvc): exps/<copy>/[<subfolder>]
    inside = (folder for folder in (here, *here.parents) if copies in folder.parents)
    copy_root = next((folder for folder in inside if (folder / ".dvc").is_dir()), None)
    return cwd if copy_root is None else root / here.relative_to(copy_root)


@contextlib.contextmanager
def sole_trainer(run_dir: Path):
    """Held while this run trains `run_dir` (its .training.lock): another run of the same key (an
    experiment that differs in sampling alone, queued beside this one) waits, then resumes from what this
    one saved, its final checkpoint if it finished. One lock, taken before any rank exists, so no two runs
    each hold part of what training needs. Yields the lock file's descriptor, for the launcher of the
    ranks to inherit (a killed stage's ranks keep it), or None where this process is covered by another's:

    - `python -m workflow train` took it (HELD_ENV names it) before its device slots and its ranks; its
      own train.run and its ranks go on. Should their key differ from the held one (the images or the code
      changed while it waited for a device), that is an error, not a wait with the devices held.
    - ranks launched by hand (`accelerate launch -m workflow train`): ranks other than 0 go on, and rank 0
      takes it without waiting, or stops the launch: its other ranks would wait for it in the process
      group's rendezvous, and time out there.
    """
    path = (run_dir / TRAINER_LOCK).resolve()
    held = os.environ.get(HELD_ENV)
    if held is not None:
        if held != str(path):
            raise ConfigError(
                f"the training data or the train stage's code changed while this run waited: it locked {held}, "
                f"but now trains into {run_dir}; run it again"
            )
        yield None
        return
    by_hand = in_rank()
    if by_hand and os.environ.get("RANK", "0") != "0":
        yield None
        return
    handle = try_lock(path)
    if handle is None and by_hand:
        raise ConfigError(
            f"another run is training this recipe into {run_dir}: a launch started by hand cannot wait for it (its "
            "ranks would time out meeting); start it as `python -m workflow train` with train.num_processes, "
            "which waits"
        )
    if handle is None:
        print(
            f"waiting: another run is training this recipe into {run_dir}; this one then resumes from its checkpoints",
            file=sys.stderr,
            flush=True,
        )
        handle = open(path, "a+")  # noqa: SIM115 -- held open as long as the lock
        fcntl.flock(handle, fcntl.LOCK_EX)
    os.environ[HELD_ENV] = str(path)  # for this process's own train.run and the ranks it launches
    try:
        yield handle.fileno()
    finally:
        os.environ.pop(HELD_ENV, None)
        handle.close()  # the kernel frees it once no process holds it (a launcher that inherited it keeps it)


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
    """The newest finished checkpoint whose files match its manifest; damaged ones are skipped, with a warning."""
    for _, folder in reversed(complete_checkpoints(run_dir)):
        problem = manifest_damage(folder)
        if problem is None:
            return folder
        warnings.warn(
            f"checkpoint {folder} is damaged ({problem}): not resuming from it, trying the one before", stacklevel=2
        )
    return None


def save_checkpoint(accelerator, run_dir: Path, progress: dict, limit: int, states: dict) -> Path:
    """Save on every process (accelerate needs it), publish by rename on the main one, prune to `limit`.

    `states`: objects with state_dict/load_state_dict (lr schedule, EMA) saved beside accelerate's.
    """
    final = run_dir / f"step-{progress['step']:07d}"
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        remove(tmp)
    accelerator.wait_for_everyone()
    try:
        with disk_full_guard(final):
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                torch.save({name: obj.state_dict() for name, obj in states.items()}, tmp / TRAINING_STATE)
                maybe_fault("train.checkpoint.mid_save", progress["step"])
                write_json(tmp / PROGRESS, progress)
                write_manifest(tmp)  # last, so it covers progress.json: a damaged one never sets the resume step
    except Exception:
        if accelerator.is_main_process:
            remove(tmp)  # a failed save must not hold the space it took
        raise
    if accelerator.is_main_process:
        remove(final)
        os.replace(tmp, final)
        maybe_fault("train.checkpoint.saved", progress["step"])
        # A later step's checkpoint can only be one resume skipped as damaged: left, it would count towards
        # `limit` and have the checkpoint just written pruned
        kept = []
        for step, folder in complete_checkpoints(run_dir):
            if step > progress["step"] and manifest_damage(folder) is not None:  # checked again: never a good one
                remove(folder)
            else:
                kept.append(folder)
        for old in kept[:-limit]:
            remove(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: Path, states: dict) -> dict:
    """Restore accelerate's state and `states` from `checkpoint`; return its progress record."""
    accelerator.load_state(str(checkpoint))
    saved = torch.load(checkpoint / TRAINING_STATE, map_location=accelerator.device, weights_only=True)
    for name, obj in states.items():
        obj.load_state_dict(saved[name])
    return load_progress(checkpoint)


def load_progress(checkpoint: Path) -> dict:
    return read_json(checkpoint / PROGRESS)
