"""Deterministic fault injection, a testing aid: SIGKILL this process at a named point of a stage.

    WORKFLOW_FAULT=train.after_step=7 python -m workflow train        # dies right after step 7
    WORKFLOW_FAULT=train.checkpoint.mid_save=8 python -m workflow train   # dies inside step 8's save
    WORKFLOW_FAULT=artifact.before_rename=metrics.json dvc repro      # dies with metrics.json written
                                                                      # under its temporary name

The stages call `maybe_fault(point, at)` at the places where an interruption is most likely to leave
something half done. When WORKFLOW_FAULT names that point (`point`, or `point=at` for one value of
`at`, e.g. one step; several separated by commas), the process kills itself with SIGKILL, the signal
nobody can catch or clean up after: the same as the OOM killer, but at an exact step rather than after
a sleep. (A power cut can also lose what the kernel had not yet written to the disk; the writes are
not fsynced, so that is the filesystem's journal's to recover.) Unset (the normal case), a call costs
one dictionary lookup.

Points: train.after_step=<step>, train.checkpoint.mid_save=<step> (accelerate has written the state
under the temporary name, not renamed yet), train.checkpoint.saved=<step> (renamed, older ones not
yet pruned), preprocess.after_image=<n decoded>, sample.after_image=<n written>,
artifact.before_rename=<file or folder name> (every atomic write: complete, not yet in place),
artifact.old_aside=<folder name> (the folder it replaces renamed aside, the new one not yet in place).
tests/test_faults.py kills each stage this way and checks that a re-run loses nothing.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "WORKFLOW_FAULT"


def maybe_fault(point: str, at: object = None) -> None:
    """SIGKILL this process if WORKFLOW_FAULT names `point` (and `at`, when it gives a value)."""
    spec = os.environ.get(VARIABLE)
    if spec and triggers(spec, point, at):
        os.kill(os.getpid(), signal.SIGKILL)


def triggers(spec: str, point: str, at: object = None) -> bool:
    """Whether `spec` ("p", "p=v", comma-separated) names `point` at `at`."""
    for item in spec.split(","):
        name, _, value = item.strip().partition("=")
        if name == point and (not value or value == str(at)):
            return True
    return False
