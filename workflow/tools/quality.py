"""Recipe quality: FID against training compute for our recipe and the reference ones, with error bars.

    python -m workflow quality rates --out bench/quality/rates.json        # on the CPU the budgets mean
    python -m workflow quality matrix --rates bench/quality/rates.json --out /tmp/q [--workers 8]
    python -m workflow quality tables /tmp/q --rates bench/quality/rates.json --figures docs/quality

`rates` trains each recipe (params.yaml's, and each --recipes preset over it) for about --seconds at
each resolution with the train stage and records its optimiser steps per second (best of --trials,
the recipes alternating), and times the sample stage per sampler and step count. `matrix` trains every
recipe x resolution x seed for each budget (minutes on that CPU, converted with those rates), samples
--samples images with the recipe's own sampler, scores them against the reference with evaluate, and
sweeps samplers and steps over one model (workflow/tools/quality_jobs.py); `matrix --generate-only` trains
and samples where the Inception file is not (a lent GPU), and `matrix --score-only` scores that later in
the same --out path. `tables` turns the results
into docs/QUALITY.md's tables (mean +- standard deviation over seeds) and figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import tempfile
import typing
from pathlib import Path

import torch

from workflow.core.artifacts import remove
from workflow.core.config import TimestepSpacing
from workflow.core.environment import software_versions
from workflow.formats.sample_set import partial_folder
from workflow.stages import sample, train
from workflow.tools import quality_tables
from workflow.tools.quality_jobs import (
    OURS,
    RECIPES,
    Job,
    Matrix,
    budget_steps,
    defaults,
    prepare_data,
    recipe_key,
    recipe_presets,
    run_matrix,
    write_params,
)

SWEEP = "ddpm:0:10,25,50,100,250,1000 ddim:0:10,25,50,100 ddim:1:10,25,50,100 dpmsolver++:0:10,25,50,100"


def parse_sweep(text: str) -> list[tuple[str, float, int, str | None]]:
    """'ddim:1:10,25 dpmsolver++:0:10:trailing' -> [(sampler, eta, steps, timestep spacing), ...]; the spacing
    is None (the params', the schedule's own) unless given."""
    points = []
    for part in text.split():
        try:
            sampler, eta, steps, *spacing = part.split(":")
            (spacing,) = spacing or [None]
            if spacing is not None and spacing not in typing.get_args(TimestepSpacing):
                raise ValueError(spacing)
            points += [(sampler, float(eta), int(n), spacing) for n in steps.split(",")]
        except ValueError:
            raise SystemExit(f"--sampler-sweep: {part!r} is not sampler:eta:steps,steps,...[:spacing]") from None
    return points


def matrix_of(args, work: str, samples: int) -> Matrix:
    return Matrix(
        out=work,
        recipes=recipe_presets(args.recipes + getattr(args, "variants", [])),
        samples=samples,
        reference=args.reference if getattr(args, "reference", 0) else None,
        sample_batch=args.sample_batch,
        # the workers share the cores: more threads than cores make each process wait on the others
        threads=args.threads or max(1, torch.get_num_threads() // getattr(args, "workers", 1)),
        weights=getattr(args, "weights", None),
        weights_sha256=getattr(args, "weights_sha256", None),
        defaults=defaults(),
    )


def measure_rates(args) -> dict:
    work = args.work or tempfile.mkdtemp(prefix="quality-rates-")
    m = matrix_of(args, work, samples=args.sampling_images)
    prepare_data(m, args.resolutions)
    trials = {r: {str(res): [] for res in args.resolutions} for r in m.recipes}
    for _ in range(args.trials):  # the recipes alternate, so a slow spell of the machine hits them all
        for recipe in m.recipes:
            for res in args.resolutions:
                pilot = timed_steps(m, Job(recipe, res, 0, 0.0, 5))
                steps = max(10, round(args.seconds * pilot))
                trials[recipe][str(res)].append(timed_steps(m, Job(recipe, res, 0, 0.0, steps)))
    sampling = {}
    model = Job(OURS, args.resolutions[0], 0, 0.0, 10)
    timed_steps(m, model, keep=True)
    for sampler, eta, n, spacing in parse_sweep(args.sampler_sweep):  # the spacing does not change the cost
        job = dataclasses.replace(model, sampler=sampler, eta=eta, sampling_steps=n, spacing=spacing, model=model.name)
        params = write_params(m, job)
        remove(partial_folder(Path(params.paths.samples)))  # timed whole: never a killed calibration resumed
        record = sample.run(params)
        sampling.setdefault(f"{sampler}-eta{eta:g}", {})[str(n)] = record["seconds"] / record["count"]
    return {
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "software": software_versions(),
        "steps_per_second": {r: {res: max(v) for res, v in t.items()} for r, t in trials.items()},
        "recipe_keys": {r: recipe_key(m, r) for r in m.recipes},
        "trials": trials,
        "sampling_resolution": args.resolutions[0],
        "sampling_seconds_per_image": sampling,
        "sampling_images": args.sampling_images,
    }


def timed_steps(m: Matrix, job: Job, keep: bool = False) -> float:
    """Optimiser steps per second of one fresh training run (step time only, as train records it)."""
    folder = m.job_dir(job.name)
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, never a resumed one
    info = train.run(write_params(m, job))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return info["steps"] / info["seconds"]


def matrix_jobs(args, rates: dict, keys: dict | None = None) -> list[Job]:
    """In the order the results matter: the recipes at the first resolution (seed-major, so seed 0's set
    is complete first; longest first within a seed), the sampler sweep over our seed-0 model at the
    largest budget, the variants (at the first resolution, --variant-budgets), then other resolutions.
    `keys` (recipe name -> recipe_key) picks each recipe's rate by what it trains with."""
    keys = keys or {}
    recipes = [OURS, *(Path(p).stem for p in args.recipes)][1 if args.without_ours else 0 :]
    if args.without_ours and args.sampler_sweep:
        raise SystemExit('--without-ours: the sampler sweep samples our recipe\'s model; add --sampler-sweep ""')
    first, *others = args.resolutions

    def block(names: list[str], res: int, budgets: list[float]) -> list[Job]:
        jobs = []
        for seed in args.seeds:
            one = [Job(r, res, seed, b, budget_steps(rates, r, res, b, keys.get(r))) for b in budgets for r in names]
            jobs += sorted(one, key=lambda j: -j.steps)
        return jobs

    jobs = block(recipes, first, args.budgets)
    if args.sampler_sweep:
        top = max(args.budgets)
        model = Job(OURS, first, args.seeds[0], top, budget_steps(rates, OURS, first, top, keys.get(OURS)))
        jobs += [
            dataclasses.replace(model, sampler=s, eta=eta, sampling_steps=n, spacing=spacing, model=model.name)
            for s, eta, n, spacing in parse_sweep(args.sampler_sweep)
        ]
    jobs += block([Path(p).stem for p in args.variants], first, args.variant_budgets)
    for res in others:
        jobs += block(recipes, res, args.budgets)
    return jobs


def read_rates(paths: list[str]) -> dict:
    """The first file, with the recipes (and resolutions) of the later ones added. A later file was measured in another
    session, when the machine may have run faster or slower: its rates are scaled by how a recipe measured in both
    (the same settings, `recipe_keys`; ours where it can) compares with the first file's, so a budget means the same
    minutes for every recipe. A later recipe whose name an earlier file holds with other settings is added under
    `name@key` (today's ours beside the batch-128 ours of older files): budgets find a rate by its settings."""
    merged = json.loads(Path(paths[0]).read_text())
    rates, keys = merged["steps_per_second"], merged.setdefault("recipe_keys", {})
    for path in paths[1:]:
        later = json.loads(Path(path).read_text())
        extra, extra_keys = later["steps_per_second"], later.get("recipe_keys", {})
        if bool(extra_keys) != bool(keys):
            raise SystemExit(
                f"{path}: one of it and {paths[0]} records its recipes' settings (recipe_keys), the other not"
            )
        unkeyed = sorted(set(extra) - set(extra_keys)) if extra_keys else []
        if unkeyed:
            raise SystemExit(f"{path}: no recipe_keys entry for {unkeyed}")
        named = {}  # the later file's recipe names -> the merged ones
        for recipe in extra:
            key = extra_keys.get(recipe)
            same = sorted((n for n in rates if key is not None and keys.get(n) == key), key=lambda n: n != recipe)
            taken = recipe in rates and keys.get(recipe) != key
            named[recipe] = same[0] if same else f"{recipe}@{key}" if taken else recipe
        for res in sorted({res for per_res in extra.values() for res in per_res}):
            new = [r for r, per_res in extra.items() if res in per_res and res not in rates.get(named[r], {})]
            if not new:
                continue
            both = [r for r in extra if res in extra[r] and res in rates.get(named[r], {})]
            if not both:
                raise SystemExit(
                    f"{path}: no recipe measured at {res} px both there and in the files before it (the same "
                    "settings), which puts its rates on the first file's scale"
                )
            anchor = OURS if OURS in both else sorted(both)[0]
            scale = rates[named[anchor]][res] / extra[anchor][res]
            for recipe in new:  # the earlier files' measurements are kept where both have one (or two here: the first)
                rates.setdefault(named[recipe], {}).setdefault(res, extra[recipe][res] * scale)
                if extra_keys:
                    keys[named[recipe]] = extra_keys[recipe]
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workflow quality", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("rates", "matrix"):
        p = sub.add_parser(name)
        p.add_argument("--recipes", nargs="*", default=RECIPES, help="recipe presets besides params.yaml's")
        p.add_argument("--resolutions", type=int, nargs="+", default=[16, 32])
        p.add_argument(
            "--sampler-sweep", default=SWEEP, help="sampler:eta:steps,...[:timestep spacing] (space-separated)"
        )
        p.add_argument("--sample-batch", type=int, default=250)
        p.add_argument("--threads", type=int, help="torch threads per process (default: the cores over the workers)")
    rates = sub.choices["rates"]
    rates.add_argument("--seconds", type=float, default=20.0, help="training time per measurement")
    rates.add_argument("--trials", type=int, default=2)
    rates.add_argument("--sampling-images", type=int, default=100)
    rates.add_argument("--work", help="scratch folder (default: a new temporary one)")
    rates.add_argument("--out", required=True, help="the rates JSON file")
    matrix = sub.choices["matrix"]
    matrix.add_argument("--rates", nargs="+", required=True, help="`quality rates` files (later ones add recipes)")
    matrix.add_argument("--without-ours", action="store_true", help="only the --recipes presets, not params.yaml's")
    matrix.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    matrix.add_argument("--budgets", type=float, nargs="+", default=[2.0, 5.0, 10.0], help="minutes on the rates' CPU")
    matrix.add_argument("--variants", nargs="*", default=[], help="presets tried against ours (first resolution)")
    matrix.add_argument("--variant-budgets", type=float, nargs="+", default=[10.0])
    matrix.add_argument("--samples", type=int, default=1000)
    matrix.add_argument("--reference", type=int, default=0, help="reference images (0: all the training images)")
    matrix.add_argument("--workers", type=int, default=1)
    matrix.add_argument("--weights", help="the Inception file (default: the packaged one)")
    matrix.add_argument("--weights-sha256")
    matrix.add_argument("--deadline", type=float, help="seconds after which the workers are stopped")
    only = matrix.add_mutually_exclusive_group()
    only.add_argument(
        "--generate-only", action="store_true", help="train and sample; score nothing (no Inception file)"
    )
    only.add_argument("--score-only", action="store_true", help="score what a --generate-only run into --out made")
    matrix.add_argument("--out", required=True)
    tables = sub.add_parser("tables")
    tables.add_argument("results", nargs="+", help="matrix output folders")
    tables.add_argument("--rates", nargs="+", required=True)
    tables.add_argument("--figures", help="write the figures (PNG) into this folder")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)

    if args.command == "rates":
        result = measure_rates(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["steps_per_second"], indent=2))
    elif args.command == "matrix":
        rates_ = read_rates(args.rates)
        m = matrix_of(args, args.out, args.samples)
        jobs = matrix_jobs(args, rates_, {r: recipe_key(m, r) for r in m.recipes})  # bad options stop here
        prepare_data(m, args.resolutions)
        print(f"quality: {len(jobs)} jobs, {args.workers} workers -> {args.out}", flush=True)
        summary = run_matrix(m, jobs, args.workers, args.deadline, not args.score_only, not args.generate_only)
        print(json.dumps(summary), flush=True)
    else:
        rates_ = read_rates(args.rates)
        print(quality_tables.markdown(args.results, rates_, args.figures))
