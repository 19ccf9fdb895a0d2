"""The benchmark harness on a tiny model: the numbers it reports hang together. Timings are never bounds."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.helpers import ROOT
from workflow.core.config import ConfigError, params_from_dict
from workflow.models.builders import build_unet
from workflow.tools import bench, bench_common, bench_train

PEER = ROOT / "bench" / "peers" / "tutorial_loop.py"
TINY_RUN = {"resolution": 8, "batch_size": 4, "steps": 2, "warmup": 1, "matmul_size": 256}


pytestmark = pytest.mark.usefixtures("one_thread")


def finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_bench_params_are_the_tutorials_model():
    params = bench_common.bench_params(params_from_dict({}), 32, 16, (32, 64, 64), 25, "cpu")
    assert params.model.layers_per_block == 2 and params.model.attention_levels == (1,)
    assert params.model.norm_num_groups == 32 and params.data.resolution == 32
    assert params.train.batch_size == 16 and params.train.max_steps == 25
    assert params.train.mixed_precision == "no" and params.train.random_flip
    assert bench_common.bench_params(params_from_dict({}), 8, 4, (16, 32), 3, "cuda").train.mixed_precision == "bf16"


def test_our_loop_alone_through_main(tiny_params, capsys):
    tiny_params()  # params.yaml in the working directory
    bench.main(
        [
            "train",
            "--resolution",
            "8",
            "--batch-size",
            "4",
            "--channels",
            "16",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "2",
            "--json",
            "bench.json",
        ]
    )
    r = json.loads(Path("bench.json").read_text())
    assert finite_positive(r["ours_images_per_second"]) and r["device"] == "cpu"
    assert len(r["ours_trials"]) == 2 and r["ours_images_per_second"] == max(r["ours_trials"])
    assert r["peer_images_per_second"] is None and r["ratio"] is None and r["peer_share_of_limit"] is None
    assert r["limit_images_per_second"] == pytest.approx(r["matmul_flop_per_second"] / r["flop_per_image"])
    assert r["ours_share_of_limit"] == pytest.approx(r["ours_images_per_second"] / r["limit_images_per_second"])
    assert r["matmul_dtype"] == "float32" and r["channels"] == [16, 32] and r["num_parameters"] > 0
    out = capsys.readouterr().out
    assert "ours / tutorial: n/a" in out and r["command"] in out and torch.__version__ in out


def test_flop_per_image_does_not_depend_on_batch_and_counts_the_backward():
    params = bench_common.bench_params(params_from_dict({}), 8, 4, (16, 32), 3, "cpu")
    at2, at4 = bench_train.flop_per_image(params, 2), bench_train.flop_per_image(params, 4)
    assert at2 > 0 and at4 == pytest.approx(at2, rel=0.01)
    with torch.device("meta"):
        model = build_unet(params.model, resolution=8, channels=3)
        x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    forward = counter.get_total_flops() / 2
    assert "aten.bmm" in map(str, counter.get_flop_counts()["Global"])  # the attention is counted
    # backward = grad of inputs + grad of weights, about twice the forward (less: no grad of the image)
    assert 2.5 * forward < at2 <= 3 * forward


@pytest.mark.parametrize("resolution, gflop", [(128, 372), (64, 93)])
def test_flop_per_image_of_the_seed_unet_is_design_section_5(resolution, gflop):
    params = bench_common.bench_params(params_from_dict({}), resolution, 128, bench_common.SEED_CHANNELS, 3, "cuda")
    assert bench_train.flop_per_image(params, 128) / 1e9 == pytest.approx(gflop, rel=0.005)


def test_matmul_rate_is_measured():
    rate, dtype = bench_train.matmul_rate(torch.device("cpu"), size=128, repeats=2, trials=2)
    assert finite_positive(rate) and dtype == "float32"


def test_both_loops_side_by_side():
    r = bench_train.bench_train(params_from_dict({}), channels=(32, 64), peer_path=PEER, **TINY_RUN)
    ours, theirs = r["ours_images_per_second"], r["peer_images_per_second"]
    assert finite_positive(ours) and finite_positive(theirs) and r["peer_batch_size"] == 4
    assert r["ratio"] == pytest.approx(ours / theirs)
    assert r["peer_share_of_limit"] == pytest.approx(theirs / r["limit_images_per_second"])
    table = bench_train.format_table(r, "python -m workflow bench train ...")
    assert f"ours / tutorial: {r['ratio']:.2f}x" in table and "tutorial loop (peer)" in table


def test_a_model_the_peer_cannot_build_is_a_clear_error():
    peer = bench_train.load_peer(PEER)
    params = bench_common.bench_params(params_from_dict({}), 8, 4, (16, 32), 3, "cpu")
    with pytest.raises(ConfigError, match="norm groups 32"):
        bench_train.check_same_model(peer, params)


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--warmup", "-1"), ("--repeats", "0")])
def test_bad_knobs_are_clear_errors(flag, value):
    with pytest.raises(ConfigError, match=f"{flag} must be >= "):
        bench.parse_args(["train", flag, value])


def test_the_peer_needs_a_warm_up_step():
    with pytest.raises(ConfigError, match="--warmup must be >= 1 with --peer"):
        bench.main(["train", "--peer", str(PEER), "--warmup", "0"])


def test_missing_peer_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        bench_train.load_peer(tmp_path / "tutorial_loop.py")


def test_bench_sample_ours_and_the_tutorial_call(tiny_params, capsys):
    tiny_params(sample={"sampler": "dpmsolver++"})  # params.yaml in the working directory: ours uses its sampler
    bench.main(
        [
            "sample",
            "--resolution",
            "8",
            "--channels",
            "32",
            "64",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--num-images",
            "6",
            "--peer-images",
            "4",
            "--repeats",
            "2",
            "--json",
            "sample.json",
        ]
    )
    r = json.loads(Path("sample.json").read_text())
    assert r["sampler"] == "dpmsolver++" and r["steps"] == 2 and r["dtype"] == "float32"
    assert len(r["ours_trials"]) == len(r["tutorial_trials"]) == 2
    assert r["ours_images_per_second"] == max(r["ours_trials"]) and finite_positive(r["tutorial_images_per_second"])
    assert r["ratio"] == pytest.approx(r["ours_images_per_second"] / r["tutorial_images_per_second"])
    out = capsys.readouterr().out
    assert "| ours: dpmsolver++ | 2 | float32 | 4 | 6 |" in out and "DDPMPipeline" in out and r["command"] in out


def test_bench_fid_end_to_end(tiny_params, capsys):
    tiny_params()
    bench.main(
        [
            "fid",
            "--resolution",
            "8",
            "--channels",
            "32",
            "64",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--num-images",
            "3",
            "--reference-images",
            "2",
            "--json",
            "fid.json",
        ]
    )
    r = json.loads(Path("fid.json").read_text())
    assert r["num_images"] == 3 and r["sampler"] == "ddim" and math.isfinite(r["fid"]) and r["fid"] > 0
    assert r["total_seconds"] == pytest.approx(r["sample_seconds"] + r["fid_seconds"])
    assert "| 3 samples, ddim-2 (eta 1.0), float32, batch 2 | seconds |" in capsys.readouterr().out


def test_fid_table_names_the_compiled_sampler_with_its_steps():
    from workflow.tools import bench_sample

    r = {"sampler": "dpmsolver++", "steps": 25, "eta": 0.0, "compile": True}
    assert bench_sample._sampler_label(r, with_steps=True) == "dpmsolver++-25, torch.compile"


@pytest.mark.parametrize("argv", [["sample", "--steps", "0"], ["fid", "--reference-images", "1"]])
def test_bad_sampling_bench_knobs_are_clear_errors(argv):

    with pytest.raises(ConfigError, match=f"{argv[1]} must be >= "):
        bench.parse_args(argv)
