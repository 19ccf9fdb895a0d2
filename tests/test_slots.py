"""Device slots (workflow/core/slots.py): concurrent stages each hold their own slot, a third waits for a
free one, a killed holder frees its slot, and a confined process takes none. Real processes, real locks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for
from workflow.core.artifacts import try_lock
from workflow.core.config import ConfigError
from workflow.core.slots import Slot, device_slot, gpu_count, lock_name, slot_pool, slots_wanted, take_slots

HOLD = """
import json, os, sys, time
from pathlib import Path
from workflow.core.slots import device_slot
with device_slot("test") as slot:
    start = time.monotonic()
    if len(sys.argv) > 2:  # held until the test releases it: overlaps are the test's to decide, not the clock's
        gate = Path(sys.argv[2])
        (gate / f"held-{os.getpid()}").touch()
        while not (gate / "release").exists():
            time.sleep(0.02)
    time.sleep(float(sys.argv[1]))
    print(json.dumps({"slot": slot.index, "count": slot.count, "start": start, "end": time.monotonic(),
                      "cuda": os.environ["CUDA_VISIBLE_DEVICES"], "env": os.environ["WORKFLOW_SLOT"]}))
"""


def slot_env(tmp_path, slots: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID", "WORLD_SIZE")}
    return {**env, "WORKFLOW_SLOT_DIR": str(tmp_path / "slots"), "WORKFLOW_SLOTS": str(slots), "PYTHONPATH": str(ROOT)}


def holder(env: dict, seconds: float, gate: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, "-c", HOLD, str(seconds), *([str(gate)] if gate else [])]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_three_processes_share_two_slots_without_ever_sharing_one(tmp_path):
    """Two hold both slots until released; a third started then must wait, say so, and take a freed one
    (ordered by a gate file, not by sleeps: a loaded machine changes the timing, not the outcome)."""
    env, gate = slot_env(tmp_path), tmp_path / "gate"
    gate.mkdir()
    procs = [holder(env, 0.0, gate) for _ in range(2)]
    try:
        wait_for(lambda: len(list(gate.glob("held-*"))) == 2, "two holders")
        procs.append(holder(env, 0.0, gate))
        waiting = procs[2].stderr.readline()  # its first word: both slots are taken
        assert "test: all 2 device slots are in use" in waiting, waiting
    finally:
        (gate / "release").touch()  # never leave a holder polling, whatever failed
    results, messages = [], []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
        messages.append(err)
    messages[2] = waiting + messages[2]
    assert sorted({r["slot"] for r in results}) == [0, 1]
    assert all(r["count"] == 2 and r["cuda"] == r["env"] == str(r["slot"]) for r in results)
    for a in results:  # no two overlapping holds of one slot
        for b in results:
            if a is not b and a["slot"] == b["slot"]:
                assert a["end"] <= b["start"] or b["end"] <= a["start"]
    starts = sorted(results, key=lambda r: r["start"])
    assert starts[2]["start"] >= min(r["end"] for r in starts[:2]) - 0.05  # the third waited for a free slot
    assert sum("test: all 2 device slots are in use" in m for m in messages) == 1  # the one that waited says so
    assert sum("test: device slot" in m for m in messages) == 3


def test_a_stage_waiting_for_a_slot_gets_it_before_one_that_came_later(tmp_path):
    """One slot: A holds it, B waits, then C arrives. C lines up behind B (it says so) instead of racing
    B for the slot A frees: a two-GPU training would otherwise wait for ever behind one-GPU stages."""
    env = slot_env(tmp_path, slots=1)
    gates = {name: tmp_path / f"gate-{name}" for name in "ABC"}
    for gate in gates.values():
        gate.mkdir()
    procs = {"A": holder(env, 0.0, gates["A"])}
    try:
        wait_for(lambda: any(gates["A"].glob("held-*")), "A holding the slot")
        procs["B"] = holder(env, 0.0, gates["B"])
        assert "all 1 device slots are in use" in procs["B"].stderr.readline()
        procs["C"] = holder(env, 0.0, gates["C"])
        assert "another stage is waiting for device slots" in procs["C"].stderr.readline()
        (gates["A"] / "release").touch()
        wait_for(lambda: any(gates["B"].glob("held-*")), "B taking the slot A freed")
        assert not any(gates["C"].glob("held-*"))
        (gates["B"] / "release").touch()
        wait_for(lambda: any(gates["C"].glob("held-*")), "C taking it after B")
    finally:
        for gate in gates.values():
            (gate / "release").touch()
    for p in procs.values():
        p.communicate(timeout=120)
        assert p.returncode == 0


def test_a_killed_holder_frees_its_slot(tmp_path):
    env, gate = slot_env(tmp_path, slots=1), tmp_path / "gate"
    gate.mkdir()
    first = holder(env, 0.0, gate)  # holds the only slot until killed: the gate is never opened
    wait_for(lambda: any(gate.glob("held-*")), "the first holder taking the slot")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    second = holder(env, 0.1)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert json.loads(out)["slot"] == 0


def test_a_confined_process_takes_no_slot(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKFLOW_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with device_slot("test") as slot:
        assert slot == Slot(None, 0)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of accelerate launch / torchrun
    with device_slot("test") as slot:
        assert slot.index is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # a SLURM job: on a CPU node its allocation confines it
    with device_slot("test") as slot:
        assert (slot.index is None) == (gpu_count() == 0)  # seeing GPUs without CUDA_VISIBLE_DEVICES: slots
    assert not (tmp_path / "slots").exists()


def test_the_slot_is_set_while_held_and_restored_after(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKFLOW_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("WORKFLOW_SLOTS", "1")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with device_slot("test") as slot:
        assert slot == Slot(0, 1)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == os.environ["WORKFLOW_SLOT"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "WORKFLOW_SLOT" not in os.environ


def test_a_multi_gpu_training_takes_its_slots_all_at_once_or_none(tmp_path):
    """train.num_processes: 2 on a box of three GPUs, one of them busy: it gets the two free ones; with
    one free it takes nothing (holding one while waiting for another could deadlock two launches)."""
    busy = try_lock(tmp_path / "slot-1.lock")  # another stage holds GPU 1
    held = take_slots(tmp_path, ["0", "1", "2"], wanted=2)
    assert sorted(held) == ["0", "2"]
    for handle in held.values():
        handle.close()
    other = try_lock(tmp_path / "slot-2.lock")  # now GPUs 1 and 2 are busy
    assert take_slots(tmp_path, ["0", "1", "2"], wanted=2) is None
    assert (free := try_lock(tmp_path / "slot-0.lock")) is not None  # the failed attempt kept nothing
    for handle in (busy, other, free):
        handle.close()


@pytest.mark.parametrize(
    "visible, gpus, slurm, inherited, pool",
    [
        (None, 4, False, None, ["0", "1", "2", "3"]),  # a whole machine: every GPU is a slot
        (None, 4, True, None, ["0", "1", "2", "3"]),  # a SLURM job on a whole GPU node, no --gres: the same
        ("0,1,2,3", 4, True, None, ["0", "1", "2", "3"]),  # SLURM --gpus=4 running a queue of one-GPU stages
        ("2,5", 8, True, None, ["2", "5"]),  # an allocation of two: slots among those two only
        ("GPU-aa,GPU-bb", 2, False, None, ["GPU-aa", "GPU-bb"]),  # named by UUID: taken by UUID
        ("3", 4, True, None, ["3"]),  # SLURM --gpus=1: its GPU, locked (in the job's own folder)
        ("1,3", 4, False, None, ["1", "3"]),  # two GPUs, as many as a two-process training: locked all the same
        ("1", 4, False, "1", None),  # a child of the process holding slot 1: it runs in its parent's slot
        ("", 4, False, None, None),  # GPUs hidden: a CPU run
        ("-1", 4, False, None, None),  # CUDA reads no device past an invalid entry: a CPU run too
        ("0,-1,2", 4, False, None, ["0"]),  # ... and stops there
        ("3", 0, False, None, None),  # set on a machine without GPUs: nothing to share
        (None, 0, True, None, None),  # a SLURM job on a CPU node: its allocation confines it
        (None, 0, False, None, ["0"]),  # no GPU: WORKFLOW_SLOTS (default 1) CPU slots
    ],
)
def test_the_slots_are_the_gpus_a_process_may_use(monkeypatch, visible, gpus, slurm, inherited, pool):
    """Any CUDA_VISIBLE_DEVICES used to mean "confined": in a SLURM allocation of four GPUs every queued
    experiment then trained on the first one."""
    monkeypatch.delenv("WORKFLOW_SLOTS", raising=False)
    assert slot_pool(visible, gpus, slurm, inherited) == pool


def test_each_slurm_job_has_slots_of_its_own(monkeypatch):
    """SLURM may number every job's GPUs from 0: two jobs on one node must not wait for each other's "0"."""
    from workflow.core.slots import SLOT_DIR_ENV, slot_dir

    monkeypatch.delenv(SLOT_DIR_ENV, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    first = slot_dir()
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert first != slot_dir() == Path(f"/tmp/workflow-slots-{os.getuid()}-job42")


def test_stages_given_other_gpus_never_wait_in_each_others_line(tmp_path):
    """The queue lock is the pool's: a stage waiting for GPUs 0-3 does not hold back one given 4-7."""
    from workflow.core.slots import waiting_in_line

    with waiting_in_line(tmp_path, "a", ["0", "1", "2", "3"]):
        done = subprocess.run(
            [sys.executable, "-c", WAIT_IN_LINE, str(tmp_path), "4,5,6,7"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "waiting behind" not in done.stderr, done.stderr
        same = subprocess.Popen(
            [sys.executable, "-c", WAIT_IN_LINE, str(tmp_path), "3,2,1,0"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "another stage is waiting for device slots" in same.stderr.readline()  # the same pool: it waits
    assert same.wait(timeout=60) == 0


WAIT_IN_LINE = """
import sys
from pathlib import Path
from workflow.core.slots import waiting_in_line
with waiting_in_line(Path(sys.argv[1]), "b", sys.argv[2].split(",")):
    pass
"""


def test_a_device_named_by_uuid_has_a_lock_file_of_its_own(tmp_path):
    mig = "MIG-GPU-5c89852c/1/0"  # the older MIG form holds slashes
    assert lock_name("3") == "slot-3.lock" and lock_name(mig) == "slot-MIG-GPU-5c89852c_1_0.lock"
    held = take_slots(tmp_path, ["GPU-aa", mig], wanted=2)
    assert sorted(held) == ["GPU-aa", mig] and take_slots(tmp_path, ["GPU-aa"], wanted=1) is None
    for handle in held.values():
        handle.close()


def test_more_gpus_than_the_pool_holds_are_refused_naming_where_the_pool_came_from():
    """Two ranks on the one GPU CUDA_VISIBLE_DEVICES names would fail inside NCCL ("Duplicate GPU")."""
    with pytest.raises(
        ConfigError, match=r"train needs 2 GPUs \(train.num_processes\) but CUDA_VISIBLE_DEVICES='0' names 1"
    ):
        slots_wanted("train", ["0"], devices=2, gpus=4, visible="0")
    with pytest.raises(ConfigError, match=r"needs 4 GPUs \(train.num_processes\) but this machine has 2"):
        slots_wanted("train", ["0", "1"], devices=4, gpus=2, visible=None)
    assert slots_wanted("train", ["0"], devices=2, gpus=0, visible=None) == 1  # CPU: one job, one slot


@pytest.mark.parametrize("bad", ["0", "two", "-1"])
def test_a_bad_slot_count_is_named(tmp_path, monkeypatch, bad):
    monkeypatch.setenv("WORKFLOW_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("WORKFLOW_SLOTS", bad)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=f"WORKFLOW_SLOTS={bad!r}"), device_slot("test"):
        pass


def test_the_slots_are_shared_whatever_each_job_s_tmpdir(monkeypatch, tmp_path):
    """A scheduler may give every job its own TMPDIR: the default folder is /tmp's, the same for all."""
    from workflow.core.slots import SLOT_DIR_ENV, slot_dir

    monkeypatch.delenv(SLOT_DIR_ENV, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert slot_dir() == Path(f"/tmp/workflow-slots-{os.getuid()}")
