"""The experiment comparison's own logic: which rows it shows, which params differ, the best FID,
and the page (opened in Chromium, sorted by a click). The real `dvc exp show` and DVC cache are
exercised end to end in tests/test_e2e.py."""

import dataclasses
import io
import math
import re

import numpy as np
import pytest
from PIL import Image

from tests.browser import browser, needs_chromium, render
from workflow.core.config import ConfigError
from workflow.tools import compare


def _params(lr=0.002, steps=16, metrics="reports/metrics.json"):
    return {
        "seed": 0,
        "paths": {"metrics": metrics},
        "model": {"block_out_channels": [16, 32]},
        "train": {"learning_rate": lr, "max_steps": steps},
    }


def _data(params, metrics):
    return {
        "params": {"params.yaml": {"data": params}},
        "metrics": {params["paths"]["metrics"]: {"data": metrics}} if metrics is not None else {},
    }


def _rev(name, sha, params, metrics):
    return {"rev": sha, "name": name, "data": _data(params, metrics)}


# The shape of `dvc exp show --json` (dvc 3): the workspace, then the baseline commit with its experiments.
SHOWN = [
    {"rev": "workspace", "name": None, "data": _data(_params(steps=8), {"fid": 90.0})},
    {
        "rev": "a" * 40,
        "name": "main",
        "data": _data(_params(), None),
        "experiments": [
            {"revs": [_rev("steps-8", "b" * 40, _params(steps=8), {"fid": 90.0})]},
            {"revs": [_rev("lr-1e-3", "c" * 40, _params(lr=0.001), {"fid": 70.5, "kid": 0.1})]},
        ],
    },
]


def test_exp_show_rows_follow_dvcs_order():
    rows = compare.exp_show_rows(SHOWN)
    assert [(r["name"], r["kind"]) for r in rows] == [
        ("workspace", "workspace"),
        ("main", "commit"),
        ("steps-8", "experiment"),
        ("lr-1e-3", "experiment"),
    ]
    assert compare.row_metrics(rows[3]) == {"fid": 70.5, "kid": 0.1}


def test_default_selection_skips_a_commit_without_results_and_a_workspace_seen_already():
    names = [r["name"] for r in compare.select(compare.exp_show_rows(SHOWN), [])]
    assert names == ["steps-8", "lr-1e-3"]
    shown = [dict(SHOWN[0], data=_data(_params(steps=4), {"fid": 120.0})), SHOWN[1]]
    assert [r["name"] for r in compare.select(compare.exp_show_rows(shown), [])][0] == "workspace"


def test_edited_params_not_yet_run_are_not_credited_with_a_recorded_runs_results():
    """params.yaml edited after `dvc exp apply lr-1e-3`: the workspace's metrics.json is still that run's."""
    edited = dict(SHOWN[0], data=_data(_params(lr=0.05), {"fid": 70.5, "kid": 0.1}))
    assert [r["name"] for r in compare.select(compare.exp_show_rows([edited, SHOWN[1]]), [])] == ["steps-8", "lr-1e-3"]


def test_default_selection_shows_a_repeated_run_once():
    again = _rev("rerun", "d" * 40, _params(steps=8), {"fid": 90.0})  # `make run` twice: same params, same results
    shown = [SHOWN[0], dict(SHOWN[1], experiments=[*SHOWN[1]["experiments"], {"revs": [again]}])]
    assert [r["name"] for r in compare.select(compare.exp_show_rows(shown), [])] == ["steps-8", "lr-1e-3"]
    assert [r["name"] for r in compare.select(compare.exp_show_rows(shown), ["rerun"])] == ["rerun"]


def test_queued_running_and_failed_experiments_are_never_shown_with_the_baselines_results():
    """dvc lists them with their params and the baseline commit's outputs: showing them would credit an
    experiment that never ran with the baseline's FID."""
    baseline = _data(_params(), {"fid": 80.0})
    unfinished = [
        {"revs": [_rev("queued-lr", "e" * 40, _params(lr=0.01), {"fid": 80.0})], "executor": {"state": "queued"}},
        {"revs": [_rev("running-lr", "f" * 40, _params(lr=0.02), {"fid": 80.0})], "executor": {"state": "running"}},
        {"revs": [dict(_rev("failed-lr", "9" * 40, _params(lr=0.03), None), error={"msg": "train failed"})]},
    ]
    shown = [SHOWN[0], dict(SHOWN[1], data=baseline, experiments=[*SHOWN[1]["experiments"], *unfinished])]
    rows = compare.exp_show_rows(shown)
    assert [(r["name"], r["state"]) for r in rows if r["kind"] == "unfinished"] == [
        ("queued-lr", "queued"),
        ("running-lr", "running"),
        ("failed-lr", "failed"),
    ]
    assert [r["name"] for r in compare.select(rows, [])] == ["main", "steps-8", "lr-1e-3"]
    with pytest.raises(ConfigError, match="experiment 'queued-lr' is queued: it has no results of its own"):
        compare.select(rows, ["queued-lr"])
    # run in the workspace (`dvc exp run`): the workspace row has that run's params and an earlier run's FID
    here = {"revs": [_rev("here-lr", "workspace", _params(lr=0.04), {"fid": 80.0})], "executor": {"state": "running"}}
    shown = [SHOWN[0], dict(SHOWN[1], data=baseline, experiments=[*SHOWN[1]["experiments"], here])]
    rows = compare.exp_show_rows(shown)
    assert "workspace" not in [r["name"] for r in compare.select(rows, [])]
    with pytest.raises(ConfigError, match="the workspace: an experiment is running there"):
        compare.select(rows, ["workspace"])


def test_named_selection_by_name_or_rev_prefix():
    rows = compare.exp_show_rows(SHOWN)
    assert [r["name"] for r in compare.select(rows, ["cccc", "steps-8"])] == ["lr-1e-3", "steps-8"]
    with pytest.raises(ConfigError, match=r"no experiment 'nope'.*there are: workspace, main, steps-8, lr-1e-3"):
        compare.select(rows, ["nope"])


def test_a_rev_prefix_two_experiments_share_is_refused_and_a_name_wins_over_a_prefix():
    twin = {"revs": [_rev("cccc", "c" * 39 + "d", _params(), None)]}  # its rev shares lr-1e-3's first 39
    rows = compare.exp_show_rows([dict(SHOWN[1], experiments=[*SHOWN[1]["experiments"], twin])])
    both = r"lr-1e-3 \(cccccccccccc\), cccc \(cccccccccccc\)"
    with pytest.raises(ConfigError, match=rf"'ccccc' starts more than one experiment's rev: {both}"):
        compare.select(rows, ["ccccc"])
    assert [r["name"] for r in compare.select(rows, ["cccc"])] == ["cccc"]


def _grid(seed: int, size: int = 22) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_damaged_grid_is_a_problem_of_its_experiment_not_of_the_page():
    whole = _grid(1)
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(jpeg, format="JPEG")
    problems = []
    assert compare._decodable_png(whole, "g.png", problems) == whole and problems == []
    for damaged in (whole[: len(whole) // 2], jpeg.getvalue(), b"not an image"):
        assert compare._decodable_png(damaged, "g.png", problems) is None
    assert len(problems) == 3 and all(p.startswith("g.png: not a readable PNG (") for p in problems)
    assert "a JPEG file, not a PNG" in problems[1]


def _history(scale: float, steps: int = 40) -> dict:
    step = np.arange(1.0, steps + 1)
    return {"step": step, "loss": scale / np.sqrt(step), "lr": 1e-3 * np.minimum(1.0, step / 5)}


def _experiment(name, fid, lr=0.002, steps=16, grid=True, history=True):
    metrics = (
        {}
        if fid is None
        else {"fid": fid, "kid": fid / 1000, "train_loss_final": 0.05, "train_images_per_second": 500.0}
    )
    return compare.Experiment(
        name,
        name[0] * 40,
        _params(lr, steps),
        metrics,
        _grid(len(name)) if grid else None,
        _history(fid or 1.0) if history else None,
        () if grid else ("reports/samples/grid.png: not in the cache",),
    )


EXPERIMENTS = [
    _experiment("baseline", 51.5),
    _experiment("lr-1e-3", 48.25, lr=0.001),
    _experiment("steps-8", 80.0, steps=8),
    _experiment("failed", None, grid=False, history=False),
]


def test_differing_params_and_ranking():
    assert compare.differing_params(EXPERIMENTS) == ["train.learning_rate", "train.max_steps"]
    assert compare.differing_params(EXPERIMENTS[:1]) == []
    assert [e.name for e in compare.ranked(EXPERIMENTS)] == ["lr-1e-3", "baseline", "steps-8", "failed"]
    assert math.isinf(EXPERIMENTS[3].fid)


def test_page_marks_the_best_fid_and_shows_every_experiment():
    page = compare.render_comparison(EXPERIMENTS)
    rows = re.findall(r"<tr( class=best)?><td data-sort=\"([^\"]+)\">", page)
    assert rows == [(" class=best", "lr-1e-3"), ("", "baseline"), ("", "steps-8"), ("", "failed")]
    assert '48.25 <span class="badge">best</span>' in page and "best FID 48.25: lr-1e-3" in page
    assert page.count('<figure class="thumb') == 4 and page.count("<strong>missing:</strong> sample grid") == 1
    assert '<button type="button">train.<wbr>learning_rate</button>' in page  # may wrap after the dot
    assert '<button type="button">seed</button>' not in page  # the same everywhere
    assert "failed</strong>: reports/samples/grid.png: not in the cache" in page
    assert not re.search(r"(?:src|href)=\"(?!data:)", page) and "http" not in page


def test_no_best_is_marked_among_fids_scored_differently():
    """FID is biased upwards at small sample counts: a run scored on more samples is not better for it."""
    more = dataclasses.replace(EXPERIMENTS[1], metrics={**EXPERIMENTS[1].metrics, "fid_num_samples": 1000})
    page = compare.render_comparison([EXPERIMENTS[0], more, EXPERIMENTS[2]])
    assert 'class="badge">best' not in page and "class=best" not in page
    assert "best FID n/a (scored with different sample or reference counts" in page
    # the same counts against other images (another resolution): not comparable either
    other = dataclasses.replace(EXPERIMENTS[1], params={**EXPERIMENTS[1].params, "data": {"resolution": 32}})
    page = compare.render_comparison([EXPERIMENTS[0], other, EXPERIMENTS[2]])
    assert 'class="badge">best' not in page and "reference images (data.*, sample.classes)" in page
    assert "<strong>scored differently</strong> (see the title): not comparable" in page  # its sweep plot says so


def test_page_plots_fid_against_each_swept_param_and_names_the_best():
    page = compare.render_comparison(EXPERIMENTS)
    sweeps = page.split("FID against each swept parameter", 1)[1].split("<h2", 1)[0]
    assert sweeps.count("<figure>") == 2 and sweeps.count('src="data:image/png;base64,') == 2
    assert "best: <strong>lr-1e-3</strong> (train.learning_rate = 0.001, FID 48.25)" in sweeps
    assert "best: <strong>lr-1e-3</strong> (train.max_steps = 16, FID 48.25)" in sweeps
    # a param that is not a number (or one experiment with a FID) gives no plot
    assert "swept parameter" not in compare.render_comparison(EXPERIMENTS[:1] + EXPERIMENTS[3:])


@needs_chromium
def test_page_in_chromium_decodes_every_image_and_sorts(tmp_path):
    from selenium.webdriver.common.by import By

    path = tmp_path / "experiments.html"
    path.write_text(compare.render_comparison(EXPERIMENTS), encoding="utf-8")
    with browser() as driver:
        shot = render(driver, path, tmp_path / "compare-synthetic")
        assert shot.console_errors == []
        assert len(shot.images) == 6  # two sweep plots, three grids and the curves; the failed run has no grid
        assert all(shot.decoded(image) for image in shot.images), shot.images
        header = driver.find_element(By.XPATH, "//th/button[text()='FID']")
        header.click()
        header.click()  # descending: the run without a FID stays last
        order = [row.text.split("\n")[0].split()[0] for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert order == ["steps-8", "baseline", "lr-1e-3", "failed"]
        assert driver.get_log("browser") == []


# ---------------------------------------------------------------- a clone whose DVC cache is empty

# A stand-in for the pipeline (the real one is exercised in tests/test_e2e.py): one DVC stage that
# writes, from params.yaml's seed, the files compare reads.
STAND_IN = """
import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

seed = yaml.safe_load(open("params.yaml"))["seed"]
Path("reports/samples").mkdir(parents=True, exist_ok=True)
Image.fromarray(np.random.default_rng(seed).integers(0, 256, (22, 22), dtype=np.uint8)).save("reports/samples/grid.png")
log = Path("reports/train/plots/metrics/train")  # dvclive's layout, as train writes it
log.mkdir(parents=True, exist_ok=True)
(log / "loss.tsv").write_text("step\\tloss\\n" + "".join(f"{s}\\t{1 / s}\\n" for s in range(1, 9)))
(log / "lr.tsv").write_text("step\\tlr\\n" + "".join(f"{s}\\t0.001\\n" for s in range(1, 9)))
Path("reports/metrics.json").write_text(json.dumps({"fid": 50.0 + seed, "train_loss_final": 0.125}))
"""
STAGE = {
    "cmd": "python stand_in.py",
    "deps": ["stand_in.py"],
    "params": ["seed"],
    "outs": ["reports/samples/grid.png", "reports/train"],
    "metrics": [{"reports/metrics.json": {"cache": False}}],
}


def _run(cwd, *cmd):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def test_a_clone_with_an_empty_cache_compares_and_says_what_to_fetch(tmp_path, monkeypatch):
    """`git clone` of a project whose dvc.lock and metrics are committed, plus an experiment pulled
    without its data (`dvc exp pull --no-cache`): no output is in the clone's DVC cache. The page
    renders the metrics (they live in git), marks each grid and history missing, and names the
    command that fetches it (issue 18, item 10: this crashed with DataIndexDirError)."""
    import yaml

    origin, clone = tmp_path / "origin", tmp_path / "clone"
    origin.mkdir()
    (origin / "stand_in.py").write_text(STAND_IN)
    (origin / "params.yaml").write_text("seed: 0\n")
    (origin / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"run": STAGE}}))
    git = ("git", "-c", "user.name=t", "-c", "user.email=t@t")
    for cmd in (
        [*git, "init", "-q", "-b", "main"],
        ["dvc", "init", "-q"],
        ["dvc", "repro", "-q"],
        [*git, "add", "-A"],
        [*git, "commit", "-qm", "a row, its dvc.lock and metrics"],
        ["dvc", "exp", "run", "-q", "-n", "seed-1", "-S", "seed=1"],
    ):
        _run(origin, *cmd)
    _run(tmp_path, "git", "clone", "-q", str(origin), str(clone))
    _run(clone, "dvc", "exp", "pull", "--no-cache", "origin", "seed-1")
    monkeypatch.chdir(clone)
    compare.main([])
    page = (clone / compare.DEFAULT_OUTPUT).read_text()
    rows = re.findall(r"<tr(?: class=best)?><td data-sort=\"([^\"]+)\">", page)
    assert rows == ["main", "seed-1"] and "50.00" in page and "51.00" in page
    assert page.count("<strong>missing:</strong> sample grid <span>(not in the local DVC cache") == 2
    assert "<strong>missing:</strong> loss histories" in page
    for name, fetch in (("main", "python -m workflow pull"), ("seed-1", "dvc exp pull origin seed-1")):
        for path in ("reports/samples/grid.png", "reports/train/plots/metrics/train/loss.tsv"):
            assert (
                f"<li><strong>{name}</strong>: {path}: not in the local DVC cache; fetch it with `{fetch}`</li>"
            ) in page, (name, path)
