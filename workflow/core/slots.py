"""Device slots: experiments run side by side (`dvc queue start -j N`, several Snakemake jobs) each get
a GPU of their own, so two never share a card and none waits while one is free.

    with device_slot("train") as slot:   # python -m workflow <stage> does this for the stages that compute
        ...                              # CUDA_VISIBLE_DEVICES names slot.index's GPU; WORKFLOW_SLOT=index
    with device_slot("train", devices=2):  # a two-process training: two GPUs, CUDA_VISIBLE_DEVICES="i,j"

A slot is a lock file, `slot-<i>.lock` in WORKFLOW_SLOT_DIR (default `<tmp>/workflow-slots-<uid>`),
held with fcntl.flock for the life of the process (and of a multi-process launcher it starts, which
inherits the lock): the kernel releases it when they exit, crash or are killed, so a slot is never
leaked and there is nothing to clean up. There are as many
slots as GPUs; without a GPU, WORKFLOW_SLOTS of them (default 1: two trainings on one CPU only slow
each other down), the same code, so a test can watch CPU experiments take turns.
A process already confined takes no slot: CUDA_VISIBLE_DEVICES set (by you, SLURM or a launcher), a
SLURM job on a node without GPUs (SLURM_JOB_ID: the allocation is the scheduler's), or one rank of a
multi-process launch (WORLD_SIZE > 1: accelerate launch, torchrun).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workflow.core.config import ConfigError

SLOT_DIR_ENV, SLOTS_ENV, SLOT_ENV = "WORKFLOW_SLOT_DIR", "WORKFLOW_SLOTS", "WORKFLOW_SLOT"
POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Slot:
    index: int | None  # the first slot held; None: no slot was needed (the process is already confined)
    count: int
    # the held lock files' descriptors: a launcher given them (subprocess pass_fds) holds the slot too, so a
    # killed parent does not free GPUs its ranks still train on
    locks: tuple[int, ...] = field(default=(), compare=False)


def slot_dir() -> Path:
    # /tmp itself, not $TMPDIR: a scheduler may give each job its own TMPDIR, and the slots must be shared
    return Path(os.environ.get(SLOT_DIR_ENV) or f"/tmp/workflow-slots-{os.getuid()}")


def gpu_count() -> int:
    """GPUs on this machine, found without creating a CUDA context (after one, CUDA_VISIBLE_DEVICES
    would no longer apply to this process): the NVIDIA driver's list, else nvidia-smi's."""
    driver = Path("/proc/driver/nvidia/gpus")
    if driver.is_dir():
        return sum(1 for _ in driver.iterdir())
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
        return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0
    return 0


def slot_count() -> int:
    """GPUs, else WORKFLOW_SLOTS (default 1)."""
    gpus = gpu_count()
    if gpus:
        return gpus
    raw = os.environ.get(SLOTS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment variable {SLOTS_ENV}={raw!r}: must be a whole number of slots, at least 1")
    return int(raw)


def confined() -> bool:
    """Already given its devices: CUDA_VISIBLE_DEVICES set, one rank of a multi-process launch, or a SLURM
    job on a node without GPUs (its CPUs are its allocation: jobs the scheduler put on one node must not
    wait for each other inside their time limits). A SLURM job that sees GPUs without CUDA_VISIBLE_DEVICES
    (a whole node, no --gres) still takes slots, so the stages it runs side by side spread over them."""
    if "CUDA_VISIBLE_DEVICES" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    return "SLURM_JOB_ID" in os.environ and gpu_count() == 0


def current_slot() -> str | None:
    """The slots this process holds (set by device_slot), as "1" or "0,1"; None if it holds none."""
    return os.environ.get(SLOT_ENV)


def try_lock(path: Path):
    """The open, flock'd file if the lock was free, else None."""
    handle = open(path, "a+")  # noqa: SIM115 -- held open for the life of the slot
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def take_slots(folder: Path, count: int, wanted: int) -> dict | None:
    """{index: held lock file} of `wanted` free slots among `count`, or None, holding nothing: all or none,
    since two launches each holding part of what they need while waiting for the rest would wait forever."""
    held = {}
    for index in range(count):
        handle = try_lock(folder / f"slot-{index}.lock")
        if handle is not None:
            held[index] = handle
            if len(held) == wanted:
                return held
    for handle in held.values():
        handle.close()
    return None


@contextlib.contextmanager
def device_slot(stage: str, devices: int = 1):
    """Hold `devices` free slots while the block runs (waiting until that many are free), with
    CUDA_VISIBLE_DEVICES and WORKFLOW_SLOT naming them; a confined process takes none. Without a GPU a
    multi-process training takes one slot: its processes share the CPU as one job."""
    if confined():
        yield Slot(None, 0)
        return
    count = slot_count()
    wanted = devices if gpu_count() else 1
    if wanted > count:
        raise ConfigError(f"{stage} needs {wanted} GPUs (train.num_processes) but this machine has {count}")
    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while (held := take_slots(folder, count, wanted)) is None:
        if not waited:
            print(f"{stage}: all {count} device slots are in use ({folder}); waiting for {wanted}", file=sys.stderr)
            waited = True
        time.sleep(POLL_SECONDS)
    names = ",".join(str(index) for index in held)
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", SLOT_ENV)}
    os.environ["CUDA_VISIBLE_DEVICES"] = names
    os.environ[SLOT_ENV] = names
    if count > 1:
        print(f"{stage}: device slot {names} of {count}", file=sys.stderr)
    try:
        yield Slot(min(held), count, tuple(handle.fileno() for handle in held.values()))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for handle in held.values():
            handle.close()  # closing the file releases the lock
