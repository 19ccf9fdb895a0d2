"""The recipe-quality matrix (docs/QUALITY.md): recipes x resolutions x seeds x training budgets, each
trained, sampled and scored by the pipeline's own stages, and a sampler sweep over one trained model.

A budget is minutes of training on the CPU whose rates `quality rates` measured: a recipe trains
budget x 60 x its steps per second there, so the runs can be made elsewhere (a GPU, several at once)
and still mean "what this recipe reaches in that many minutes on that CPU". Training and sampling run
in float32 without TF32, as on a CPU.

Layout under the output folder:
    data/raw, data/r<res>/        the embedded data, preprocessed once per resolution, and its FID reference
    jobs/<job>/params.yaml        each job's full params (python -m workflow <stage> --params reproduces it)
    jobs/<job>/generated.json     written last by the generating worker (failed.txt instead, with the error,
                                  or by the main process with the exit code, if the worker died)
    results.jsonl                 one row per scored job, appended as each is scored
Workers (processes) train and sample; the main process scores as sample sets appear, once the Inception
file exists (on a GPU lease it may arrive after training has started); on a CPU, only when a worker's
slot is free (no job left to start), with a worker's share of the cores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from workflow.core.artifacts import write_json
from workflow.core.config import DEFAULT_PARAMS, load_preset, overlay, params_from_dict, read_params_file
from workflow.core.runtime import default_device, feature_workers
from workflow.formats.reference_stats import check_weights, load_reference
from workflow.formats.sample_set import load_samples
from workflow.maths import fid
from workflow.models.inception import load_extractor
from workflow.stages import download, evaluate, fid_reference, preprocess, sample, train

OURS = "ours"  # the recipe of params.yaml itself
RECIPES = ["configs/recipes/tutorial.yaml", "configs/recipes/train-unconditional.yaml"]  # the reference recipes
GENERATED, FAILED, RESULTS = "generated.json", "failed.txt", "results.jsonl"
DEFAULT_RUN_SAMPLES = 250  # what the default run's FID uses (fid.num_samples and fid.num_reference)


@dataclass(frozen=True)
class Job:
    recipe: str  # OURS or a recipe preset's stem (configs/recipes/<stem>.yaml)
    resolution: int
    seed: int
    budget: float  # minutes of training on the rates' CPU
    steps: int
    sampler: str | None = None  # a sampler-sweep job: sample the model of `model` this way
    sampling_steps: int | None = None
    eta: float = 0.0
    spacing: str | None = None  # sample.timestep_spacing
    model: str | None = None

    @property
    def name(self) -> str:
        base = f"{self.recipe}-r{self.resolution}-s{self.seed}-b{self.budget:g}"
        if self.sampler is None:
            return base
        spacing = "" if self.spacing is None else f"-{self.spacing}"  # the names of earlier sweeps stay
        return f"{base}-{self.sampler}-eta{self.eta:g}-n{self.sampling_steps}{spacing}"


@dataclass(frozen=True)
class Matrix:
    out: str
    recipes: dict  # name -> preset dict (OURS -> {})
    samples: int
    reference: int | None
    sample_batch: int
    threads: int
    weights: str | None  # None: the packaged Inception file
    weights_sha256: str | None
    defaults: dict

    def data_dir(self, resolution: int) -> Path:
        return Path(self.out) / "data" / f"r{resolution}"

    def job_dir(self, name: str) -> Path:
        return Path(self.out) / "jobs" / name


def recipe_presets(paths: list[str]) -> dict:
    """{OURS: {}} plus each preset by its stem; each checked over the defaults."""
    recipes = {OURS: {}}
    for path in paths:
        recipes[Path(path).stem] = load_preset(path)
    return recipes


def recipe_key(m: Matrix, recipe: str) -> str:
    """What a recipe trains with (its model, noise schedule and training settings over the defaults, the
    step count aside), hashed: a rates file records it beside each rate, so a recipe whose settings have
    changed since (params.yaml's `ours` when a default moves) is never budgeted with another's rate."""
    return settings_key(m.defaults, m.recipes[recipe])


def settings_key(base: dict, preset: dict) -> str:
    """recipe_key of `preset` over the params `base`."""
    raw = overlay(base, preset)
    trains = {k: v for k, v in raw["train"].items() if k not in ("max_steps", "epochs")}
    part = {"model": raw["model"], "scheduler": raw["scheduler"], "train": trains}
    return hashlib.sha256(json.dumps(part, sort_keys=True).encode()).hexdigest()[:16]


def measured_rate(rates: dict, recipe: str, resolution: int, key: str | None = None) -> float | None:
    """The recipe's optimiser steps per second at `resolution` on the rates' CPU, or None. With the recipe's
    `key`, the rate measured for those settings, under whichever name it was measured."""
    measured, keys, res = rates["steps_per_second"], rates.get("recipe_keys", {}), str(resolution)
    if key is None or not keys:
        return measured.get(recipe, {}).get(res)
    names = [recipe, *(n for n in keys if n != recipe)]
    return next((measured[n][res] for n in names if keys.get(n) == key and res in measured.get(n, {})), None)


def budget_steps(rates: dict, recipe: str, resolution: int, minutes: float, key: str | None = None) -> int:
    """Optimiser steps the recipe makes in `minutes` on the CPU `rates` was measured on (see measured_rate)."""
    per_second = measured_rate(rates, recipe, resolution, key)
    if per_second is None:
        changed = " as it is now (its settings changed since, or it was never measured)" if key else ""
        raise SystemExit(
            f"the rates files have no rate at {resolution} px for recipe {recipe!r}{changed}: run `quality rates`"
        )
    return max(1, round(minutes * 60 * per_second))


def params_dict(m: Matrix, job: Job, steps: int | None = None) -> dict:
    """The job's full params: the defaults, its recipe over them, then what the matrix fixes."""
    data, here = m.data_dir(job.resolution), m.job_dir(job.name)
    model = m.job_dir(job.model) if job.model else here
    steps = job.steps if steps is None else steps
    fixed = {
        "seed": job.seed,
        "data": {"resolution": job.resolution},
        "paths": {
            "raw": str(Path(m.out) / "data" / "raw"),
            "images": str(data / "images.npy"),
            "meta": str(data / "meta.json"),
            "labels": str(data / "labels.json"),
            "fid_ref": str(data / "fid_ref.npz"),
            "checkpoints": str(model / "checkpoints"),
            "trained": str(model / "trained"),
            "train_log": str(model / "train_log"),
            "pipeline": str(here / "pipeline"),
            "grid": str(here / "grid.png"),
            "samples": str(here / "samples"),
            "metrics": str(here / "metrics.json"),
            "fid_steps": str(here / "fid_steps.csv"),
            "fid_guidance": str(here / "fid_guidance.csv"),
            "report": str(here / "index.html"),
            "loss_plot": str(here / "loss.png"),
        },
        "train": {
            "max_steps": steps,
            "epochs": None,
            "mixed_precision": "no",
            "allow_tf32": False,
            "compile": False,
            "progress_grids": False,
            "checkpoint_every": steps,  # one checkpoint, at the end: the budget is training, not saving
            "checkpoints_total_limit": 1,
        },
        "sample": {"mixed_precision": "no", "batch_size": m.sample_batch},
        "fid": {
            "num_samples": m.samples,
            "num_reference": m.reference,
            "weights": m.weights,
            "weights_sha256": m.weights_sha256,
            "batch_size": min(m.sample_batch, 500),  # throughput only
        },
    }
    if job.sampler is not None:
        fixed["sample"].update(
            sampler=job.sampler, num_inference_steps=job.sampling_steps, eta=job.eta, timestep_spacing=job.spacing
        )
    raw = overlay(m.defaults, m.recipes[job.recipe], fixed)
    raw["sample"]["grid_size"] = min(raw["sample"]["grid_size"], math.isqrt(m.samples))  # a small set's grid
    return raw


def write_params(m: Matrix, job: Job) -> object:
    folder = m.job_dir(job.name)
    folder.mkdir(parents=True, exist_ok=True)
    raw = params_dict(m, job)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params_from_dict(raw, source=str(path))


def prepare_data(m: Matrix, resolutions: list[int]) -> None:
    """download once, preprocess once per resolution (the stages themselves)."""
    probe = Job(OURS, resolutions[0], 0, 0.0, 1)
    if not (Path(m.out) / "data" / "raw").is_dir():
        download.run(params_from_dict(params_dict(m, probe)))
    for resolution in resolutions:
        if not m.data_dir(resolution).joinpath("images.npy").is_file():
            preprocess.run(params_from_dict(params_dict(m, Job(OURS, resolution, 0, 0.0, 1))))


def generate(m: Matrix, job: Job) -> str:
    """Worker: train (unless a sampler job) and sample one job, its output in <job>/log.txt; its marker
    file says how it went."""
    end_with_the_matrix()
    torch.set_num_threads(m.threads)
    folder = m.job_dir(job.name)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            if job.model is not None:
                wait_for(m.job_dir(job.model))
            params = write_params(m, job)
            trained = train.run(params) if job.model is None else None
            sampled = sample.run(params)
            write_json(folder / GENERATED, {"train": trained, "sample": sampled})
        except Exception:  # noqa: BLE001 -- one job's failure is recorded and the matrix goes on
            (folder / FAILED).write_text(traceback.format_exc())
    return job.name


def end_with_the_matrix() -> None:
    """Worker: end this process once the matrix process that started it is gone (killed, or ended by a
    SIGTERM, which runs no cleanup). An orphan would go on for hours on cores the next run needs, and
    hold its sample set's lock, so that the rerun of the same command fails the job as "another process
    is writing this sample set". What it made is kept: the job resumes from its last checkpoint or whole
    sample batch."""
    parent = multiprocessing.parent_process()
    if parent is None:  # called outside a worker
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the spawn pipe closes, i.e. when it is gone
        with contextlib.suppress(ValueError, OSError):  # the job's log may be closed already
            print("quality: the matrix process ended; this worker stops with it", file=sys.stderr, flush=True)
        os._exit(1)  # at once: no cleanup of a half-done step, which resuming never reads

    threading.Thread(target=watch, name="end with the matrix", daemon=True).start()


def wait_for(model_dir: Path, poll: float = 2.0) -> None:
    while not (model_dir / GENERATED).is_file():
        if (model_dir / FAILED).is_file():
            raise RuntimeError(f"the model this job samples failed: {model_dir / FAILED}")
        time.sleep(poll)


def weights_ready(m: Matrix) -> bool:
    return m.weights is None or Path(m.weights).is_file()


def score(m: Matrix, job: Job) -> dict:
    """Main process: evaluate's own numbers for the job, plus (for 1-of-4 subsets of OURS) the FID the
    default run's 250 samples against 250 images would have given; one results row."""
    params = params_from_dict(yaml.safe_load((m.job_dir(job.name) / "params.yaml").read_text()))
    if not Path(params.paths.fid_ref).is_file():
        fid_reference.run(params_from_dict(params_dict(m, Job(job.recipe, job.resolution, 0, 0.0, 1))))
    check_reference(m, job.resolution)
    metrics = evaluate.run(params)
    generated = json.loads((m.job_dir(job.name) / GENERATED).read_text())
    row = {
        **asdict(job),
        "name": job.name,
        # what it trained with (`quality tables` never mixes two): today's recipe, which check_earlier_work and
        # the job folder's params check have tied to what this job's folder holds
        "recipe_key": recipe_key(m, job.recipe),
        **metrics,
        "device_seconds": device_seconds(generated),
        "sampled_with": sampled_with(params.sample),
    }
    if job.recipe == OURS and job.sampler is None and m.samples >= DEFAULT_RUN_SAMPLES:
        row["fid_default_size"] = default_size_fid(m, params)
    return row


def wanted_reference(m: Matrix, resolution: int) -> int:
    """The reference images a score uses: --reference, or every training image."""
    return m.reference or len(np.load(m.data_dir(resolution) / "images.npy", mmap_mode="r"))


def check_reference(m: Matrix, resolution: int) -> None:
    """A reference file an earlier run into this --out made with another --reference stops the matrix."""
    path = m.data_dir(resolution) / "fid_ref.npz"
    if not path.is_file():
        return
    made, wanted = int(load_reference(path)["num_images"]), wanted_reference(m, resolution)
    if made != wanted:
        raise SystemExit(
            f"quality: {path} holds {made:,} reference images, this run asks for {wanted:,} (--reference): "
            f"use a new --out, or delete that file to score this run's jobs against a new one"
        )


def sampled_with(s) -> dict:
    """The sampler a sample set was made with (a training job's is its recipe's); eta only where it acts, the
    timestep spacing only where it is not our schedule's own, "leading" (as the rows made before it was a
    param)."""
    spacing = {} if s.timestep_spacing in (None, "leading") else {"spacing": s.timestep_spacing}
    return {"sampler": s.sampler, "steps": s.num_inference_steps, "eta": s.applied_eta, **spacing}


def sampling_label(sampled: dict) -> str:
    """e.g. "ddim-50 eta 1", "ddpm-1000", "dpmsolver++-25 trailing"."""
    eta = "" if sampled["eta"] is None else f" eta {sampled['eta']:g}"
    spacing = f" {sampled['spacing']}" if "spacing" in sampled else ""
    return f"{sampled['sampler']}-{sampled['steps']}{eta}{spacing}"


def device_seconds(generated: dict) -> dict:
    train_info, sample_info = generated.get("train") or {}, generated["sample"]
    return {"train": train_info.get("seconds"), "sample": sample_info["seconds"]}


def default_size_fid(m: Matrix, params) -> float:
    """FID of the first 250 samples against 250 training images chosen as the default run chooses them:
    the same model scored the way `make run` scores it, beside the 1,000-sample figure."""
    extractor, info = load_extractor(params.fid)
    ref_path = m.data_dir(params.data.resolution) / f"fid_ref_{DEFAULT_RUN_SAMPLES}_s{params.seed}.npz"
    if not ref_path.is_file():
        small = overlay(params.to_dict(), {"paths": {"fid_ref": str(ref_path)}, "fid": {"num_reference": 250}})
        fid_reference.run(params_from_dict(small))
    reference = load_reference(ref_path)
    check_weights(reference, info, str(ref_path))  # made by an earlier run, maybe with other --weights
    device = default_device()
    images = load_samples(params.paths.samples)[:DEFAULT_RUN_SAMPLES]
    feats = fid.features(images, extractor, params.fid.batch_size, device, feature_workers(device))
    return float(fid.score(feats, reference, params.seed)["fid"])


def append_row(m: Matrix, row: dict) -> None:
    with open(Path(m.out) / RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(folder: str | Path) -> list[dict]:
    path = Path(folder) / RESULTS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def run_matrix(
    m: Matrix, jobs: list[Job], workers: int, deadline: float | None, generate: bool = True, score: bool = True
) -> dict:
    """Generate in job order, each job in a process of its own with at most `workers` at once; score in
    this one as sample sets appear (on a CPU, in a worker's slot no job is left to take). At `deadline`
    (seconds) the workers are stopped and what they finished is scored. Jobs scored before are skipped,
    if they were scored as they are set up now. A lent GPU without the Inception file generates only
    (score=False), and a CPU then scores what it generated, in the same folder, without generating
    (generate=False)."""
    started = time.monotonic()
    scored = {row["name"]: row for row in read_results(m.out)}
    check_earlier_work(m, jobs, scored)
    pending = {j.name: j for j in jobs if j.name not in scored}
    to_do = len(pending)
    orphans = [j.name for j in pending.values() if j.model and j.model not in pending and not has_model(m, j.model)]
    if orphans:  # their model was scored in an earlier run whose weights are gone: they would wait forever
        raise SystemExit(f"quality: no trained model for {orphans}: remove its row from {m.out}/{RESULTS} to retrain")
    for job in pending.values():  # an earlier run's failure: this run tries the job again
        m.job_dir(job.name).joinpath(FAILED).unlink(missing_ok=True)
    to_generate = [j for j in pending.values() if not is_generated(m, j)] if generate else []
    processes = Workers(m, to_generate, workers)
    # On a CPU the scorer shares the cores with the workers (a training job ran up to 20x slower beside a
    # scorer with a full set of threads): there it scores only in a free worker's slot, with a worker's threads
    scores_alongside = default_device().type != "cpu"
    cores = torch.get_num_threads()
    failed, out_of_time, told = [], False, False
    try:
        while pending:
            processes.step()
            if scores_alongside or processes.slot_free:
                torch.set_num_threads(m.threads if processes.running else cores)
                failed += score_ready(m, pending, score)
            if score and not told and not weights_ready(m) and any(is_generated(m, j) for j in pending.values()):
                told = True  # the matrix waits for it (a GPU lease copies it in later), until --deadline
                print(f"quality: sample sets are waiting for the Inception file {m.weights}", flush=True)
            if deadline is not None and time.monotonic() - started > deadline:
                out_of_time = True
                break
            if score and processes.done and not weights_ready(m) and (deadline is None or not generate):
                # only a lent GPU's later call brings the file in, and such a run sets --deadline
                print(f"quality: no Inception file at {m.weights}: the sample sets stay unscored", flush=True)
                break
            if pending:
                if processes.done and (not score or not any(is_generated(m, j) for j in pending.values())):
                    break  # nothing left that could still appear
                time.sleep(1.0)
    finally:
        processes.stop()
    torch.set_num_threads(cores)
    failed += score_ready(m, pending, score)  # what the workers finished before they were stopped
    unscored = sorted(name for name, job in pending.items() if is_generated(m, job))
    return {
        "scored": to_do - len(pending) - len(failed),  # by this run
        "already_scored": len({j.name for j in jobs}) - to_do,
        "failed": failed,
        "generated_unscored": unscored,
        "unfinished": sorted(set(pending) - set(unscored)),
        "out_of_time": out_of_time,
        "seconds": round(time.monotonic() - started, 1),
    }


class Workers:
    """The generating processes: one per job, started in job order, at most `count` alive. A process that
    ends without its job's marker file (killed by the out-of-memory killer, say) gets a failed.txt saying
    so, where a pool would have waited for its job forever."""

    def __init__(self, m: Matrix, jobs: list[Job], count: int):
        self.m, self.queue, self.count = m, list(jobs), count
        self.context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch state
        self.running: dict[str, tuple] = {}

    @property
    def done(self) -> bool:
        return not self.queue and not self.running

    @property
    def slot_free(self) -> bool:
        """No job is waiting for a process and fewer than `count` run: a core the scorer can take."""
        return not self.queue and len(self.running) < self.count

    def step(self) -> None:
        """Reap the processes that ended, then start jobs up to the count."""
        self.reap()
        while self.queue and len(self.running) < self.count:
            job = self.queue.pop(0)
            process = self.context.Process(target=generate, args=(self.m, job), name=f"quality {job.name}")
            self.running[job.name] = (process, job)  # before start: an interrupt in between still stops it
            process.start()

    def reap(self) -> None:
        for name, (process, job) in list(self.running.items()):
            if process.pid is None:  # interrupted before it started
                del self.running[name]
                continue
            if process.is_alive():
                continue
            process.join()
            folder = self.m.job_dir(name)
            if not is_generated(self.m, job) and not (folder / FAILED).is_file():
                folder.mkdir(parents=True, exist_ok=True)  # it may have died before making it
                (folder / FAILED).write_text(ended_early(name, process.exitcode, folder / "log.txt"))
            del self.running[name]

    def stop(self) -> None:
        self.reap()  # one that died meanwhile is a failure, not an unfinished job; what is left has started
        for process, _ in self.running.values():
            process.terminate()
        for process, _ in self.running.values():
            process.join()
        self.running.clear()
        self.queue.clear()


def ended_early(name: str, exit_code: int, log: Path) -> str:
    """failed.txt for a worker that ended without its marker file."""
    if exit_code < 0:
        how = f"was ended by signal {-exit_code}"
        how += " (SIGKILL, as the out-of-memory killer sends)" if exit_code == -9 else ""
    else:
        how = f"exited with code {exit_code}"
    where = f"its output is in {log}" if log.is_file() else "it died before its log was opened: see the matrix's stderr"
    return f"the worker process for {name} {how} before it finished; {where}\n"


def check_earlier_work(m: Matrix, jobs: list[Job], scored: dict) -> None:
    """What an earlier run into the same --out left must be what these jobs would make, or the matrix
    stops, naming the jobs: skipping a row scored another way (other steps, sampler or sample counts)
    would pass the old measurement off as the new one, and a job folder written with other params would
    be scored (if generated) or resumed (from its checkpoint) as it is."""
    planned = planned_sampling(m, jobs)
    for resolution in sorted({job.resolution for job in jobs}):  # before anything trains
        check_reference(m, resolution)
    changed = []
    for job in jobs:
        row = scored.get(job.name)
        if row is None:
            continue
        counts = (row.get("fid_num_samples"), row.get("fid_num_reference"))
        settings = (row.get("recipe_key") or "unrecorded", recipe_key(m, job.recipe))  # a default moved since?
        if (
            row["sampled_with"] != planned[job.name]
            or row["steps"] != job.steps
            or counts[0] != m.samples
            or counts[1] != wanted_reference(m, job.resolution)
            or settings[0] != settings[1]
        ):
            changed.append(
                f"{job.name} (scored: {sampling_label(row['sampled_with'])}, {row['steps']:,} steps, "
                f"{counts[0]} samples vs {counts[1]} images, recipe settings {settings[0]}; now: "
                f"{sampling_label(planned[job.name])}, {job.steps:,} steps, {m.samples} samples vs "
                f"{wanted_reference(m, job.resolution)} images, recipe settings {settings[1]})"
            )
    if changed:
        raise SystemExit(
            f"quality: {m.out}/{RESULTS} scored these jobs another way than they are set up now: "
            f"{'; '.join(changed)}. Use a new --out, or remove their rows to redo them"
        )
    stale = [
        job.name
        for job in jobs
        if (saved := m.job_dir(job.name) / "params.yaml").is_file()
        and not same_params(yaml.safe_load(saved.read_text()), params_dict(m, job))
    ]
    if stale:  # a scored one too: its row was made with a recipe (params.yaml, a preset) since changed
        raise SystemExit(
            f"quality: {stale} hold an earlier run's files, made with other params than they have now: "
            f"remove those folders under {m.out}/jobs (and their rows in {m.out}/{RESULTS}) to redo them"
        )


def same_params(saved: dict, now: dict) -> bool:
    """Whether a job folder's params file sets what the job's params set now. Compared as loaded: a key added
    to the params since (absent from the file) has the value the file's run had, its default."""
    try:
        return params_from_dict(saved).to_dict() == params_from_dict(now).to_dict()
    except ValueError:  # a file the params now refuse was made another way
        return False


def planned_sampling(m: Matrix, jobs: list[Job]) -> dict:
    """{job name: the sampler its params set}; a value the params refuse (a --sampler-sweep typo) stops the
    matrix here, before anything trains."""
    planned = {}
    for job in jobs:
        try:
            planned[job.name] = sampled_with(params_from_dict(params_dict(m, job)).sample)
        except ValueError as e:
            raise SystemExit(f"quality: job {job.name}: {e}") from None
    return planned


def has_model(m: Matrix, name: str) -> bool:
    return (m.job_dir(name) / GENERATED).is_file() and (m.job_dir(name) / "trained").is_dir()


def is_generated(m: Matrix, job: Job) -> bool:
    return (m.job_dir(job.name) / GENERATED).is_file()


def score_ready(m: Matrix, pending: dict, score_them: bool = True) -> list[str]:
    """Score every generated job (once the Inception file is there; unless told not to); drop failed ones.
    Returns those."""
    failed = []
    for name, job in list(pending.items()):
        folder = m.job_dir(name)
        if (folder / FAILED).is_file():
            failed.append(name)
            del pending[name]
            print(f"quality: {name} failed:\n{(folder / FAILED).read_text()}", flush=True)
        elif score_them and is_generated(m, job) and weights_ready(m):
            append_row(m, score(m, job))
            del pending[name]
            print(f"quality: scored {name} ({len(pending)} to go)", flush=True)
    return failed


def defaults() -> dict:
    return read_params_file(DEFAULT_PARAMS)
