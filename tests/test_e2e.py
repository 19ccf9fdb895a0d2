"""End to end: the real `dvc repro`, `dvc exp run`, and `snakemake` on a tiny configuration, each in
a temporary git repository holding a copy of the project. Checks the artifacts' contents and that
independent runs give bitwise-identical weights, samples and quality metrics on CPU."""

import base64
import csv
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.browser import CHROMEDRIVER, CHROMIUM, browser, render
from tests.helpers import PACKAGED_WEIGHTS, QUALITY, ROOT, check_card, make_repo, merged, repo_env, run, sh
from workflow.core.config import params_from_dict
from workflow.maths.diffusion import sample_classes

pytestmark = pytest.mark.e2e


def test_a_test_repository_has_the_projects_files_and_no_run(tmp_path):
    """A checkout after `make run` (its dvc.lock names outputs only its own cache holds; some users
    commit it) and with untracked scratch files: the test repository gets the tracked files as the
    working tree has them, and no run record, so no test depends on the checkout's state."""
    source, repo = tmp_path / "checkout", tmp_path / "repo"
    source.mkdir()
    repo.mkdir()
    shutil.copy2(ROOT / "params.yaml", source / "params.yaml")
    (source / "dvc.yaml").write_text("stages: {}\n")
    (source / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "with a run"],
    ):
        subprocess.run(cmd, cwd=source, check=True)
    (source / "dvc.yaml").write_text("stages: {}\n# edited, not committed\n")
    (source / "scratch.py").write_text("print('mine')\n")
    (source / "reports").mkdir()
    (source / "reports/metrics.json").write_text("{}\n")
    make_repo(repo, source)
    assert subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split() == [
        "dvc.yaml",
        "params.yaml",
    ]
    assert (repo / "dvc.yaml").read_text() == (source / "dvc.yaml").read_text()
    assert not (repo / "dvc.lock").exists() and not (repo / "scratch.py").exists()


# A sweep on top of the baseline, queued and run by two workers (`dvc queue start -j 2`); each `-S` list
# is complete. WORKFLOW_SLOTS=2 gives the CPU two device slots (workflow/core/slots.py), as a box with
# two GPUs has, so the queue's logs show each experiment's slot.
EXPERIMENTS = {  # two: one per worker, at the same time, each in its own device slot
    "lr-1e-3": ["train.learning_rate=0.001"],
    "steps-8": ["train.learning_rate=0.002", "train.max_steps=8"],
}


@pytest.fixture(scope="module")
def exp_runs(dvc_repo, tmp_path_factory):
    """The sweep, queued and run with two workers; then the baseline applied again, so the workspace is as it was."""
    repo, _ = dvc_repo
    for name, changes in EXPERIMENTS.items():
        sh(repo, "dvc", "exp", "run", "--queue", "-n", name, *(arg for change in changes for arg in ("-S", change)))
    slots = {"WORKFLOW_SLOTS": "2", "WORKFLOW_SLOT_DIR": str(tmp_path_factory.mktemp("slots"))}
    # the workers outlive `dvc queue start`: no pipe of theirs may keep this call waiting
    started = subprocess.run(
        ["dvc", "queue", "start", "-j", "2"],
        cwd=repo,
        env=repo_env(**slots),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    assert started.returncode == 0
    wait_for_queue(repo)
    sh(repo, "dvc", "exp", "apply", "baseline")
    return repo


def wait_for_queue(repo: Path, timeout: float = 900) -> None:
    """Until `dvc queue status` lists nothing queued or running; a failed experiment fails with its log."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(repo, "dvc", "queue", "status")
        failed = re.findall(r"^\S+\s+(\S+)\s+.*\bFailed\b", status, flags=re.M)
        assert not failed, "\n".join(sh(repo, "dvc", "queue", "logs", name)[-3000:] for name in failed)
        if not re.search(r"\b(Queued|Running)\b", status):
            return
        assert time.monotonic() < deadline, f"the queue did not finish:\n{status}"
        time.sleep(2)


def test_dvc_repro_artifacts(dvc_repo):
    repo, _ = dvc_repo
    source = json.loads((repo / "data/raw/SOURCE.json").read_text())
    assert source["kind"] == "builtin" and len(list((repo / "data/raw/images").glob("*.png"))) == 5000
    images = np.load(repo / "data/processed/images.npy")
    assert images.shape == (64, 1, 8, 8) and images.dtype == np.uint8 and images.std() > 10
    assert json.loads((repo / "data/processed/meta.json").read_text())["count"] == 64
    ref = np.load(repo / "data/processed/fid_ref.npz")
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
    history = (repo / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()  # dvclive's
    assert history[0] == "step\tloss" and [row.split("\t")[0] for row in history[1:]] == [str(s) for s in range(1, 17)]
    grids = sorted(p.name for p in (repo / "reports/train/grids").iterdir())
    assert grids == ["step-0000008.png", "step-0000016.png"]  # one per checkpoint
    assert (repo / "reports/fid_steps.csv").read_text() == "num_inference_steps,fid,kid,seconds\n"  # off by default
    samples = sorted((repo / "data/samples").glob("*.png"))
    assert len(samples) == 8 and Image.open(samples[0]).size == (8, 8)
    assert Image.open(repo / "reports/samples/grid.png").size == (2 + 2 * 10, 2 + 2 * 10)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and metrics["fid_num_samples"] == 8
    assert metrics["train_steps"] == 16 and metrics["train_images_per_second"] > 0
    assert metrics["evaluate_seconds"] > 0
    html = (repo / "reports/index.html").read_text()
    assert "data:image/png;base64," in html and f"{metrics['fid']:.2f}" in html
    summary = json.loads((repo / "reports/train/summary.json").read_text())
    assert summary["device"] == "cpu" and summary["device_name"] in html
    assert f"<th>diffusers</th><td><code>{summary['software']['diffusers']}</code>" in html
    from diffusers import DiffusionPipeline

    assert DiffusionPipeline.from_pretrained(str(repo / "models/pipeline")).unet.config.sample_size == 8
    assert "up to date" in sh(repo, "dvc", "status") or sh(repo, "dvc", "status").strip() == ""


def test_dvc_run_publishes_the_model_card(dvc_repo):
    """models/pipeline, as `hf upload` takes it: the card is this run's own and its snippet runs (issue 18)."""
    from workflow.core.config import load_params

    repo, _ = dvc_repo
    check_card(repo, load_params(repo / "params.yaml"))


def test_editing_a_param_reruns_only_what_it_affects(dvc_repo):
    repo, _ = dvc_repo
    original = (repo / "params.yaml").read_text()
    try:
        params = yaml.safe_load(original)
        params["sample"]["num_inference_steps"] = 5
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # dvc status lists the stages whose own deps changed; evaluate follows once sample's outputs do
        stale = set(json.loads(sh(repo, "dvc", "status", "--json")))
        # the model card shows the sampling params; fid_sweep's guidance sweep samples in that many steps
        assert stale == {"sample", "fid_sweep", "report", "package"}
        params["sample"]["num_inference_steps"] = 4
        params["sample"]["sampler"] = "dpmsolver++"
        params["fid"]["num_samples"] = 4
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        # the reference statistics are cached: sampling and FID-size params never re-run fid_reference
        assert set(json.loads(sh(repo, "dvc", "status", "--json"))) == {"sample", "fid_sweep", "report", "package"}
        params["sample"]["sampler"] = "ddim"
        params["fid"]["num_samples"] = 8
        params["train"]["learning_rate"] = 1e-3
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        assert set(json.loads(sh(repo, "dvc", "status", "--json"))) == {"train", "report", "package"}
    finally:
        (repo / "params.yaml").write_text(original)


# A preset that trains 8 steps where params.yaml says 16, class-conditional on the MNIST labels, samples
# digits 1 and 7 guided with w = 2, and measures FID at w = 1 and 2.
CLASSES_8 = {
    "train": {"max_steps": 8},
    "model": {"class_conditional": True},
    "sample": {"guidance_scale": 2.0, "classes": [1, 7]},
    "fid": {"guidance_sweep": [1, 2]},
}


@pytest.fixture(scope="module")
def smk_preset(tmp_path_factory):
    """(repo, its params.yaml, the metrics of the run) after `snakemake --cores 2 --configfile
    configs/classes-8.yaml`."""
    repo = make_repo(tmp_path_factory.mktemp("smk"))
    (repo / "configs/classes-8.yaml").write_text(yaml.safe_dump(CLASSES_8))
    params = (repo / "params.yaml").read_text()
    sh(repo, "snakemake", "--cores", "2", "--configfile", "configs/classes-8.yaml")
    return repo, params, json.loads((repo / "reports/metrics.json").read_text())


def test_a_class_conditional_run_under_snakemake(smk_preset, tmp_path):
    """Labels from the embedded MNIST, a class embedding, a guided sample set in the training shares, the labelled grid,
    FID against w in the report, the published pipeline with its own pipeline.py, and Snakemake's report."""
    repo, _, metrics = smk_preset
    labelled = json.loads((repo / "data/processed/labels.json").read_text())
    classes, counts = labelled["classes"], np.bincount(labelled["labels"], minlength=10)
    assert classes == [str(d) for d in range(10)]
    samples = json.loads((repo / "data/samples/samples.json").read_text())
    # the grid's two rounds of 1 and 7, then the two digits in their training shares
    assert samples["labels"] == sample_classes([1, 7], counts[[1, 7]], 8, 2).tolist()
    assert samples["labels"][:4] == [1, 7, 1, 7] and sorted(set(samples["labels"])) == [1, 7]
    assert samples["guidance_scale"] == 2.0 and samples["class_names"] == classes
    rows = (repo / "reports/fid_guidance.csv").read_text().splitlines()
    assert rows[0] == "guidance_scale,fid,kid,seconds" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert float(rows[2].split(",")[1]) == pytest.approx(metrics["fid"], rel=1e-5)  # w = 2 is the evaluated set
    assert "FID against the classifier-free guidance scale" in (repo / "reports/index.html").read_text()
    assert (repo / "models/pipeline/pipeline.py").read_bytes() == (
        ROOT / "workflow/models/class_pipeline.py"
    ).read_bytes()
    params = params_from_dict(merged(yaml.safe_load((repo / "params.yaml").read_text()), **CLASSES_8))
    check_card(repo, params)  # its usage lines load pipeline.py and sample digit 1, guided
    check_snakemake_report(  # last: without Chromium it skips, and must skip none of the checks above
        repo,
        tmp_path,
        ("--configfile", "configs/classes-8.yaml"),
        ("Class-conditional", "guided with w = 2.0", "from the EMA weights by"),
    )


def planned(done: subprocess.CompletedProcess) -> set:
    """The jobs a `snakemake -n` would run."""
    return set(re.findall(r"^(?:local)?rule (\w+):", done.stdout + done.stderr, re.M))


def test_snakemake_configfile_and_config_decide_what_every_job_runs(smk_preset):
    repo, params, _ = smk_preset
    assert (repo / "params.yaml").read_text() == params  # Snakemake merges the preset, never writes a file
    assert json.loads((repo / "reports/metrics.json").read_text())["train_steps"] == 8
    assert len((repo / "reports/train/plots/metrics/train/loss.tsv").read_text().splitlines()) == 1 + 8
    # --config merges over the preset; a sampling param re-runs sampling and what reads its samples
    change = ("--configfile", "configs/classes-8.yaml", "--config", "sample={num_inference_steps: 5}")
    assert planned(run(repo, "snakemake", "-n", *change)) == {
        "sample",
        "evaluate",
        "fid_sweep",  # its guidance sweep samples in sample.num_inference_steps
        "report",
        "package",
        "all",
    }  # the card shows sample.*
    # that the jobs then run on the merged values: tests/test_slurm.py (--config sets what each job asks for)


def test_a_failed_snakemake_job_shows_its_error_and_keeps_it_in_its_log(smk_preset):
    """Its failed preprocess leaves the DAG to re-run from there: the last test of the preset's repository."""
    repo, _, _ = smk_preset
    done = run(
        repo,
        "snakemake",
        "--cores",
        "2",
        "--configfile",
        "configs/classes-8.yaml",
        "--config",
        "data={min_images: 100}",
    )
    error = "error in stage preprocess: `data.min_images` is 100 but only 64 usable images"
    assert done.returncode != 0 and error in done.stderr  # the user sees it as the job fails
    assert error in (repo / "logs/preprocess.log").read_text()  # and it is kept (on a cluster: read it later)
    assert "logs/preprocess.log" in done.stderr
    assert "train:" in (repo / "logs/train.log").read_text()  # every job keeps its stderr, the progress too


def make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`make ARGS` as in a fresh clone, this venv standing in for the one `make setup` would create."""
    return run(repo, "make", "-o", ".venv/.installed", *args)


def test_make_run_config_records_the_preset_as_an_experiment_and_keeps_params_yaml(dvc_repo, smk_preset):
    """`make run CONFIG=configs/<preset>.yaml`: checked first, run as a DVC experiment (`dvc exp run --temp
    -S ...`) with the user's uncommitted params.yaml (edits included), which it leaves as it was, as it leaves
    the workspace's results. The class-conditional preset gives the FID and KID Snakemake's run of it gave,
    to the bit, without re-running download, preprocess or fid_reference."""
    repo, first = dvc_repo
    _, _, smk_metrics = smk_preset
    original = (repo / "params.yaml").read_text()
    edited = original.replace("grid_size: 2", "grid_size: 1")  # the grid only: the scores stay Snakemake's
    assert edited != original
    applied = False
    (repo / "configs/classes-8.yaml").write_text(yaml.safe_dump(CLASSES_8))
    (repo / "configs/typo.yaml").write_text("train:\n  max_step: 8\n")
    try:
        (repo / "params.yaml").write_text(edited)
        before = experiments(repo)
        typo = make(repo, "run", "CONFIG=configs/typo.yaml")
        assert typo.returncode != 0 and "configs/typo.yaml: unknown key `train.max_step`" in typo.stderr
        assert "Reproducing experiment" not in typo.stdout + typo.stderr and experiments(repo) == before
        done = make(repo, "run", "CONFIG=configs/classes-8.yaml")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        assert "Running stage 'train'" in done.stdout and "Running stage 'preprocess'" not in done.stdout
        assert (repo / "params.yaml").read_text() == edited
        after = experiments(repo)
        (name,) = set(after) - set(before)
        params = after[name]["params"]["params.yaml"]["data"]
        assert params["train"]["max_steps"] == 8 and params["model"]["class_conditional"] is True
        assert params["sample"]["grid_size"] == 1  # the user's edit ran with the preset
        metrics = after[name]["metrics"]["reports/metrics.json"]["data"]
        assert {k: metrics[k] for k in QUALITY} == {k: smk_metrics[k] for k in QUALITY}
        assert json.loads((repo / "reports/metrics.json").read_text())["train_steps"] == 16  # the workspace's
        assert (repo / PACKAGED_WEIGHTS).read_bytes() == first["weights"]
        # applied, its model samples anew without training again: its checkpoints are no DVC output to miss
        applied = True
        sh(repo, "dvc", "exp", "apply", name)
        resampled = sh(repo, "dvc", "exp", "run", "sample", "-n", "resampled", "-S", "sample.grid_size=2")
        assert "Running stage 'sample'" in resampled and "Running stage 'train'" not in resampled
    finally:
        if applied:
            sh(repo, "dvc", "exp", "apply", "baseline")  # the workspace as the other tests expect it
            # run up to sample only, it has no scores: the comparison test expects every experiment scored
            subprocess.run(["dvc", "exp", "remove", "resampled"], cwd=repo, env=repo_env(), capture_output=True)
        (repo / "params.yaml").write_text(original)
        for preset in ("classes-8.yaml", "typo.yaml"):
            (repo / "configs" / preset).unlink()


def experiments(repo: Path) -> dict:
    """{experiment name: its data} from `dvc exp show --json`."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json"))
    runs = [exp for row in shown for exp in (row.get("experiments") or [])]
    return {rev["name"]: rev["data"] for run in runs for rev in run["revs"]}


def test_the_issues_sampler_experiment(dvc_repo):
    """`dvc exp run -S sample.sampler=dpmsolver++ -S sample.num_inference_steps=25`, verbatim: FID and KID in
    `dvc exp show`; neither training nor the cached reference statistics run again."""
    repo, _ = dvc_repo
    original = (repo / "params.yaml").read_text()
    try:
        out = sh(
            repo,
            "dvc",
            "exp",
            "run",
            "-S",
            "sample.sampler=dpmsolver++",
            "-S",
            "sample.num_inference_steps=25",
            "-n",
            "dpmsolver-25",
        )
        assert "Running stage 'sample'" in out and "Running stage 'evaluate'" in out
        assert "Running stage 'fid_reference'" not in out and "Running stage 'train'" not in out
        data = experiments(repo)["dpmsolver-25"]
        assert data["params"]["params.yaml"]["data"]["sample"]["sampler"] == "dpmsolver++"
        metrics = data["metrics"]["reports/metrics.json"]["data"]
        assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["kid"]) and metrics["fid_num_samples"] == 8
        samples = json.loads((repo / "data/samples/samples.json").read_text())  # the experiment's, applied
        assert samples["sampler"] == "dpmsolver++" and samples["num_inference_steps"] == 25
    finally:  # exp run leaves its params and outputs in the workspace: the baseline's, as the other tests expect
        # (unchecked: a failure here must not hide the one above)
        subprocess.run(["dvc", "exp", "apply", "baseline"], cwd=repo, env=repo_env(), capture_output=True)
        (repo / "params.yaml").write_text(original)


def test_a_queued_sweep_runs_on_two_workers_each_training_in_a_device_slot(exp_runs):
    repo = exp_runs
    status = sh(repo, "dvc", "queue", "status")
    for name in EXPERIMENTS:
        assert re.search(rf"\b{re.escape(name)}\b.*\bSuccess\b", status), status
        assert re.search(r"train: device slot [01] \(of 0, 1\)", sh(repo, "dvc", "queue", "logs", name)), name
    shown = sh(repo, "dvc", "exp", "show", "--sort-by", "fid", "--sort-order", "asc", "--csv")
    rows = list(csv.DictReader(io.StringIO(shown)))
    fids = [float(r["fid"]) for r in rows if r["Experiment"] in EXPERIMENTS]
    assert len(fids) == len(EXPERIMENTS) and fids == sorted(fids)


def test_dvc_exp_run_and_show(exp_runs):
    repo = exp_runs
    names = experiments(repo)
    data = names["lr-1e-3"]
    assert data["params"]["params.yaml"]["data"]["train"]["learning_rate"] == 0.001
    metrics = data["metrics"]["reports/metrics.json"]["data"]
    assert np.isfinite(metrics["fid"]) and "train_images_per_second" in metrics
    assert names["steps-8"]["metrics"]["reports/metrics.json"]["data"]["train_steps"] == 8
    params = yaml.safe_load((repo / "params.yaml").read_text())  # the baseline is back in the workspace
    assert params["train"]["max_steps"] == 16 and params["train"]["learning_rate"] == 0.002
    assert (
        json.loads((repo / "reports/metrics.json").read_text())
        == names["baseline"]["metrics"]["reports/metrics.json"]["data"]
    )
    for name, steps in (("baseline", 16), ("steps-8", 8)):  # dvclive's summary of the training log
        live = names[name]["metrics"]["reports/train/metrics.json"]["data"]
        assert live["step"] == steps and set(live["train"]) == {"loss", "lr", "images_per_second"}


def test_dvc_plots_diff_draws_each_experiments_training_log(exp_runs):
    """`dvc plots diff <exp> <exp>`: loss and lr per step and images/s per log interval of each, from
    the files dvclive wrote, the very values the comparison page draws."""
    from workflow.tools import compare

    repo = exp_runs
    shown = json.loads(sh(repo, "dvc", "plots", "diff", "baseline", "steps-8", "--json"))
    assert not shown.get("errors"), shown["errors"]
    titles = ("Training loss", "Learning rate", "Training throughput")  # (FID against steps is empty: off)
    values = {title: plot["content"]["data"]["values"] for title in titles for plot in shown["data"][title]}
    for rev, steps in (("baseline", 16), ("steps-8", 8)):
        for title, every in (("Training loss", 1), ("Learning rate", 1), ("Training throughput", 4)):
            rows = [row for row in values[title] if row["rev"] == rev]
            assert [int(row["step"]) for row in rows] == list(range(every, steps + 1, every)), (rev, title)
    runs = compare.select(compare.exp_show_rows(compare.exp_show(repo)), ["baseline"])
    drawn = compare.load_experiment(repo, runs[0]).history
    assert drawn["loss"].tolist() == [float(row["loss"]) for row in values["Training loss"] if row["rev"] == "baseline"]


def test_compare_shows_the_run_and_the_sweep(exp_runs, tmp_path):
    """`make run` + the queued sweep of two experiments: the comparison page has all three, each with its
    own grid, the loss curves in one plot, the best FID marked (among runs scored against the same images:
    another test's class-conditional experiment samples classes 1 and 7 only), and it opens cleanly in
    Chromium."""
    repo = exp_runs
    sh(repo, "python", "-m", "workflow", "compare")
    page = (repo / "reports/experiments.html").read_text()
    assert {"baseline", *EXPERIMENTS} <= set(table_rows(page))  # other tests may add experiments
    assert page.count("<tr class=best>") <= 1 and "Not available" not in page
    for key in ("train.learning_rate", "train.max_steps"):  # the params that differ
        assert f'<button type="button">{key.replace(".", ".<wbr>")}</button>' in page
    grids = {name: experiment_grid(repo, name) for name in ("baseline", *EXPERIMENTS)}
    for name, grid in grids.items():  # each thumbnail is that experiment's own grid, from the DVC cache
        assert f'src="data:image/png;base64,{base64.b64encode(grid).decode()}"' in page, name
    assert grids["steps-8"] != grids["baseline"]
    names = ["baseline", *EXPERIMENTS]
    sh(repo, "python", "-m", "workflow", "compare", *names, "--output", str(tmp_path / "three.html"))
    assert sorted(table_rows((tmp_path / "three.html").read_text())) == sorted(names)
    assert (tmp_path / "three.html").read_text().count("<tr class=best>") == 1  # scored alike: one is best
    sweeps = (tmp_path / "three.html").read_text().split("FID against each swept parameter", 1)[1]
    assert "FID against <code>train.learning_rate</code>" in sweeps and "best: <strong>" in sweeps
    check_in_chromium(tmp_path / "three.html", tmp_path / "experiments", images=6)  # 3 grids, 2 sweeps, curves
    progress = list((repo / "reports/train/grids").glob("step-*.png"))
    check_in_chromium(repo / "reports/index.html", tmp_path / "report", images=2 + len(progress))


def check_snakemake_report(repo: Path, tmp_path: Path, args: tuple = (), captions: tuple = ()) -> None:
    """`snakemake --report` (as the README says it; `args`: the run's own --configfile) embeds our results
    and loads nothing from the network; its captions say what this run is (`captions`: words they hold)."""
    sh(repo, "snakemake", "--report", "reports/snakemake.html", *args)
    page = (repo / "reports/snakemake.html").read_text()
    for words in captions:
        assert words in page, words
    progress = sorted(p.name for p in (repo / "reports/train/grids").glob("step-*.png"))
    for name in ("grid.png", "loss.png", "metrics.json", "index.html", *progress):
        assert name in page, name
    assert progress and "Progress grids" in page
    assert not re.search(r"<(?:script|link|img)[^>]+(?:src|href)=[\"']?(?:https?:)?//", page)
    check_in_chromium(repo / "reports/snakemake.html", tmp_path / "snakemake", images=None)


def table_rows(page: str) -> list:
    return re.findall(r'<tr(?: class=best)?><td data-sort="([^"]+)">', page)


def experiment_grid(repo: Path, name: str) -> bytes:
    """The grid an experiment left, from its git ref (refs/exps/.../<name>) and the DVC cache."""
    from dvc.api import DVCFileSystem

    refs = sh(repo, "git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
    (rev,) = [line.split()[0] for line in refs if line.endswith(f"/{name}")]
    return DVCFileSystem(str(repo), rev=rev).read_bytes("reports/samples/grid.png")


def check_in_chromium(page: Path, out: Path, images: int | None) -> None:
    """No console errors; `images` images, each decoded (None: Snakemake's page, whose images are its own)."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (`make test` installs them)")
    with browser() as driver:
        shot = render(driver, page, out)
    assert shot.console_errors == [], shot.console_errors
    if images is not None:
        assert len(shot.images) == images and all(shot.decoded(image) for image in shot.images), shot.images
