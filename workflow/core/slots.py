"""Device slots: experiments run side by side (`dvc queue start -j N`, several Snakemake jobs) each get
a GPU of their own, so two never share a card and none waits while one is free.

    with device_slot("train") as slot:   # python -m workflow <stage> does this for the stages that compute
        ...                              # CUDA_VISIBLE_DEVICES names slot.index's GPU; WORKFLOW_SLOT=index
    with device_slot("train", devices=2):  # a two-process training: two GPUs, CUDA_VISIBLE_DEVICES="i,j"

A slot is a lock file, `slot-<device>.lock` in WORKFLOW_SLOT_DIR (default `<tmp>/workflow-slots-<uid>`),
held with fcntl.flock for the life of the process (and of a multi-process launcher it starts, which
inherits the lock): the kernel releases it when they exit, crash or are killed, so a slot is never
leaked and there is nothing to clean up. There are as many
slots as GPUs; without a GPU, WORKFLOW_SLOTS of them (default 1: two trainings on one CPU only slow
each other down), the same code, so a test can watch CPU experiments take turns.
Where CUDA_VISIBLE_DEVICES is set (a SLURM allocation of four GPUs running a queue, a shell given two),
the slots are the GPUs it names, as it names them (so give every process on a machine its GPUs the same
way: by index, or by UUID), and the stage sees its own among them; a SLURM job's slots are its own
(one folder per job). A process already confined takes no slot: CUDA_VISIBLE_DEVICES naming no GPU
(CPU only) or the slot its parent holds, any of it set on a machine without GPUs, a SLURM job on a node
without GPUs (SLURM_JOB_ID: the allocation is the scheduler's), or one rank of a multi-process launch
(WORLD_SIZE > 1: accelerate launch, torchrun).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from workflow.core.artifacts import try_lock
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
    """/tmp itself, not $TMPDIR: a scheduler may give each job its own TMPDIR, and the slots must be shared.
    One folder per SLURM job: a job's GPUs are its own, and SLURM may number each job's GPUs from 0."""
    job = os.environ.get("SLURM_JOB_ID")
    return Path(os.environ.get(SLOT_DIR_ENV) or f"/tmp/workflow-slots-{os.getuid()}" + (f"-job{job}" if job else ""))


def visible_names(visible: str) -> list[str]:
    """The devices CUDA_VISIBLE_DEVICES names, read as CUDA reads it: up to the first entry that is not a
    device (an index, or a GPU-/MIG- UUID), so "-1" or "" name none (a CPU run)."""
    names = []
    for name in (entry.strip() for entry in visible.split(",")):
        if not (name.isdigit() or name.startswith(("GPU-", "MIG-"))):
            break
        names.append(name)
    return names


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


def usable_gpus() -> int:
    """The GPUs this process may use: the machine's, as many as CUDA_VISIBLE_DEVICES names where it is set
    ("" or "-1": none, a CPU run on a GPU machine)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = gpu_count()
    return count if visible is None else min(count, len(visible_names(visible)))


def slot_pool(visible: str | None, gpus: int, slurm: bool, inherited: str | None = None) -> list[str] | None:
    """The devices this process takes its slots among, as CUDA_VISIBLE_DEVICES would name them, or None
    where it is already confined. `visible`: its CUDA_VISIBLE_DEVICES (None: unset); `gpus`: the machine's;
    `inherited`: WORKFLOW_SLOT, set where a parent holds the slots. Confined: one rank of a launch (the
    caller's check), a child of a slot holder (CUDA_VISIBLE_DEVICES is that slot), no GPU named (a CPU
    run), or no GPU on the machine and CUDA_VISIBLE_DEVICES set or a SLURM job (its CPUs are its
    allocation: jobs the scheduler put on one node must not wait for each other inside their time
    limits). The GPUs CUDA_VISIBLE_DEVICES names are locked even where they are as many as the stage
    uses: another process given the same ones (a queue in one allocation) must not share them."""
    names = None if visible is None else visible_names(visible)
    if not gpus:
        return None if names is not None or slurm else [str(i) for i in range(cpu_slot_count())]
    if names is None:
        return [str(i) for i in range(gpus)]
    return None if not names or inherited == visible else names


def cpu_slot_count() -> int:
    raw = os.environ.get(SLOTS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment variable {SLOTS_ENV}={raw!r}: must be a whole number of slots, at least 1")
    return int(raw)


def slots_wanted(stage: str, pool: list[str], devices: int, gpus: int, visible: str | None) -> int:
    """How many of the pool's slots the stage takes: its devices on a GPU machine, else one (a
    multi-process CPU training shares the CPU as one job); more than the pool holds is refused."""
    wanted = devices if gpus else 1
    if wanted > len(pool):
        where = f"CUDA_VISIBLE_DEVICES={visible!r} names" if visible is not None else "this machine has"
        raise ConfigError(f"{stage} needs {wanted} GPUs (train.num_processes) but {where} {len(pool)}")
    return wanted


def lock_name(device: str) -> str:
    """The slot file of a device as CUDA_VISIBLE_DEVICES names it (an index, a GPU-/MIG- UUID)."""
    return "slot-" + re.sub(r"[^A-Za-z0-9._-]", "_", device) + ".lock"


def current_slot() -> str | None:
    """The slots this process holds (set by device_slot), as "1" or "0,1"; None if it holds none."""
    return os.environ.get(SLOT_ENV)


def take_slots(folder: Path, pool: list[str], wanted: int) -> dict | None:
    """{device: held lock file} of `wanted` free slots among the `pool` devices, or None, holding nothing:
    all or none, since two launches each holding part of what they need while waiting for the rest would
    wait forever."""
    held = {}
    for device in pool:
        handle = try_lock(folder / lock_name(device))
        if handle is not None:
            held[device] = handle
            if len(held) == wanted:
                return held
    for handle in held.values():
        handle.close()
    return None


@contextlib.contextmanager
def waiting_in_line(folder: Path, stage: str, pool: list[str]):
    """Hold the pool's queue lock while taking slots: a stage waiting for them keeps it, so later stages
    wait behind it instead of taking each slot it frees (a two-GPU training would otherwise wait for ever
    behind a stream of one-GPU stages). One line per pool: stages given other GPUs never wait in it.
    Released once the slots are taken, or by the kernel on a kill."""
    key = hashlib.sha256(",".join(sorted(pool)).encode()).hexdigest()[:12]
    with open(folder / f"queue-{key}.lock", "a+") as line:
        try:
            fcntl.flock(line, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{stage}: another stage is waiting for device slots ({folder}); waiting behind it", file=sys.stderr)
            fcntl.flock(line, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


@contextlib.contextmanager
def device_slot(stage: str, devices: int = 1):
    """Hold `devices` free slots while the block runs (waiting until that many are free), with
    CUDA_VISIBLE_DEVICES and WORKFLOW_SLOT naming them; a confined process takes none. Without a GPU a
    multi-process training takes one slot: its processes share the CPU as one job."""
    gpus = gpu_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    pool = None if launched else slot_pool(visible, gpus, "SLURM_JOB_ID" in os.environ, os.environ.get(SLOT_ENV))
    if pool is None:
        yield Slot(None, 0)
        return
    count, wanted = len(pool), slots_wanted(stage, pool, devices, gpus, visible)
    folder = slot_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with waiting_in_line(folder, stage, pool):
        waited = False
        while (held := take_slots(folder, pool, wanted)) is None:
            if not waited:
                print(f"{stage}: all {count} device slots are in use ({folder}); waiting for {wanted}", file=sys.stderr)
                waited = True
            time.sleep(POLL_SECONDS)
    names = ",".join(str(index) for index in held)
    saved = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", SLOT_ENV)}
    os.environ["CUDA_VISIBLE_DEVICES"] = names
    os.environ[SLOT_ENV] = names
    if count > 1:
        print(f"{stage}: device slot {names} (of {', '.join(pool)})", file=sys.stderr)
    try:
        yield Slot(min(pool.index(device) for device in held), count, tuple(h.fileno() for h in held.values()))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for handle in held.values():
            handle.close()  # closing the file releases the lock
