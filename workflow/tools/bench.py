"""python -m workflow bench train | sample | fid | encode  -- the benchmark harness, one command.

    python -m workflow bench train --peer bench/peers/tutorial_loop.py ...   # training step vs the tutorial
    python -m workflow bench sample ...                                          # sampler vs DDPMPipeline
    python -m workflow bench fid --num-images 10000 --steps 25                   # sampling + FID end to end
    python -m workflow bench encode --pipeline DIR ...                           # text-to-image: cache vs on the fly

What each measures and how: workflow/tools/bench_train.py (train), workflow/tools/bench_sample.py
(sample, fid) and workflow/tools/bench_encode.py (encode); `python -m workflow bench <what> --help`
lists the knobs. A measurement tool, not a pipeline stage, so it takes its knobs on the command line.
"""

from __future__ import annotations

import argparse

import torch

from workflow.tools import bench_encode, bench_sample, bench_train
from workflow.tools.bench_common import check_minimums

RUNNERS = {"train": bench_train, "sample": bench_sample, "fid": bench_sample, "encode": bench_encode}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m workflow bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    bench_train.add_parser(sub)
    bench_sample.add_parsers(sub)
    bench_encode.add_parser(sub)
    args = parser.parse_args(argv)
    check_minimums(args, RUNNERS[args.what].MINIMUMS)
    return args


def main(argv: list) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    RUNNERS[args.what].run(args, argv)
