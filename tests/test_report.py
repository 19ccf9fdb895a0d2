"""The report stage: a self-contained, deterministic HTML page built from synthetic artifacts."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.browser import browser, needs_chromium, render
from tests.helpers import ROOT
from workflow.core.config import ConfigError, Params, load_params
from workflow.formats import trainlog
from workflow.formats.png import PNG_SIGNATURE
from workflow.pages import curves
from workflow.pages.htmlpage import esc
from workflow.stages import report

FID = 37.4219
EVIL_NAME = "<script>alert(1)</script>.png"
PROGRESS_STEPS = (25, 50, 75, 100)
CPU_NAME = "Example CPU @ 2.00GHz"
SOFTWARE = {"python": "3.11.7", "torch": "2.14.1", "diffusers": "0.42.1", "accelerate": "1.15.0"}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _grid_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(38, 38), dtype=np.uint8)  # 2x2 of 16 px with padding
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _write_training_log(folder: Path) -> None:
    """100 steps of loss and lr, written as train writes them (through dvclive)."""
    steps = np.arange(1, 101)
    loss = 1.0 / np.sqrt(steps) + 0.01 * np.sin(steps)
    lr = 2e-3 * np.minimum(1.0, steps / 10)
    history = [[int(s), float(value), float(r)] for s, value, r in zip(steps, loss, lr, strict=True)]
    trainlog.start(folder, history, [[int(s), 250.5] for s in steps[9::10]]).end()


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A project folder holding every input of the report stage, at the default relative paths."""
    monkeypatch.chdir(tmp_path)
    paths = Params().paths
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "train": {"max_steps": 100}}))
    grid = tmp_path / paths.grid
    grid.parent.mkdir(parents=True)
    grid.write_bytes(_grid_png())
    log = tmp_path / paths.train_log
    _write_training_log(log)
    for step in PROGRESS_STEPS:
        (log / "grids").mkdir(exist_ok=True)
        (log / "grids" / f"step-{step:07d}.png").write_bytes(_grid_png(seed=step))
    _write_json(
        log / "summary.json",
        {
            "loss_final": 0.1,
            "images_per_second": 250.5,
            "seconds": 51.2,
            "steps": 100,
            "num_parameters": 1_234_567,
            "device": "cpu",
            "device_name": CPU_NAME,
            "software": SOFTWARE,
        },
    )
    _write_json(
        tmp_path / paths.metrics,
        {
            "fid": FID,
            "kid": 0.0123,
            "fid_num_samples": 250,
            "fid_num_reference": 240,
            "fid_weights_sha256": "7ff4a85c" + "0" * 56,
            "train_loss_final": 0.1,
            "train_images_per_second": 250.5,
            "train_seconds": 51.2,
            "sample_seconds": 4.5,
            "sample_images_per_second": 55.5,
            "evaluate_seconds": 75.25,
            "num_parameters": 1_234_567,
        },
    )
    source = {
        "kind": "hf",
        "repo_id": "someone/tiny-digits",
        "revision": "main",
        "sha": "a1b2c3d4e5",
        "packages": {"huggingface_hub": "2.4.0"},
        "files": [{"path": f"train/{i:05d}.png", "size": 1000 + i, "sha256": "0" * 64} for i in range(40)],
    }
    _write_json(tmp_path / paths.raw / "SOURCE.json", source)
    _write_json(
        tmp_path / paths.meta,
        {
            "count": 38,
            "resolution": 16,
            "channels": 1,
            "skipped": [
                {"file": EVIL_NAME, "reason": "cannot identify image file"},
                {"file": "train/00007.png", "reason": "truncated PNG data"},
            ],
            "source": {k: source[k] for k in ("kind", "repo_id", "revision", "sha")},
        },
    )
    return tmp_path


def _render(run_dir) -> str:
    report.run(load_params("params.yaml"))
    return (run_dir / Params().paths.report).read_text(encoding="utf-8")


def _data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_shows_every_artifact(run_dir):
    page = _render(run_dir)
    assert f"{FID:.2f}" in page
    assert "over 250 samples against 240 reference images" in page
    assert "someone/tiny-digits" in page and "a1b2c3d4e5" in page
    assert "40 file(s), 39.8 KiB in total" in page and "and 35 more" in page
    assert "truncated PNG data" in page and "cannot identify image file" in page
    for key in ("learning_rate", "block_out_channels", "num_inference_steps", "weights_sha256"):
        assert f"<th>{key}</th>" in page
    assert "1,234,567" in page


def test_images_are_embedded(run_dir):
    page = _render(run_dir)
    grid, *progress, plot = _data_uris(page)
    assert grid == (run_dir / Params().paths.grid).read_bytes()
    assert progress == [_grid_png(seed=step) for step in PROGRESS_STEPS]  # oldest first
    assert "image-rendering: pixelated" in page and 'width="456"' in page  # 38 px x 12 <= 480 px
    assert plot == (run_dir / Params().paths.loss_plot).read_bytes()  # the figure Snakemake's report shows
    image = Image.open(io.BytesIO(plot))
    image.load()
    assert image.format == "PNG" and image.size == (1150, 440)


def test_the_captions_name_the_weights_sampled(run_dir):
    """EMA weights by default; a run trained without EMA (the tutorial's recipe) is not described as one."""
    page = _render(run_dir)
    assert "Final samples (EMA weights)" in page and "Samples from the EMA weights at each checkpoint" in page
    (run_dir / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "train": {"max_steps": 100, "ema": False}}))
    page = _render(run_dir)
    assert "Final samples (weights without EMA)" in page and "Samples from the weights without EMA at each" in page
    assert "EMA weights" not in page


def test_progress_strip_labels_steps_and_thins_long_runs(run_dir):
    page = _render(run_dir)
    assert all(f"<figcaption>step {step}</figcaption>" in page for step in PROGRESS_STEPS)
    grids = run_dir / "reports/train/grids"
    for step in range(200, 3001, 100):
        (grids / f"step-{step:07d}.png").write_bytes(_grid_png(seed=step))
    (grids / "notes.txt").write_text("not a grid")
    page = _render(run_dir)
    shown = [int(s.replace(",", "")) for s in re.findall(r"<figcaption>step ([\d,]+)</figcaption>", page)]
    assert len(shown) == report.MAX_PROGRESS_SHOWN and shown[0] == 25 and shown[-1] == 3000
    assert shown == sorted(shown) and f"{report.MAX_PROGRESS_SHOWN} of 33 checkpoints" in page


def test_only_the_progress_grids_shown_are_read(run_dir):
    """A long run's grids are chosen before any is read: here the ones not shown are not PNGs, which reading
    refuses, and the page is still made, from the shown ones."""
    grids = run_dir / "reports/train/grids"
    steps = [*PROGRESS_STEPS, *range(200, 3001, 100)]
    shown = [step for step, _ in report.shown_progress([(step, None) for step in steps])]
    assert len(shown) == report.MAX_PROGRESS_SHOWN < len(steps)
    for step in steps:
        (grids / f"step-{step:07d}.png").write_bytes(_grid_png(seed=step) if step in shown else b"not read")
    progress, total = report.load_progress_grids(run_dir / "reports/train")
    assert [step for step, _ in progress] == shown and total == 33
    page = _render(run_dir)
    assert _data_uris(page)[1:-1] == [_grid_png(seed=step) for step in shown]
    assert f"{report.MAX_PROGRESS_SHOWN} of 33 checkpoints" in page


def test_stage_timings_software_and_device(run_dir):
    page = _render(run_dir)
    timings = page[page.index("Time per stage") : page.index("Software and device")]
    assert timings.index(">train<") < timings.index(">sample<") < timings.index(">evaluate<")
    assert "51.2 s" in timings and "4.5 s" in timings and "1 min 15 s" in timings
    assert "250.5 images/s" in timings and "55.5 images/s" in timings and "2 min 11 s" in timings  # total
    environment = page[page.index("Software and device") : page.index("Dataset provenance")]
    assert CPU_NAME in environment
    assert all(f"<th>{name}</th><td><code>{version}</code>" in environment for name, version in SOFTWARE.items())


def test_page_is_self_contained_and_escaped(run_dir):
    page = _render(run_dir)
    assert "<script" not in page
    assert html_escaped(EVIL_NAME) in page
    assert not re.search(r"(?:src|href)=\"(?!data:)", page)
    assert "http://" not in page and "https://" not in page
    assert str(run_dir) not in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def test_two_runs_give_identical_bytes(run_dir):
    """Once here and once in a fresh process through the CLI: no timestamps, no version strings."""
    path = run_dir / Params().paths.report
    _render(run_dir)
    first = path.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-m", "workflow", "report", "--params", "params.yaml"],
        check=True,
        env=env,
        capture_output=True,
    )
    assert path.read_bytes() == first


@pytest.mark.parametrize(
    "name, stage, section",
    [
        (Params().paths.metrics, "evaluate", 'class="hero"'),
        (Params().paths.grid, "sample", 'class="hero"'),
        (Params().paths.meta, "preprocess", "Dataset provenance"),
        ("data/raw/SOURCE.json", "download", "Dataset provenance"),
        ("reports/train/plots/metrics/train/loss.tsv", "train", "Training curves"),
        ("reports/train/plots/metrics/train/lr.tsv", "train", "Training curves"),
        ("reports/train/summary.json", "train", "Software and device"),
    ],
)
def test_a_missing_input_is_shown_as_missing(run_dir, name, stage, section):
    (run_dir / name).unlink()
    page = _render(run_dir)
    box = f"<strong>missing:</strong> {name} <span>(written by the `{stage}` stage"
    assert box in page
    assert section in page[: page.index(box)].rsplit("<section", 1)[1]  # in the section that shows it


def test_a_run_with_nothing_but_params_still_gets_a_page(run_dir):
    """A partial run (here: none at all) gets every section, each saying what is missing."""
    for name in ("data", "reports"):
        shutil.rmtree(run_dir / name)
    page = _render(run_dir)
    assert page.count("<strong>missing:</strong>") >= 7 and "<th>learning_rate</th>" in page
    assert "reports/train/grids/step-*.png" in page
    image = Image.open(run_dir / Params().paths.loss_plot)
    assert image.size == (1150, 440)


def test_outputs_a_recorded_run_made_but_this_workspace_lacks_say_dvc_pull(run_dir):
    """A clone of a repository whose dvc.lock is committed has none of the cached outputs: the page
    still renders, and says which ones `python -m workflow pull` fetches (the metrics, in git, are shown)."""
    dvc = [sys.executable, "-m", "dvc"]
    (run_dir / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "made": {"cmd": "python -m workflow train", "outs": [Params().paths.grid, Params().paths.train_log]}
                }
            }
        )
    )
    for args in (["init", "--no-scm", "-q"], ["commit", "-f", "-q"]):  # dvc.lock records the outputs there
        subprocess.run([*dvc, *args], cwd=run_dir, check=True, capture_output=True)
    shutil.rmtree(run_dir / Params().paths.train_log)
    (run_dir / Params().paths.grid).unlink()
    (run_dir / Params().paths.meta).unlink()  # not recorded: the stage that writes it is named
    page = _render(run_dir)
    for name in (
        Params().paths.grid,
        "reports/train/plots/metrics/train/loss.tsv",
        "reports/train/summary.json",
        "reports/train/grids/step-*.png",
    ):
        assert f"<strong>missing:</strong> {name} <span>({esc(report.FETCH)})" in page, name
    assert f"<strong>missing:</strong> {Params().paths.meta} <span>(written by the `preprocess` stage" in page
    assert f"{FID:.2f}" in page


def test_a_dvc_project_outside_git_still_gets_its_page(run_dir):
    """An unpacked archive: .dvc/ without git and without core.no_scm, where DVC refuses to open the
    project (SCMError). The page renders, as with no DVC project at all."""
    shutil.copytree(ROOT / ".dvc", run_dir / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    assert report.absent_outputs() == []
    assert f"{FID:.2f}" in _render(run_dir)


def test_progress_grids_absent_is_missing(run_dir):
    shutil.rmtree(run_dir / "reports/train/grids")
    page = _render(run_dir)
    assert "<strong>missing:</strong> reports/train/grids/step-*.png" in page
    assert len(_data_uris(page)) == 2  # the final grid and the loss figure


def test_older_summary_without_software_says_so(run_dir):
    path = run_dir / "reports/train/summary.json"
    summary = json.loads(path.read_text())
    del summary["software"], summary["device_name"]
    path.write_text(json.dumps(summary))
    page = _render(run_dir)
    assert "<th>software</th><td>not recorded by this run" in page


def test_bad_history_header_is_a_user_error(run_dir):
    (run_dir / "reports/train/plots/metrics/train/lr.tsv").write_text("step\tloss\n1\t0.5\n")
    with pytest.raises(ConfigError, match=r"reports/train/plots/metrics/train/lr\.tsv: header lacks column step or lr"):
        report.run(load_params("params.yaml"))
    assert not (run_dir / Params().paths.report).exists()


def test_the_curves_are_the_ones_dvclive_logged(run_dir):
    """The report reads the files dvclive wrote: the loss/lr figure is drawn from exactly those values."""
    log = run_dir / Params().paths.train_log
    texts = [(log / trainlog.tsv(metric)).read_text() for metric in (trainlog.LOSS, trainlog.LR)]
    history = trainlog.parse_history(*texts, str(log))
    assert history["step"].tolist() == list(range(1, 101)) and history["lr"][9] == pytest.approx(2e-3)
    _render(run_dir)
    assert (run_dir / Params().paths.loss_plot).read_bytes() == curves.loss_plot_png(history)


def test_a_damaged_artifact_is_a_user_error_naming_it(run_dir):
    (run_dir / Params().paths.metrics).write_text("{not json")
    with pytest.raises(ConfigError, match=r"metrics\.json: not valid JSON.*`evaluate`"):
        report.run(load_params("params.yaml"))


def test_moving_average():
    assert np.allclose(curves.moving_average(np.array([1.0, 2, 3, 4, 5]), 2), [1.5, 2.5, 3.5, 4.5])
    assert np.allclose(curves.moving_average(np.array([2.0, 4]), 10), [3.0])


def test_loss_plots_survive_nan_and_empty_history():
    empty = {k: np.array([]) for k in ("step", "loss", "lr")}
    diverged = {"step": np.arange(5.0), "loss": np.array([1.0, np.nan, 0.5, np.inf, 0.2]), "lr": np.full(5, np.nan)}
    for history in (empty, diverged):
        assert curves.loss_plot_png(history).startswith(PNG_SIGNATURE)
    assert curves.overlay_plot_png([("a", "#1f77b4", empty), ("b", "#ff7f0e", diverged)]).startswith(PNG_SIGNATURE)


@needs_chromium
@pytest.mark.parametrize("size", [(1366, 768), (1440, 900)])
def test_page_in_chromium_decodes_every_image(run_dir, size):
    """As a person sees it on a laptop: every image decodes, no console errors, and the first screen
    shows the final grid and the FID."""
    from selenium.webdriver.common.by import By

    _render(run_dir)
    with browser() as driver:
        shot = render(driver, run_dir / Params().paths.report, run_dir / f"report-{size[0]}", size)
        fid = driver.find_element(By.CLASS_NAME, "fid-value")
        assert fid.text == f"{FID:.2f}" and fid.rect["y"] + fid.rect["height"] <= size[1]
    assert shot.console_errors == []
    alts = [image["alt"] for image in shot.images]
    assert alts == [
        "grid of generated samples",
        *(f"samples at step {s}" for s in PROGRESS_STEPS),
        "training loss and learning rate",
    ]
    assert all(shot.decoded(image) for image in shot.images), shot.images
    grid = shot.images[0]
    assert grid["y"] + grid["height"] <= size[1] and grid["width"] >= 400  # large, and on the first screen
    assert shot.first_screen.size == size


def test_grids_of_large_samples_are_embedded_downscaled_and_say_so(run_dir):
    """A grid of 512 px samples (here 1,200 px wide) is not embedded whole: the hero and each progress
    figure carry a copy at twice their display width, and the caption names the full-size file."""
    rng = np.random.default_rng(7)

    def big_png(seed):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    grids = {Params().paths.grid: big_png(0)}
    grids |= {f"reports/train/grids/step-{step:07d}.png": big_png(step) for step in PROGRESS_STEPS}
    for path, png in grids.items():
        (run_dir / path).write_bytes(png)
    page = _render(run_dir)
    hero, *progress, _plot = _data_uris(page)
    assert Image.open(io.BytesIO(hero)).size == (2 * report.GRID_DISPLAY_PX, 720)
    assert [Image.open(io.BytesIO(png)).size for png in progress] == [(600, 450)] * len(PROGRESS_STEPS)
    assert f'width="{report.GRID_DISPLAY_PX}" height="360"' in page
    assert "1200&times;900 px, shown at 0.4&times; (full size: <code>reports/samples/grid.png</code>)" in page
    assert len(page) < sum(map(len, grids.values()))  # smaller than the grids it shows, though base64
    assert _render(run_dir) == page  # the same bytes every time


def test_a_grid_is_shrunk_on_the_page_and_embedded_whole_unless_twice_too_wide_or_undecodable():
    from workflow.pages.htmlpage import pixel_image

    def png_of(width: int) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(np.full((10, width), 128, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    for width, embedded, shown in [(100, 100, 100), (150, 150, 100), (200, 200, 100), (201, 200, 100)]:
        tag, scale = pixel_image(png_of(width), 100, "grid")
        (uri,) = _data_uris(tag)
        assert Image.open(io.BytesIO(uri)).size[0] == embedded and f'width="{shown}"' in tag, width
        assert scale == min(1, 100 / width)
    damaged = png_of(400)[:60]  # the header says 400 px wide, the pixel data is cut off
    tag, scale = pixel_image(damaged, 100, "grid")
    assert _data_uris(tag) == [damaged] and scale == 0.25  # shown as it is, not a crash


def test_params_keep_every_digit_and_long_or_row_level_skips_stay_readable(run_dir):
    """0.9999999 is not shown as 1.0; a folder's thousands of ignored files are summarised (not listed in
    full); rows skipped inside one parquet file are told apart by their row."""
    (run_dir / "params.yaml").write_text(
        yaml.safe_dump({"seed": 3, "train": {"max_steps": 100, "ema_max_decay": 0.9999999}})
    )
    source_path = run_dir / Params().paths.raw / "SOURCE.json"
    source = json.loads(source_path.read_text())
    source["ignored"] = [
        {"file": f"captions/{i:05d}.txt", "reason": "not an image file name: .txt"} for i in range(5000)
    ]
    _write_json(source_path, source)
    meta_path = run_dir / Params().paths.meta
    meta = json.loads(meta_path.read_text())
    meta["skipped"] = [{"file": "train-0.parquet", "row": r, "reason": "cannot identify image file"} for r in (3, 9)]
    _write_json(meta_path, meta)
    page = _render(run_dir)
    assert "<code>0.9999999</code>" in page
    assert "5,000 input file(s) ignored" in page and "captions/04999.txt" not in page
    assert "<code>train-0.parquet</code> row 3</td>" in page and "<code>train-0.parquet</code> row 9</td>" in page


def test_a_sweep_the_params_ask_for_but_absent_is_shown_missing(run_dir):
    (run_dir / "params.yaml").write_text(
        yaml.safe_dump({"seed": 3, "train": {"max_steps": 100}, "fid": {"steps_sweep": [10, 25]}})
    )
    page = _render(run_dir)
    assert f"<strong>missing:</strong> {Params().paths.fid_steps} <span>(written by the `fid_sweep` stage" in page
    sweeps = page.split("<h2>FID sweeps</h2>", 1)[1].split("</section>", 1)[0]
    assert Params().paths.fid_guidance not in sweeps  # not asked for: not missing


def test_a_progress_grid_past_ten_million_steps_is_found(tmp_path):
    grids = tmp_path / trainlog.GRIDS_DIR
    grids.mkdir()
    for step in (9_999_999, 10_000_000):
        trainlog.progress_grid(grids, step).write_bytes(_grid_png())
    assert [step for step, _ in trainlog.progress_grids(tmp_path)] == [9_999_999, 10_000_000]


def test_an_experiment_name_is_legend_text_not_matplotlib_markup():
    history = {"step": np.arange(5.0), "loss": np.linspace(1, 0.2, 5), "lr": np.full(5, 1e-3)}
    runs = [("x${$y", "#1f77b4", history), ("_hidden?", "#ff7f0e", history)]  # legal git ref names
    assert curves.overlay_plot_png(runs).startswith(PNG_SIGNATURE)
    assert curves.legend_text("_hidden?") != "_hidden?" and curves.legend_text("a$b") == r"a\$b"


def test_the_fid_sweeps_time_is_a_stage_of_its_own_and_in_the_total(run_dir):
    from workflow.formats.fid_sweeps import write_sweep

    rows = [
        {"num_inference_steps": n, "fid": 30.0 - n / 10, "kid": 0.01, "seconds": sec}
        for n, sec in ((10, 10.0), (25, 20.0))
    ]
    write_sweep(run_dir / Params().paths.fid_steps, "num_inference_steps", rows)
    page = _render(run_dir)
    timings = page[page.index("Time per stage") : page.index("Software and device")]
    assert timings.index(">evaluate<") < timings.index(">fid_sweep<")
    assert "30.0 s" in timings and "2 min 41 s" in timings  # 51.2 + 4.5 + 75.25 + 30
    assert "FID against the sampling steps (2 points; lowest FID at 25)" in page


def test_a_fine_tuning_run_names_the_commit_of_its_pretrained_pipeline(run_dir):
    """params.yaml names a branch (or nothing); the page names the commit download_model pinned."""
    base = Path(Params().paths.base_model)
    data = {"source": "hf:someone/captioned", "caption_column": "text", "channels": 3}
    config = {"seed": 3, "data": data, "model": {"pretrained": "hf:someone/tiny-sd"}, "sample": {"prompts": ["a"]}}
    (run_dir / "params.yaml").write_text(yaml.safe_dump(config))
    page = _render(run_dir)
    box = f"<strong>missing:</strong> {base / 'BASE.json'} <span>(written by the `download_model` stage"
    assert box in page and "Pretrained pipeline" in page[: page.index(box)].rsplit("<section", 1)[1]
    files = [{"path": f"unet/part-{i}.safetensors", "size": 2**20, "sha256": "1" * 64} for i in range(7)]
    record = {"kind": "hf", "repo_id": "someone/tiny-sd", "revision": "main", "sha": "f00dcafe" * 5}
    _write_json(run_dir / base / "BASE.json", {**record, "endpoint": "http://127.0.0.1:9", "files": files})
    section = _render(run_dir).split("<h2>Pretrained pipeline</h2>")[1].split("</section>")[0]
    assert f"<th>sha</th><td><code>{'f00dcafe' * 5}</code>" in section
    assert "<th>repo_id</th><td><code>someone/tiny-sd</code>" in section and "7 file(s), 7.0 MiB in total" in section


def test_a_run_from_scratch_has_no_pretrained_section(run_dir):
    assert "Pretrained pipeline" not in _render(run_dir)
