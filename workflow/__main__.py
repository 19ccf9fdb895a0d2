"""python -m workflow <command> [options]  -- the one command line of the pipeline.

Stages (each reads params.yaml, or the file given with --params):
  download, download_model, preprocess, encode, fid_reference, train, sample, evaluate, fid_sweep,
  report, package.
Tools beside them: bench (train | sample | fid | encode throughput), compare (DVC experiments on one page),
preset (a configs/*.yaml preset checked and printed as `dvc exp run -S` arguments),
pull (`dvc pull` with every object checked against its md5; a corrupt one is named, never checked out),
quality (recipes' FID against training compute, over seeds: docs/QUALITY.md).
Training on several GPUs: set train.num_processes; `python -m workflow train` launches the ranks itself.
"""

import argparse
import contextlib
import importlib
import sys

from workflow import DEVICE_STAGES, STAGES, TOOLS
from workflow.core.artifacts import DiskFullError
from workflow.core.config import DEFAULT_PARAMS, ConfigError, load_params
from workflow.core.launch import check_cpu_ranks, in_rank, launch_ranks, needs_launch
from workflow.core.slots import device_slot, usable_gpus


def run_stage(name: str, argv: list[str]) -> None:
    """Every stage the same way: read the params, `run(params)` -> summary, print its headline."""
    stage = importlib.import_module(f"workflow.stages.{name}")
    parser = argparse.ArgumentParser(
        prog=f"python -m workflow {name}",
        description=stage.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: params.yaml)")
    params_file = parser.parse_args(argv).params
    params = load_params(params_file)
    processes = params.train.num_processes if name == "train" else 1
    if needs_launch(processes):
        check_cpu_ranks(processes, usable_gpus())
    # a stage that must run alone on its outputs (train: one run per recipe) waits for that before any device;
    # ranks are past it: the process that launched them waited
    alone = hasattr(stage, "sole_run") and not in_rank()
    sole = stage.sole_run(params) if alone else contextlib.nullcontext()
    devices = device_slot(name, devices=processes) if name in DEVICE_STAGES else contextlib.nullcontext()
    with sole as held, devices as slot:
        if needs_launch(processes):  # each rank runs this same command; the launcher inherits the locks
            locks = (slot.locks if slot else ()) + ((held,) if held is not None else ())
            launch_ranks(name, params_file, processes, locks)
        else:
            print(stage.headline(stage.run(params), params))


def run_tool(name: str, argv: list[str]) -> None:
    importlib.import_module(f"workflow.tools.{name}").main(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STAGES + TOOLS:
        print(f"unknown command {name!r}; stages: {', '.join(STAGES)}; tools: {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    is_stage = name in STAGES
    try:
        (run_stage if is_stage else run_tool)(name, rest)
    except (ConfigError, DiskFullError) as exc:  # a user mistake or a full disk: one clear line
        print(f"error in {'stage ' if is_stage else ''}{name}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
