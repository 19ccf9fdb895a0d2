"""The recipe-quality tool (python -m workflow quality): budgets to steps, each job's params, the matrix
run by the real stages on a tiny configuration, and the tables' statistics on hand-checkable numbers."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import ROOT, TINY
from workflow.core.config import load_params, overlay, params_from_dict
from workflow.models.inception import packaged_weights
from workflow.tools import quality, quality_jobs, quality_tables
from workflow.tools.quality_jobs import (
    FAILED,
    GENERATED,
    OURS,
    Job,
    Matrix,
    budget_steps,
    defaults,
    params_dict,
    prepare_data,
    read_results,
    recipe_key,
    recipe_presets,
    run_matrix,
    same_params,
    settings_key,
)

RECIPES = [str(ROOT / "configs/recipes/tutorial.yaml"), str(ROOT / "configs/recipes/train-unconditional.yaml")]
RATES = {"steps_per_second": {OURS: {"8": 0.5}, "tutorial": {"8": 1.0}}}


def matrix(tmp_path, **changes) -> Matrix:
    settings = {
        "out": str(tmp_path / "q"),
        "recipes": recipe_presets(RECIPES[:1]),
        "samples": 6,
        "reference": 6,
        "sample_batch": 6,
        "threads": 1,
        "weights": None,
        "weights_sha256": None,
        "defaults": overlay(defaults(), TINY),
    }
    return Matrix(**{**settings, **changes})


def test_recipe_presets_are_the_reference_scripts_settings():
    tutorial, script = (load_params(ROOT / "params.yaml"), load_params(ROOT / "params.yaml"))
    tutorial = params_from_dict(overlay(tutorial.to_dict(), recipe_presets(RECIPES)["tutorial"]))
    script = params_from_dict(overlay(script.to_dict(), recipe_presets(RECIPES)["train-unconditional"]))
    for p in (tutorial, script):
        assert (p.train.batch_size, p.train.learning_rate, p.train.warmup_steps) == (16, 1e-4, 500)
        assert (p.train.lr_schedule, p.train.max_grad_norm) == ("cosine", 1.0)
        assert (p.sample.sampler, p.sample.num_inference_steps) == ("ddpm", 1000)
    assert (tutorial.train.ema, tutorial.train.adam_weight_decay, tutorial.train.adam_beta1) == (False, 0.01, 0.9)
    assert (script.train.ema, script.train.adam_weight_decay, script.train.adam_beta1) == (True, 1e-6, 0.95)
    assert (script.train.ema_power, script.train.ema_max_decay) == (0.75, 0.9999)


def test_budget_steps_converts_cpu_minutes_with_the_measured_rate():
    assert budget_steps(RATES, OURS, 8, 2.0) == 60
    assert budget_steps(RATES, "tutorial", 8, 0.5) == 30
    assert budget_steps(RATES, "tutorial", 8, 0.001) == 1  # never zero steps
    with pytest.raises(SystemExit, match="no rate at 16 px for recipe 'tutorial': run"):
        budget_steps(RATES, "tutorial", 16, 1.0)


def test_job_params_put_the_recipe_over_the_defaults_and_fix_precision_and_paths(tmp_path):
    m = matrix(tmp_path)
    job = Job("tutorial", 8, 2, 0.5, 30)
    p = params_from_dict(params_dict(m, job))
    assert (p.seed, p.data.resolution, p.train.max_steps, p.train.epochs) == (2, 8, 30, None)
    assert (p.train.batch_size, p.sample.sampler) == (16, "ddpm")  # the recipe's
    assert (p.train.mixed_precision, p.train.allow_tf32, p.sample.mixed_precision) == ("no", False, "no")
    assert p.paths.images == f"{m.out}/data/r8/images.npy"
    assert p.paths.samples == f"{m.out}/jobs/tutorial-r8-s2-b0.5/samples"
    assert p.sample.grid_size == 2  # shrunk to fit the 6-sample set
    sweep = Job(OURS, 8, 0, 0.5, 15, sampler="ddim", sampling_steps=7, eta=1.0, model="ours-r8-s0-b0.5")
    s = params_from_dict(params_dict(m, sweep))
    assert (s.sample.sampler, s.sample.num_inference_steps, s.sample.eta) == ("ddim", 7, 1.0)
    assert s.sample.timestep_spacing is None  # the params', the schedule's own
    trailing = dataclasses.replace(sweep, spacing="trailing")
    assert params_from_dict(params_dict(m, trailing)).sample.timestep_spacing == "trailing"
    assert s.paths.trained == f"{m.out}/jobs/ours-r8-s0-b0.5/trained"  # samples the model job's weights
    assert s.paths.samples == f"{m.out}/jobs/{sweep.name}/samples"


def test_matrix_jobs_longest_first_then_the_sweep_and_optionally_without_ours():
    common = ["matrix", "--rates", "r.json", "--out", "q", "--resolutions", "8", "--budgets", "0.5", "1"]
    common += ["--seeds", "0", "--recipes", RECIPES[0]]
    args = quality.build_parser().parse_args([*common, "--sampler-sweep", "ddim:1:3 ddpm:0:3:trailing"])
    jobs = quality.matrix_jobs(args, RATES)
    assert [(j.name, j.steps) for j in jobs] == [
        ("tutorial-r8-s0-b1", 60),
        ("tutorial-r8-s0-b0.5", 30),
        ("ours-r8-s0-b1", 30),
        ("ours-r8-s0-b0.5", 15),
        ("ours-r8-s0-b1-ddim-eta1-n3", 30),  # over our model at the largest budget
        ("ours-r8-s0-b1-ddpm-eta0-n3-trailing", 30),  # the params' spacing (none given) stays out of the name
    ]
    assert jobs[-2].model == jobs[-1].model == "ours-r8-s0-b1"
    alone = quality.build_parser().parse_args([*common, "--without-ours", "--sampler-sweep", ""])
    assert [j.name for j in quality.matrix_jobs(alone, RATES)] == ["tutorial-r8-s0-b1", "tutorial-r8-s0-b0.5"]
    with pytest.raises(SystemExit, match="--without-ours: the sampler sweep samples our recipe's model"):
        quality.matrix_jobs(quality.build_parser().parse_args([*common, "--without-ours"]), RATES)


def test_sweep_text_parses_and_a_bad_part_is_named():
    assert quality.parse_sweep("ddim:1:10,25 ddpm:0:5:trailing") == [
        ("ddim", 1.0, 10, None),
        ("ddim", 1.0, 25, None),
        ("ddpm", 0.0, 5, "trailing"),
    ]
    for bad in ("ddim:10", "ddim:1:10:trailng", "ddim:1:10:trailing:x"):
        with pytest.raises(SystemExit, match=f"'{bad}'"):
            quality.parse_sweep(bad)


def test_a_job_folder_written_before_a_params_key_was_added_is_the_same_job(tmp_path):
    """The key then has its default, what the folder's run did; any other difference is another job."""
    now = params_dict(matrix(tmp_path), Job(OURS, 8, 0, 0.1, 3))
    older = copy.deepcopy(now)
    del older["sample"]["timestep_spacing"]
    assert same_params(older, now)
    assert not same_params(older, overlay(now, {"sample": {"timestep_spacing": "trailing"}}))
    assert not same_params(overlay(now, {"train": {"max_steps": 4}}), now)
    assert not same_params(overlay(now, {"sample": {"sampler": "dpmsolver"}}), now)  # refused now: not the same


def test_the_matrix_trains_samples_and_scores_with_the_stages(tmp_path):
    m = matrix(tmp_path)
    prepare_data(m, [8])
    model = Job(OURS, 8, 0, 0.1, budget_steps(RATES, OURS, 8, 0.1))
    sweep = Job(OURS, 8, 0, 0.1, model.steps, sampler="dpmsolver++", sampling_steps=3, model=model.name)
    m.job_dir(model.name).mkdir(parents=True)
    (m.job_dir(model.name) / FAILED).write_text("an earlier run's failure")  # tried again, not reported again
    summary = run_matrix(m, [model, sweep], workers=1, deadline=None)
    assert summary == {**summary, "scored": 2, "already_scored": 0, "failed": [], "unfinished": []}
    assert summary["out_of_time"] is False
    rows = {r["name"]: r for r in read_results(m.out)}
    assert set(rows) == {model.name, sweep.name}
    trained = rows[model.name]
    assert trained["train_steps"] == model.steps == 3
    assert trained["recipe_key"] == rows[sweep.name]["recipe_key"] == recipe_key(m, OURS)  # what `tables` tells apart
    assert trained["fid_num_samples"] == 6 and trained["fid_num_reference"] == 6
    assert all(math.isfinite(trained[k]) for k in ("fid", "kid", "precision", "recall"))
    assert rows[sweep.name]["train_steps"] == 3  # the sweep scores the model job's weights
    assert rows[sweep.name]["fid"] != trained["fid"]  # with its own sampler
    assert rows[sweep.name]["sampled_with"] == {"sampler": "dpmsolver++", "steps": 3, "eta": None}
    assert trained["sampled_with"] == {"sampler": "ddim", "steps": 4, "eta": 1.0}  # the recipe's (TINY's)
    record = json.loads((m.job_dir(sweep.name) / GENERATED).read_text())
    assert record["train"] is None and record["sample"]["sampler"] == "dpmsolver++"
    # each job's params file is a complete, valid params file for the stage commands
    saved = yaml.safe_load((m.job_dir(model.name) / "params.yaml").read_text())
    assert params_from_dict(saved).paths.metrics == str(m.job_dir(model.name) / "metrics.json")
    # a second run skips what is scored
    again = run_matrix(m, [model, sweep], workers=1, deadline=None)
    assert (again["scored"], again["already_scored"], len(read_results(m.out))) == (0, 2, 2)
    # ... if it was scored as it is set up now: a job of the same name trained or sampled another way stops the
    # matrix, naming it, instead of passing the old measurement off as the new one
    longer = dataclasses.replace(model, steps=model.steps + 1)
    key = recipe_key(m, OURS)
    scored = rf"{model.name} \(scored: ddim-4 eta 1, 3 steps, 6 samples vs 6 images, recipe settings {key}; now: "
    with pytest.raises(
        SystemExit, match=scored + rf"ddim-4 eta 1, 4 steps, 6 samples vs 6 images, recipe settings {key}\)"
    ):
        run_matrix(m, [longer], workers=1, deadline=None)
    eta0 = matrix(tmp_path, defaults=overlay(m.defaults, {"sample": {"eta": 0.0}}))
    with pytest.raises(SystemExit, match=scored + r"ddim-4 eta 0, 3 steps, 6 samples vs 6 images"):
        run_matrix(eta0, [model], workers=1, deadline=None)
    with pytest.raises(SystemExit, match=scored + r"ddim-4 eta 1, 3 steps, 5 samples vs 6 images"):
        run_matrix(dataclasses.replace(m, samples=5), [model], workers=1, deadline=None)
    # a job folder an earlier run left (interrupted before scoring) with other params is not scored or resumed
    unscored = Job(OURS, 8, 1, 0.1, model.steps)
    m.job_dir(unscored.name).mkdir(parents=True)
    (m.job_dir(unscored.name) / "params.yaml").write_text(yaml.safe_dump(params_dict(m, unscored, steps=99)))
    with pytest.raises(SystemExit, match=rf"\['{unscored.name}'\] hold an earlier run's files, made with other params"):
        run_matrix(m, [unscored], workers=1, deadline=None)
    # a sampler the params refuse (a --sampler-sweep typo) stops the matrix before anything trains
    typo = dataclasses.replace(sweep, sampler="dpmsolver")
    with pytest.raises(SystemExit, match=rf"job {typo.name}: .*sample.sampler"):
        run_matrix(m, [typo], workers=1, deadline=None)
    # a new sweep over a scored model whose weights are gone stops at once, naming it, instead of waiting
    shutil.rmtree(m.job_dir(model.name) / "trained")
    other = dataclasses.replace(sweep, sampler="ddpm")
    with pytest.raises(SystemExit, match=other.name):
        run_matrix(m, [model, other], workers=1, deadline=None)


def test_a_worker_killed_mid_job_fails_its_job_and_the_sweeps_of_its_model(tmp_path):
    """A worker process that dies (as under the out-of-memory killer) is a failed job named with its exit code,
    and the matrix ends instead of waiting for the job forever."""
    m = matrix(tmp_path)
    prepare_data(m, [8])
    model = Job(OURS, 8, 0, 1000.0, 100_000)  # far more steps than the kill leaves it time for
    sweep = Job(OURS, 8, 0, 1000.0, model.steps, sampler="ddpm", sampling_steps=3, model=model.name)
    log = m.job_dir(model.name) / "log.txt"

    def kill_the_worker_once_its_job_has_begun():
        while not log.is_file():
            time.sleep(0.05)
        for child in multiprocessing.active_children():
            if child.name == f"quality {model.name}":
                child.kill()

    threading.Thread(target=kill_the_worker_once_its_job_has_begun, daemon=True).start()
    summary = run_matrix(m, [model, sweep], workers=1, deadline=120)  # a missed kill fails the test, not hangs it
    assert (summary["failed"], summary["unfinished"], summary["out_of_time"]) == ([model.name, sweep.name], [], False)
    why = (m.job_dir(model.name) / FAILED).read_text()
    assert f"the worker process for {model.name} was ended by signal 9 (SIGKILL" in why and "log.txt" in why
    assert "the model this job samples failed" in (m.job_dir(sweep.name) / FAILED).read_text()


MATRIX_IN_A_PROCESS = """
import pickle, sys
from workflow.tools.quality_jobs import run_matrix
m, job = pickle.loads(open(sys.argv[1], "rb").read())
run_matrix(m, [job], workers=1, deadline=600)
"""


def running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie, ended and not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_ends_when_its_matrix_process_is_killed(tmp_path, how):
    """Killed, or ended by a SIGTERM (which runs no cleanup), the matrix process takes its workers with it: an
    orphan would train or sample on for hours and hold its sample set's lock, refusing the rerun."""
    m = matrix(tmp_path)
    prepare_data(m, [8])
    job = Job(OURS, 8, 0, 1000.0, 100_000)  # far more steps than the test leaves it time for
    (tmp_path / "matrix.pickle").write_bytes(pickle.dumps((m, job)))
    main = subprocess.Popen([sys.executable, "-c", MATRIX_IN_A_PROCESS, str(tmp_path / "matrix.pickle")], cwd=ROOT)
    log, deadline = m.job_dir(job.name) / "log.txt", time.monotonic() + 300  # hang guards, not timings
    while "train:" not in (log.read_text() if log.is_file() else ""):  # the worker is training
        assert main.poll() is None and time.monotonic() < deadline, "the worker never started training"
        time.sleep(0.1)
    children = Path(f"/proc/{main.pid}/task/{main.pid}/children").read_text().split()
    worker = next(int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text())
    os.kill(main.pid, how)
    assert main.wait(60) == -how
    while running(worker):
        assert time.monotonic() < deadline, f"the worker {worker} outlived its matrix process"
        time.sleep(0.1)
    assert log.read_text().rstrip().endswith("quality: the matrix process ended; this worker stops with it")
    assert not (m.job_dir(job.name) / GENERATED).exists()


def test_on_a_cpu_a_finished_job_is_scored_in_a_free_slot_while_another_worker_runs(tmp_path, monkeypatch):
    """With no job left to start, a worker's slot is free: the scorer takes it, with a worker's threads, instead
    of waiting for the last worker (on a CPU a long DDPM-1,000 set can keep one busy for hours)."""
    m = matrix(tmp_path)
    prepare_data(m, [8])
    quick, slow = Job(OURS, 8, 0, 0.1, 3), Job(OURS, 8, 1, 1000.0, 100_000)  # the slow one cannot end first
    scoring, real_score = [], quality_jobs.score

    def score_noting_the_threads(m, job):  # the real scoring, watched
        scoring.append((job.name, torch.get_num_threads()))
        return real_score(m, job)

    monkeypatch.setattr(quality_jobs, "score", score_noting_the_threads)
    seen = []

    def note_the_first_row_then_stop_the_slow_worker():
        while not read_results(m.out):
            time.sleep(0.05)
        workers = [c for c in multiprocessing.active_children() if c.name == f"quality {slow.name}"]
        seen.extend(w.is_alive() for w in workers)
        for worker in workers:
            worker.kill()

    threading.Thread(target=note_the_first_row_then_stop_the_slow_worker, daemon=True).start()
    summary = run_matrix(m, [quick, slow], workers=2, deadline=600)  # a missed kill fails the test, not hangs it
    assert [r["name"] for r in read_results(m.out)] == [quick.name]
    assert seen == [True]  # the slow job's worker was still running when the quick job's row was written
    assert scoring == [(quick.name, m.threads)] and m.threads == 1
    assert (summary["scored"], summary["failed"], summary["out_of_time"]) == (1, [slow.name], False)


def test_generate_only_then_score_only_splits_a_job_between_two_machines(tmp_path):
    """A lent GPU generates without the Inception file (--generate-only); --score-only scores its sets here,
    and without the file it stops (the sets kept) instead of waiting forever."""
    inception = tmp_path / "inception.pt"  # absent at first, as on the lent machine
    m = matrix(tmp_path, weights=str(inception))
    prepare_data(m, [8])
    generated, never = Job(OURS, 8, 0, 0.1, 3), Job(OURS, 8, 1, 0.1, 3)
    made = run_matrix(m, [generated], workers=1, deadline=None, score=False)  # what the lent machine does
    assert made == {**made, "scored": 0, "generated_unscored": [generated.name], "unfinished": [], "out_of_time": False}
    assert read_results(m.out) == [] and (m.job_dir(generated.name) / GENERATED).is_file()
    waiting = run_matrix(m, [generated], workers=1, deadline=None, generate=False)
    assert waiting == {**waiting, "scored": 0, "generated_unscored": [generated.name], "out_of_time": False}
    inception.symlink_to(packaged_weights())
    summary = run_matrix(m, [generated, never], workers=1, deadline=None, generate=False)
    assert summary == {**summary, "scored": 1, "failed": [], "unfinished": [never.name], "out_of_time": False}
    assert [r["name"] for r in read_results(m.out)] == [generated.name]
    assert not m.job_dir(never.name).exists()  # nothing trained or sampled for it


def test_a_rerun_with_another_reference_or_recipe_stops_instead_of_mixing_them(tmp_path):
    m = matrix(tmp_path)
    prepare_data(m, [8])
    job = Job(OURS, 8, 0, 0.1, 3)
    run_matrix(m, [job], workers=1, deadline=None)
    # --reference changed: the cached reference file (6 images) and the scored row are not this run's
    another = Job(OURS, 8, 1, 0.1, 3)
    with pytest.raises(SystemExit, match=r"fid_ref.npz holds 6 reference images, this run asks for 7"):
        run_matrix(dataclasses.replace(m, reference=7), [another], workers=1, deadline=None)
    assert not m.job_dir(another.name).exists()  # refused before anything trained
    (m.data_dir(8) / "fid_ref.npz").unlink()  # as the message offers
    with pytest.raises(SystemExit, match=rf"{job.name} \(scored: .* 6 samples vs 6 images, .*; now: .* vs 7 images, "):
        run_matrix(dataclasses.replace(m, reference=7), [job], workers=1, deadline=None)
    # the recipe changed under a scored job (a params.yaml default, say): its row, which recorded the settings it
    # trained with, is not skipped as done
    lr = dataclasses.replace(m, defaults=overlay(m.defaults, {"train": {"learning_rate": 0.5}}))
    settings = rf"recipe settings {recipe_key(m, OURS)}; now: .* recipe settings {recipe_key(lr, OURS)}\)"
    with pytest.raises(SystemExit, match=rf"{job.name} \(scored: .*{settings}"):
        run_matrix(lr, [job], workers=1, deadline=None)
    # ... and its job folder, were the row gone, is not resumed
    (tmp_path / "q" / "results.jsonl").unlink()
    with pytest.raises(SystemExit, match=rf"\['{job.name}'\] hold an earlier run's files, made with other params"):
        run_matrix(lr, [job], workers=1, deadline=None)


def test_spread_and_cells_are_mean_and_sample_standard_deviation():
    assert quality_tables.spread([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    mean, sd, n = quality_tables.spread([5.0, None, float("nan")])
    assert (mean, n) == (5.0, 1) and np.isnan(sd)
    assert quality_tables.cell([1.0, 2.0, 3.0]) == "2.0 ± 1.0"
    assert quality_tables.cell([10.0, 12.0]) == "11.0 ± 1.4 (n=2)"
    assert quality_tables.cell([]) == "-"
    # an sd that would round to 0 is shown to its first significant digit, the mean to match
    assert quality_tables.cell([19.1656, 19.2319]) == "19.20 ± 0.05 (n=2)"
    assert quality_tables.cell([0.01, 0.01], 4) == "0.0100 ± 0.0000 (n=2)"  # an sd of exactly 0 stays as it is
    assert quality_tables.cell([0.7] * 3) == "0.7 ± 0.0"  # equal values: their mean's float noise is no spread


def test_a_later_rates_file_is_put_on_the_first_files_scale_by_our_recipes_rate(tmp_path):
    first = {"steps_per_second": {OURS: {"16": 2.0, "32": 0.5}, "tutorial": {"16": 10.0}}}
    later = {"steps_per_second": {OURS: {"16": 2.5}, "tutorial": {"16": 99.0}, "lr-1e-3": {"16": 2.5}}}
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(later))
    rates = quality.read_rates([str(tmp_path / "a.json"), str(tmp_path / "b.json")])["steps_per_second"]
    assert rates == {**first["steps_per_second"], "lr-1e-3": {"16": 2.0}}  # the first file's measurements kept
    (tmp_path / "c.json").write_text(json.dumps({"steps_per_second": {"lr-1e-3": {"16": 2.5}}}))
    with pytest.raises(SystemExit, match="c.json: no recipe measured at 16 px both there and in the files before"):
        quality.read_rates([str(tmp_path / "a.json"), str(tmp_path / "c.json")])


def test_a_recipe_is_budgeted_with_the_rate_of_what_it_trains_with():
    """A rates file keys each rate by the recipe's settings: a recipe whose settings moved (params.yaml's
    when a default changes) takes the rate measured for its new settings, under whatever name, or none."""
    rates = {
        "steps_per_second": {OURS: {"8": 2.0}, "batch-32": {"8": 8.0}},
        "recipe_keys": {OURS: "a", "batch-32": "b"},
    }
    assert budget_steps(rates, OURS, 8, 1.0, key="a") == 120
    assert budget_steps(rates, OURS, 8, 1.0, key="b") == 480  # measured as batch-32
    with pytest.raises(SystemExit, match="no rate at 8 px for recipe 'ours' as it is now"):
        budget_steps(rates, OURS, 8, 1.0, key="c")
    assert budget_steps(RATES, OURS, 8, 2.0, key="c") == 60  # a file from before the keys: by name


def test_a_later_rates_file_is_scaled_by_a_recipe_of_the_same_settings_in_both(tmp_path):
    """Each rate is tied to what its recipe trained with (recipe_keys): a later file is put on the first's scale
    by a recipe measured with the same settings in both, under whatever names, and a later recipe whose name an
    earlier file holds with other settings (ours after a default changed) is kept apart as name@key."""

    def read(*files):
        for name, content in zip("abc", files, strict=False):
            (tmp_path / f"{name}.json").write_text(json.dumps(content))
        return quality.read_rates([str(tmp_path / f"{name}.json") for name in "abc"[: len(files)]])

    first = {
        "steps_per_second": {OURS: {"16": 2.0}, "batch-32": {"16": 4.0}},
        "recipe_keys": {OURS: "a", "batch-32": "b"},
    }
    # today's ours is batch-32's settings, measured beside a new recipe x on a machine twice as fast
    later = {"steps_per_second": {OURS: {"16": 8.0}, "x": {"16": 1.0}}, "recipe_keys": {OURS: "b", "x": "c"}}
    merged = read(first, later)
    assert merged["steps_per_second"]["x"] == {"16": 0.5}  # scaled by batch-32's 4.0 against 8.0
    assert merged["steps_per_second"]["batch-32"] == {"16": 4.0}  # the first file's measurement kept
    assert merged["recipe_keys"] == {OURS: "a", "batch-32": "b", "x": "c"}
    with pytest.raises(SystemExit, match="b.json: no recipe measured at 32 px both there and in the files before"):
        read(first, {**later, "steps_per_second": {**later["steps_per_second"], "x": {"16": 1.0, "32": 1.0}}})
    # a recipe name held with other settings, and no recipe in common: refused, never scaled by a stranger
    with pytest.raises(SystemExit, match="b.json: no recipe measured at 16 px both there"):
        read(first, {"steps_per_second": {OURS: {"16": 6.0}}, "recipe_keys": {OURS: "z"}})
    # ... with one in common: kept apart as name@key, where a budget finds it by its settings
    apart = read(
        first, {"steps_per_second": {OURS: {"16": 6.0}, "y": {"16": 3.0}}, "recipe_keys": {OURS: "z", "y": "b"}}
    )
    assert apart["steps_per_second"][OURS] == {"16": 2.0} and apart["steps_per_second"]["ours@z"] == {"16": 8.0}
    assert budget_steps(apart, OURS, 16, 1.0, key="z") == 480 and budget_steps(apart, OURS, 16, 1.0, key="a") == 120
    with pytest.raises(SystemExit, match="records its recipes' settings"):  # a file from before the keys
        read(first, {"steps_per_second": {OURS: {"16": 2.0}}})
    with pytest.raises(SystemExit, match=r"b.json: no recipe_keys entry for \['x'\]"):
        read(first, {**later, "recipe_keys": {OURS: "b"}})


def test_the_committed_rates_budget_todays_recipes_as_the_measured_jobs_were():
    """bench/quality's rate files against the recipes as they are now: our default (batch 32 since
    2026-11-27) takes the rate measured as the batch-32 variant; its jobs made 5,308 steps at 16 px and
    1,881 at 32 in 10 minutes, the batch-128 recipe (ours before) 1,696 at 16 px and 398 at 32."""
    files = [
        f"bench/quality/{name}.json" for name in ("rates", "rates-variants", "rates-variants-16", "rates-variants-32")
    ]
    tutorial, old = "configs/recipes/tutorial.yaml", "bench/quality/variants/batch-128.yaml"
    argv = ["matrix", "--rates", *files, "--out", "q", "--resolutions", "16", "32", "--budgets", "10", "--seeds", "0"]
    args = quality.build_parser().parse_args([*argv, "--recipes", tutorial, old, "--sampler-sweep", ""])
    m = Matrix("q", recipe_presets([str(ROOT / tutorial), str(ROOT / old)]), 1, None, 1, 1, None, None, defaults())
    rates = quality.read_rates([str(ROOT / f) for f in files])
    jobs = quality.matrix_jobs(args, rates, {r: recipe_key(m, r) for r in m.recipes})
    steps = {j.name: j.steps for j in jobs}
    assert steps["ours-r16-s0-b10"] == 5308 and steps["ours-r32-s0-b10"] == 1881
    assert steps["batch-128-r16-s0-b10"] == 1696 and steps["batch-128-r32-s0-b10"] == 398
    assert steps["tutorial-r32-s0-b10"] == 3079


DEFAULT_SAMPLER = {"sampler": "ddpm", "steps": 50, "eta": None}  # params.yaml's
EARLIER_DEFAULT = {"sampler": "ddim", "steps": 50, "eta": 1.0}  # what the rows made before it changed were sampled with
DDPM_1000 = {"sampler": "ddpm", "steps": 1000, "eta": None}


def _row(recipe, seed, budget, fid, sampled_with=None):
    base = {"recipe": recipe, "resolution": 16, "seed": seed, "budget": budget, "steps": 100, "sampler": None}
    return {
        **base,
        "name": f"{recipe}-{seed}-{budget}",
        "fid": fid,
        "kid": 0.01,
        "precision": 0.5,
        "recall": 0.5,
        "sampled_with": sampled_with or (DEFAULT_SAMPLER if recipe == OURS else DDPM_1000),
    }


def test_ratio_is_marked_separated_only_when_the_error_bars_do_not_overlap():
    ours = [_row(OURS, s, 2, f) for s, f in enumerate([10.0, 11.0, 12.0])]  # 11 +- 1
    far = [_row("tutorial", s, 2, f) for s, f in enumerate([20.0, 22.0, 24.0])]  # 22 +- 2
    near = [_row("tutorial", s, 2, f) for s, f in enumerate([11.0, 14.0, 17.0])]  # 14 +- 3
    assert quality_tables.ratio_cell(ours, far) == "0.50x (separated)"
    assert quality_tables.ratio_cell(ours, near) == "0.79x"
    assert quality_tables.ratio_cell(far, ours) == "2.00x (separated)"  # the mark is not only for a lead


def test_tables_from_results(tmp_path):
    rows = [_row(OURS, s, b, 10.0 + s + (5 - b)) for s in range(3) for b in (2, 5)]
    rows += [_row("tutorial", s, b, 30.0 + s) for s in range(3) for b in (2, 5)]
    # rows made before the default sampler changed, and a sweep job: each counts under its own sampler
    old = [{**_row(OURS, s, 5, 20.0 + s, EARLIER_DEFAULT), "name": f"old-{s}"} for s in range(2)]
    sweep = {**_row(OURS, 0, 5, 9.0, {"sampler": "ddim", "steps": 25, "eta": 1.0}), "name": "sweep", "sampler": "ddim"}
    again = {**_row(OURS, 0, 5, 99.0), "name": "sweep-of-the-default", "sampler": "ddpm"}  # counted once, as trained
    # one sampler tried on a shorter-trained model too: the sampler table stays on the sweep's 5-minute models
    short = {**_row(OURS, 1, 2, 7.0, {"sampler": "ddim", "steps": 25, "eta": 1.0}), "name": "short", "sampler": "ddim"}
    spaced = {"sampler": "ddim", "steps": 25, "eta": 1.0, "spacing": "trailing"}  # at the same cost as leading's
    trailing = {**_row(OURS, 0, 5, 8.0, spaced), "name": "sweep-trailing", "sampler": "ddim"}
    results = [short, *rows, *old, sweep, trailing, again]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    rates = {
        "steps_per_second": {OURS: {"16": 2.5}, "tutorial": {"16": 12.0}},
        "sampling_seconds_per_image": {"ddim-eta1": {"25": 0.02, "50": 0.04}, "ddpm-eta0": {"50": 0.04}},
    }
    text = quality_tables.markdown([str(tmp_path)], rates, str(tmp_path / "fig"))
    head = "| budget (min) | ours FID (ddpm-50) | ours FID (ddim-50 eta 1) | tutorial FID (ddpm-1000) |"
    assert head + " ours (ddpm-50) / tutorial |" in text
    assert "| 2 | 14.0 ± 1.0 | - | 31.0 ± 1.0 | 0.45x (separated) |" in text
    assert "| 5 | 11.0 ± 1.0 | 20.5 ± 0.7 (n=2) | 31.0 ± 1.0 | 0.35x (separated) |" in text
    assert "| ddim | 1 | 25 | 0 | 9.00 (n=1) | 0.0100 (n=1) | 0.500 (n=1) | 0.500 (n=1) | 20.0 | 180 |" in text
    assert (
        "| ddim, trailing | 1 | 25 | 0 | 8.00 (n=1) | 0.0100 (n=1) | 0.500 (n=1) | 0.500 (n=1) | 20.0 | 160 |" in text
    )
    assert "Our recipe's 5-minute models at 16 px" in text
    assert "| ddim | 1 | 50 | 0, 1 | 20.50 ± 0.71 (n=2) | 0.0100 ± 0.0000 (n=2) |" in text
    assert (
        "| ddpm (the default) |  | 50 | 0, 1, 2 | 11.00 ± 1.00 | 0.0100 ± 0.0000 | 0.500 ± 0.000 | 0.500 ± 0.000 "
        "| 40.0 | 440 |" in text
    )
    assert "ours 2.50, tutorial 12.00" in text
    for name in ("fid_vs_minutes_r16.png", "fid_vs_sampling_seconds.png"):
        assert (tmp_path / "fig" / name).read_bytes().startswith(b"\x89PNG")


def test_variants_are_tabled_against_ours_at_their_seeds_and_kept_out_of_the_budget_table(tmp_path):
    ours = [_row(OURS, s, 10, 10.0 + s) for s in (1, 2)]
    # seed 0's model trained under an older default: its default-sampler FID is a sweep job's row
    ours.append({**_row(OURS, 0, 10, 10.0), "name": "ours-sweep", "sampler": "ddpm"})
    runs = [("lr-4e-3", 0, 12.0), ("batch-64", 0, 9.0), ("batch-64", 1, 10.0)]
    variants = [_row(name, seed, 10, fid, DEFAULT_SAMPLER) for name, seed, fid in runs]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*ours, *variants]))
    text = quality_tables.markdown([str(tmp_path)], {"steps_per_second": {OURS: {"16": 2.5}}}, None)
    budget = text.split("### Recipe variants")[0]
    assert "| budget (min) | ours FID (ddpm-50) |" in budget and "lr-4e-3" not in budget and "batch-64" not in budget
    assert "| ours | 16 | 10 | 0, 1 | 100 | 10.50 ± 0.71 (n=2) |" in text  # seed 2: no variant tried it
    assert "| batch-64 | 16 | 10 | 0, 1 | 100 | 9.50 ± 0.71 (n=2) |" in text and "| 0.90x |" in text
    assert "| lr-4e-3 | 16 | 10 | 0 | 100 | 12.00 (n=1) |" in text and "| 1.20x |" in text


def test_a_default_measured_as_a_variant_is_tabled_and_drawn_as_todays_default(tmp_path):
    """After params.yaml's recipe moved, its rows are a variant's (kept apart from the old "ours" rows); the
    budget tables and figures show that variant first, as params.yaml, and take the ratio against it."""
    present = settings_key(defaults(), {})
    ours = [{**_row(OURS, s, 2, 40.0 + s), "recipe_key": "earlier"} for s in range(3)]
    moved = [{**_row("batch-32", s, 2, 25.0 + s, DEFAULT_SAMPLER), "recipe_key": present} for s in range(3)]
    tutorial = [_row("tutorial", s, 2, 100.0 + s) for s in range(3)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*ours, *moved, *tutorial]))
    text = quality_tables.markdown([str(tmp_path)], {"steps_per_second": {OURS: {"16": 2.5}}}, str(tmp_path / "f"))
    head = "| budget (min) | batch-32 (params.yaml) FID (ddpm-50) | ours (earlier params.yaml) FID (ddpm-50) |"
    assert head + " tutorial FID (ddpm-1000) | batch-32 (params.yaml) (ddpm-50) / tutorial |" in text
    assert "| 2 | 26.0 ± 1.0 | 41.0 ± 1.0 | 101.0 ± 1.0 | 0.26x (separated) |" in text
    assert "| batch-32 | 16 | 2 | 0, 1, 2 | 100 | 26.00 ± 1.00 |" in text and "| 0.63x |" in text  # still a variant
    assert (tmp_path / "f" / "fid_vs_minutes_r16.png").read_bytes().startswith(b"\x89PNG")
    rows = quality_tables.collect([str(tmp_path)])
    recipes = ["batch-32", OURS, "tutorial"]
    curves = quality_tables.budget_curves(rows, 16, recipes, "ddpm-50", {"batch-32": "batch-32 (params.yaml)"})
    assert [(c[0], list(c[2]), list(c[3])) for c in curves] == [
        ("batch-32 (params.yaml) (ddpm-50)", [26.0], [1.0]),
        ("ours (ddpm-50)", [41.0], [1.0]),
        ("tutorial (ddpm-1000)", [101.0], [1.0]),
    ]
    # once ours' own rows are params.yaml's, no variant stands in for it
    assert quality_tables.present_defaults([*ours, *moved], present) == ["batch-32"]
    assert quality_tables.present_defaults([{**ours[0], "recipe_key": present}, *moved], present) == []


def test_result_folders_merge_by_job_and_sampler(tmp_path):
    """A job name scored under the old default sampler in one folder and the new in another: both kept;
    the same job and sampler in a later folder replaces the earlier row."""
    folders = {
        "a": [_row(OURS, 0, 2, 20.0, EARLIER_DEFAULT)],
        "b": [_row(OURS, 0, 2, 12.0)],
        "c": [_row(OURS, 0, 2, 11.0)],
    }
    for folder, rows in folders.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fids = lambda *names: sorted(r["fid"] for r in quality_tables.collect([str(tmp_path / n) for n in names]))  # noqa: E731
    assert fids("a", "b") == [12.0, 20.0]
    assert fids("a", "b", "c") == [11.0, 20.0]
    with pytest.raises(SystemExit, match="typo has no results.jsonl"):  # not silently dropped
        fids("a", "typo")
    # seeds of one cell from folders of unlike setups (another step count) are refused, not averaged
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "results.jsonl").write_text(json.dumps({**_row(OURS, 1, 2, 13.0), "steps": 99}) + "\n")
    with pytest.raises(SystemExit, match=r"would average unlike runs .*\(99, None, None\)"):
        fids("b", "d")
    # a recipe with no rate at this resolution shows "-" on the rates line, not a KeyError
    rows = quality_tables.collect([str(tmp_path / "a"), str(tmp_path / "b")])
    rows.append(_row("tutorial", 0, 2, 30.0))
    table = quality_tables.budget_table(
        rows, 16, [OURS, "tutorial"], {"steps_per_second": {OURS: {"16": 2.5}}}, "ddpm-50"
    )
    assert "at 16 px: ours 2.50, tutorial -." in table


def test_rows_of_one_name_trained_with_other_settings_are_tabled_apart(tmp_path):
    """After a default changed, "ours" rows of the old and the new settings (recipe_key) are two recipes
    under one name: `quality tables` refuses to replace, average or line up one with the other."""
    folders = {
        "old": [_row(OURS, 0, 2, 20.0), _row(OURS, 0, 5, 15.0)],  # scored before rows recorded their settings
        "new": [{**_row(OURS, 0, 2, 12.0), "recipe_key": "b32"}],
        "other-budget": [{**_row(OURS, 1, 5, 11.0), "recipe_key": "b32"}],
        "again": [{**_row(OURS, 1, 5, 10.0), "recipe_key": "b32"}],
    }
    for folder, rows in folders.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    collect = lambda *names: quality_tables.collect([str(tmp_path / n) for n in names])  # noqa: E731
    with pytest.raises(
        SystemExit,
        match=r"new scored job ours-0-2 \(ddpm-50\) with other recorded recipe settings .*b32 against unrecorded",
    ):
        collect("old", "new")
    with pytest.raises(
        SystemExit,
        match=r"rows of one recipe name with other recorded recipe settings .*'ours': \['b32', 'unrecorded'\]",
    ):
        collect("old", "other-budget")
    assert sorted(r["fid"] for r in collect("new", "other-budget", "again")) == [10.0, 12.0]  # one settings: merged
    # the rates line gives the rate measured for the rows' settings, under whichever name it was measured
    rates = {
        "steps_per_second": {OURS: {"16": 2.5}, "batch-32": {"16": 8.0}},
        "recipe_keys": {OURS: "b128", "batch-32": "b32"},
    }
    table = quality_tables.budget_table(collect("new"), 16, [OURS], rates, "ddpm-50")
    assert "at 16 px: ours 8.00." in table
    assert "at 16 px: ours 2.50." in quality_tables.budget_table(collect("old"), 16, [OURS], rates, "ddpm-50")


def test_the_matrix_workers_share_the_cores_unless_threads_are_given(tmp_path):
    args = argparse.Namespace(recipes=[], sample_batch=6, threads=None, workers=2, reference=0)
    assert quality.matrix_of(args, str(tmp_path), 6).threads == max(1, torch.get_num_threads() // 2)
    assert quality.matrix_of(argparse.Namespace(**{**vars(args), "threads": 3}), str(tmp_path), 6).threads == 3
