"""python -m workflow <stage> [--params PARAMS]  -- run one pipeline stage.

Stages: download, preprocess, fid_reference, train, sample, evaluate, fid_steps, report, package.
Tools beside them: bench (training, sampling and FID throughput), compare (DVC experiments on one page),
preset (a configs/*.yaml preset checked and printed as `dvc exp run -S` arguments).
Training on several GPUs: accelerate launch -m workflow train
"""
import importlib
import sys

from workflow import STAGES
from workflow.artifacts import DiskFullError
from workflow.config import ConfigError

COMMANDS = STAGES + ("bench", "compare", "preset")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown stage {name!r}; stages: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"workflow.{name}")
    try:
        module.main(rest)
    except (ConfigError, DiskFullError) as exc:  # a user mistake or a full disk: one clear line
        print(f"error in stage {name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
