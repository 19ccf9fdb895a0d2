"""Stage fid_sweep: off by default (a header, nothing loaded); on, one row per step count, and the row at
the sample stage's step count is evaluate's FID of the sample stage's images."""

import csv
import json
from pathlib import Path

import pytest

from tests.helpers import write_images
from workflow.core.config import load_params
from workflow.stages import evaluate, fid_reference, fid_sweep
from workflow.stages.sample import run as sample
from workflow.stages.train import run as train


def rows(path):
    return list(csv.DictReader(open(path)))


def test_empty_sweep_writes_the_header_and_needs_nothing(tiny_params):
    params = tiny_params()  # no pipeline, no reference: none is loaded
    fid_sweep.run(load_params("params.yaml"))
    assert Path(params.paths.fid_steps).read_text() == "num_inference_steps,fid,kid,seconds\n"


def test_sweep_rows_and_the_point_evaluate_scored(tiny_params):
    params = tiny_params(fid={"steps_sweep": [2, 4], "num_samples": 4}, train={"progress_grids": False})
    write_images(params.paths.images, n=24)
    train(params)
    fid_reference.run(load_params("params.yaml"))
    sample(params)
    evaluate.run(load_params("params.yaml"))
    fid_sweep.run(load_params("params.yaml"))
    table = rows(params.paths.fid_steps)
    assert [int(r["num_inference_steps"]) for r in table] == [2, 4]
    assert all(float(r["fid"]) > 0 and float(r["seconds"]) > 0 for r in table)
    assert float(table[0]["fid"]) != float(table[1]["fid"])
    metrics = json.loads(Path(params.paths.metrics).read_text())  # sample.num_inference_steps is 4
    assert float(table[1]["fid"]) == pytest.approx(metrics["fid"], rel=1e-5)
    assert float(table[1]["kid"]) == pytest.approx(metrics["kid"], rel=1e-4, abs=1e-9)
