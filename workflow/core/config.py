"""params.yaml -> frozen, validated dataclasses. The only module that knows the file's shape.

    from workflow.core.config import load_params
    params = load_params()              # ./params.yaml
    params.train.learning_rate

Unknown keys, wrong types and out-of-range values raise ConfigError naming the key and the rule.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A mistake in params.yaml (or another user input): the message names the key and the rule."""


def _rule(check, text):
    return {"check": check, "rule": text}


# Every number has an upper bound too, so no value can make a stage loop or allocate without end
# (a typo like `layers_per_block: 1000000` is one clear error, not a hung machine). The bounds are far
# above the presets; README "Upper bounds" lists them (a test keeps that table equal to these).
def positive(limit):
    return _rule(lambda v: 0 < v <= limit, f"must be > 0 and <= {limit:,}") | {"max": limit}


def at_least(low, limit):
    return _rule(lambda v: low <= v <= limit, f"must be >= {low} and <= {limit:,}") | {"max": limit}


def non_negative(limit):
    return _rule(lambda v: 0 <= v <= limit, f"must be >= 0 and <= {limit:,}") | {"max": limit}


def positive_items(limit, count):
    """A list of at most `count` numbers, each in (0, limit] (may be empty)."""
    return _rule(
        lambda v: len(v) <= count and all(0 < n <= limit for n in v),
        f"must hold at most {count} values, each > 0 and <= {limit:,}",
    ) | {"max": limit}


def non_negative_items(limit, count):
    """A list of at most `count` numbers, each in [0, limit] (may be empty)."""
    return _rule(
        lambda v: len(v) <= count and all(0 <= n <= limit for n in v),
        f"must hold at most {count} values, each >= 0 and <= {limit:,}",
    ) | {"max": limit}


def distinct(rule):
    """`rule`, and no value twice."""
    check, text = rule["check"], rule["rule"]
    return rule | _rule(lambda v: check(v) and len(set(v)) == len(v), f"{text}, none twice")


def positive_list(limit, count):
    return _rule(
        lambda v: 0 < len(v) <= count and all(0 < x <= limit for x in v),
        f"must be a list of 1 to {count} numbers, each > 0 and <= {limit:,}",
    ) | {"max": limit}


UNIT_OPEN = _rule(lambda v: 0 < v < 1, "must be in (0, 1)")
UNIT_CLOSED = _rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
NON_EMPTY = _rule(lambda v: len(v) > 0, "must not be empty")
# no file system takes a NUL, and os.path raises ValueError on one (the source folders are compared resolved)
PATH = _rule(lambda v: len(v) > 0 and "\0" not in v, "must be a non-empty path with no NUL character")
STEPS = 10_000_000  # optimiser steps, and every count of them (warm-up, logging, checkpoint cadence)
IMAGES = 100_000_000  # images in a dataset
CLASSES = 100_000  # classes of a labelled dataset (one embedding row each)
GUIDANCE = 100.0  # classifier-free guidance scales
REFERENCE_IMAGES = 1_000_000  # FID reference images (2048 float64 Inception features each: 16 GB at the bound)
SHA256 = _rule(lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "must be 64 lowercase hex digits")
SOURCE = _rule(
    lambda v: re.fullmatch(r"(builtin|imagefolder|hf):.+", v) is not None,
    "must be builtin:<name>, imagefolder:<path> or hf:<owner>/<name>",
)
PROMPTS = _rule(
    lambda v: len(v) <= 64 and all(0 < len(p) <= 4096 for p in v),
    "must hold at most 64 prompts, each of 1 to 4,096 characters",
)
PRETRAINED = _rule(
    lambda v: re.fullmatch(r"(hf|folder):.+", v) is not None,
    "must be hf:<owner>/<name> or folder:<path> (a diffusers Stable Diffusion pipeline)",
)


def checked(default, rule=None):
    """A params field with its default and the rule its value must meet (checked when loaded)."""
    return field(default=default, metadata=rule or {})


def checked_tuple(default, rule=None):
    """A list-valued params field (a tuple, so Params stays hashable and frozen)."""
    return field(default=tuple(default), metadata=rule or {})


def _path(default):
    """A path in params.yaml: any non-empty string without a NUL."""
    return checked(default, PATH)


@dataclass(frozen=True)
class Paths:
    raw: str = _path("data/raw")
    images: str = _path("data/processed/images.npy")
    meta: str = _path("data/processed/meta.json")
    labels: str = _path("data/processed/labels.json")  # class names and each image's class (empty: none)
    captions: str = _path("data/processed/captions.json")  # each image's captions (empty: none)
    holdout_images: str = _path("data/processed/holdout_images.npy")  # data.holdout's images (text-to-image)
    holdout_captions: str = _path("data/processed/holdout_captions.json")  # and their captions
    base_model: str = _path("models/base")  # download_model's: the pretrained pipeline's parts (model.pretrained)
    latents: str = _path("data/processed/latents")  # encode's: latent distributions + caption embeddings
    fid_ref: str = _path("data/processed/fid_ref.npz")
    checkpoints: str = _path("models/checkpoints")
    trained: str = _path("models/trained")  # train's pipeline, read by sample and fid_sweep
    pipeline: str = _path("models/pipeline")  # the package stage's: the trained pipeline + its model card
    train_log: str = _path("reports/train")
    grid: str = _path("reports/samples/grid.png")
    samples: str = _path("data/samples")
    metrics: str = _path("reports/metrics.json")
    fid_steps: str = _path("reports/fid_steps.csv")
    fid_guidance: str = _path("reports/fid_guidance.csv")
    report: str = _path("reports/index.html")
    loss_plot: str = _path("reports/loss.png")


@dataclass(frozen=True)
class Data:
    source: str = checked("builtin:mnist", SOURCE)
    folder: str = _path("data/images")  # the imagefolder: path; dvc and Snakemake track its content
    # "" is refused in the four below: a revision "" silently read as main, an image column "" failed with a traceback
    revision: Optional[str] = checked(None, NON_EMPTY)  # hf only: branch, tag or commit sha; null = main
    config: Optional[str] = checked(None, NON_EMPTY)  # hf only: a config the dataset card declares; None = its default
    split: str = checked("train", NON_EMPTY)
    image_column: str = checked("image", NON_EMPTY)
    label_column: Optional[str] = checked(None, NON_EMPTY)  # hf only: a ClassLabel column; null = no labels
    # hf parquet: a text column; an image folder (local or hf): the field of its metadata.jsonl; null = none
    caption_column: Optional[str] = checked(None, NON_EMPTY)
    resolution: int = checked(16, positive(1024))
    channels: Literal[1, 3] = 1
    center_crop: bool = True
    max_images: Optional[int] = checked(None, positive(IMAGES))
    min_images: int = checked(16, positive(IMAGES))  # preprocess fails if fewer images decode
    # text-to-image: images (seeded) kept out of training; FID scores images made from their captions against them
    holdout: int = checked(0, non_negative(IMAGES))

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1]


@dataclass(frozen=True)
class Model:
    # text-to-image: fine-tune this Stable Diffusion pipeline (its UNet2DConditionModel) on captioned images;
    # the UNet settings below are then its own. null: a UNet2DModel trained from scratch
    pretrained: Optional[str] = checked(None, PRETRAINED)
    revision: Optional[str] = checked(None, NON_EMPTY)  # hf only: branch, tag or commit sha (pin the sha)
    folder: str = _path("models/local")  # folder:<path> must be this folder: dvc and Snakemake track it
    block_out_channels: tuple[int, ...] = checked_tuple((32, 64, 64), positive_list(4096, 8))  # 8 levels at most
    layers_per_block: int = checked(1, positive(16))
    attention_levels: tuple[int, ...] = checked_tuple((2,))
    norm_num_groups: int = checked(16, positive(1024))
    class_conditional: bool = False  # a class embedding (one row per class + "no class"), for guidance
    # the UNet is counted on the meta device before it is built (workflow.models.builders.check_size)
    max_parameters: int = checked(2_000_000_000, positive(10**12))

    @property
    def kind(self) -> str | None:
        return self.pretrained.split(":", 1)[0] if self.pretrained else None

    @property
    def location(self) -> str | None:
        return self.pretrained.split(":", 1)[1] if self.pretrained else None


@dataclass(frozen=True)
class Scheduler:
    num_train_timesteps: int = checked(1000, positive(100_000))
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"


@dataclass(frozen=True)
class Train:
    batch_size: int = checked(32, positive(65_536))  # images per optimiser step, over all processes and micro-batches
    gradient_accumulation_steps: int = checked(1, positive(1024))  # micro-batches per step: a memory knob only
    num_processes: int = checked(1, positive(1024))  # data-parallel processes, one per GPU; > 1: accelerate launch
    # one micro-batch's activations, estimated before anything is built (workflow.models.builders.check_size)
    max_activation_gib: float = checked(256.0, positive(2**20))
    max_steps: Optional[int] = checked(3750, positive(STEPS))
    epochs: Optional[float] = checked(None, positive(100_000))  # alternative to max_steps
    learning_rate: float = checked(2e-3, positive(1))
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = checked(50, non_negative(STEPS))
    adam_beta1: float = checked(0.9, UNIT_OPEN)
    adam_beta2: float = checked(0.999, UNIT_OPEN)
    adam_weight_decay: float = checked(0.0, non_negative(1))
    adam_epsilon: float = checked(1e-8, positive(1))
    max_grad_norm: float = checked(1.0, positive(1e6))
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: bf16 where the GPU has it
    allow_tf32: bool = True
    compile: bool = False  # torch.compile; falls back to eager with a warning if compilation fails
    min_snr_gamma: Optional[float] = checked(None, positive(1000))  # Min-SNR-gamma loss weighting
    noise_offset: float = checked(0.0, non_negative(1))
    random_flip: bool = False
    ema: bool = True
    ema_inv_gamma: float = checked(1.0, positive(1e6))
    ema_power: float = checked(0.75, positive(10))
    ema_max_decay: float = checked(0.9999, UNIT_CLOSED)
    log_every: int = checked(25, positive(STEPS))
    checkpoint_every: int = checked(300, positive(STEPS))
    checkpoints_total_limit: int = checked(2, positive(100))
    progress_grids: bool = True  # a small grid from the EMA weights at every checkpoint
    label_dropout: float = checked(0.1, UNIT_CLOSED)  # class-conditional: share of labels replaced by "no class"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: memory for time
    lora_rank: Optional[int] = checked(None, positive(1024))  # text-to-image: train a LoRA adapter of this rank


TimestepSpacing = Literal["leading", "trailing", "linspace"]  # diffusers' `timestep_spacing`


@dataclass(frozen=True)
class Sample:
    sampler: Literal["ddpm", "ddim", "dpmsolver++"] = "ddpm"
    num_inference_steps: int = checked(50, positive(10_000))
    # DDIM only (the other samplers ignore it, as diffusers' pipelines do): 0 = deterministic, 1 = DDPM-like noise
    eta: float = checked(1.0, UNIT_CLOSED)
    # where the sampler's steps fall on the 1,000 training timesteps: "leading" (50 steps are 980, 960, ..., 0),
    # "trailing" (999, 979, ..., 19: the first step starts at pure noise) or "linspace"; None: the noise
    # schedule's own (leading for the models trained here, a pretrained pipeline's its scheduler config's)
    timestep_spacing: Optional[TimestepSpacing] = None
    grid_size: int = checked(8, positive(16))
    batch_size: int = checked(250, positive(4096))
    # cap: sampling refuses a batch whose UNet pass would hold more (float32 estimate, meta device)
    max_activation_gib: float = checked(256.0, positive(2**20))
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    compile: bool = False  # torch.compile the UNet; falls back to eager with a warning if it fails
    # class-conditional only: eps = eps_uncond + w (eps_cond - eps_uncond); 1 = conditional, 0 = unconditional
    guidance_scale: float = checked(1.0, non_negative(GUIDANCE))
    classes: tuple[int, ...] = checked_tuple((), distinct(non_negative_items(CLASSES - 1, 1024)))  # () = all
    # text-to-image: the grid's prompts (a row each, at every checkpoint and at the end) and what guidance steers from
    prompts: tuple[str, ...] = checked_tuple((), PROMPTS)
    negative_prompt: Optional[str] = None

    @property
    def applied_eta(self) -> float | None:
        """What the sampler does with `eta`: its value for DDIM, None for the samplers that ignore it."""
        return self.eta if self.sampler == "ddim" else None


@dataclass(frozen=True)
class Fid:
    num_samples: int = checked(250, at_least(2, 100_000))  # the FID sample set (sample makes it); 2 for a covariance
    # null = all the images; fid_reference holds that to the same bound once it knows their number
    num_reference: Optional[int] = checked(250, positive(REFERENCE_IMAGES))
    weights: Optional[str] = checked(None, PATH)  # "" would silently mean null: the default extractor
    weights_sha256: Optional[str] = checked(None, SHA256)
    batch_size: int = checked(50, positive(4096))
    # cap: FID refuses a batch whose Inception pass would hold more (float32, measured on the meta device);
    # the batch is throughput only, so the cap sits below sample's: 4096 images hold 50 GiB
    max_activation_gib: float = checked(32.0, positive(2**20))
    steps_sweep: tuple[int, ...] = checked_tuple((), positive_items(10_000, 32))  # FID against the sampling steps
    guidance_sweep: tuple[float, ...] = checked_tuple((), non_negative_items(GUIDANCE, 32))  # FID against w


@dataclass(frozen=True)
class Encode:
    """The encode stage (text-to-image only): each image's latent distribution and each caption's embedding."""

    batch_size: int = checked(32, positive(4096))  # images or captions per VAE or text encoder call
    # cap: encode refuses a batch whose VAE or text encoder call would hold more (float32, measured on the meta
    # device); the batch is throughput only, so the cap sits below sample's (SD's VAE: 0.63 GiB an image at 512 px)
    max_activation_gib: float = checked(32.0, positive(2**20))
    # float16 halves the cache: its rounding (2^-11 relative, 3e-8 absolute below float16's normal range) is the
    # least any fp16 result carries, as the reference's fp16 encoders' do; float32 keeps the output exactly
    # (a cached step then equals an on-the-fly one)
    storage: Literal["float16", "float32"] = "float16"


@dataclass(frozen=True)
class Cluster:
    """What each computing job asks a cluster for (snakemake --profile profiles/slurm); local runs ignore it."""

    gpu: bool = True  # train asks for train.num_processes GPUs, the other computing stages for one
    cpus_per_task: int = checked(8, positive(1024))
    mem_mb: int = checked(32_000, positive(16_777_216))  # per job (16 TiB cap)
    runtime: int = checked(240, positive(525_600))  # minutes a job may run (a year cap)


@dataclass(frozen=True)
class Params:
    seed: int = checked(0, non_negative(2**32 - 1))
    paths: Paths = field(default_factory=Paths)
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    scheduler: Scheduler = field(default_factory=Scheduler)
    train: Train = field(default_factory=Train)
    sample: Sample = field(default_factory=Sample)
    fid: Fid = field(default_factory=Fid)
    encode: Encode = field(default_factory=Encode)
    cluster: Cluster = field(default_factory=Cluster)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(value):
    """Tuples back to lists, so the dict round-trips through YAML and JSON."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def paths_of(raw: dict) -> Paths:
    """The `paths` of a params dict another run wrote (an experiment's params.yaml, perhaps from an
    older version of this code): absent keys take their defaults and unknown ones are ignored, as
    only the paths are needed to find that run's artifacts."""
    section = raw.get("paths") if isinstance(raw.get("paths"), dict) else {}
    known = {f.name for f in dataclasses.fields(Paths)}
    return Paths(**{k: str(v) for k, v in section.items() if k in known})


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    return params_from_dict(read_params_file(path), source=str(path))


def read_params_file(path: str | Path):
    """A params file's content as written, not yet validated ({} when empty)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (run from the project root, or pass the params file)") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: not UTF-8, or an impossible date (2024-13-01)
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return {} if raw is None else raw


def load_preset(path: str | Path) -> dict:
    """A preset (configs/*.yaml: only what a recipe changes), checked over the defaults; a mistake
    names the key and `path`. Returns the preset's own keys, unmerged."""
    raw = read_params_file(path)
    params_from_dict(raw, source=str(path))
    return raw


def overlay(raw: dict, *layers: dict) -> dict:
    """A copy of `raw` with each layer's sections merged in, key by key, in order (the last wins);
    a value that is not a mapping replaces the one below it. How a preset or an override sits over the defaults."""
    out = copy.deepcopy(raw)
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = overlay(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def dotted_keys(tree: dict, prefix: str = "") -> dict:
    """{"train.learning_rate": 0.002, ...}: every value a nested mapping sets (lists are values)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(dotted_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def params_from_dict(raw: dict, source: str = "params") -> Params:
    params = _build(Params, raw, prefix="", source=source)
    _check_cross_field(params, source)
    return params


def _build(cls, raw, prefix: str, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or '<top level>'}` must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))
    if unknown:
        raise ConfigError(f"{source}: unknown key `{prefix}{unknown[0]}`; valid keys here: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = prefix + name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key + ".", source)
            continue
        value = _coerce(kind, value, key, source)
        rule = fields[name].metadata
        if rule and value is not None and not rule["check"](value):
            raise ConfigError(f"{source}: `{key}` {rule['rule']}, got {value!r}")
        values[name] = value
    return cls(**values)


def _coerce(kind, value, key: str, source: str):
    """Check `value` against the annotation `kind`; return it in its canonical Python type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key, source)
    if origin is Literal:
        if value is False and "no" in args:
            # `dvc exp run -S` rewrites params.yaml as YAML 1.2, where a bare `no` is a string;
            # PyYAML reads YAML 1.1, where it is False. Both mean mixed_precision "no".
            value = "no"
        if not any(value == a and type(value) is type(a) for a in args):  # 1.0 is not 1, True is not 1
            raise ConfigError(f"{source}: `{key}` must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: `{key}` must be a list of {args[0].__name__}, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if kind is float:
        return _finite(value, key, source)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: `{key}` must be {kind.__name__}, got {value!r}")
    return value


def _finite(value, key: str, source: str) -> float:
    """An int, float or numeric string (YAML 1.1 reads `1e-4`, without a dot, as a string) as a finite float."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value) if abs(value) < 1e308 else math.inf
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise ConfigError(f"{source}: `{key}` must be a finite number, got {value!r}")
    return number


def _check_cross_field(p: Params, source: str) -> None:
    levels = len(p.model.block_out_channels)
    factor = 2 ** (levels - 1)
    if p.data.resolution % factor:
        raise ConfigError(
            f"{source}: `data.resolution` ({p.data.resolution}) must be divisible by 2^(levels-1) = "
            f"{factor} for {levels} levels in `model.block_out_channels`"
        )
    bad = [c for c in p.model.block_out_channels if c % p.model.norm_num_groups]
    if bad:
        raise ConfigError(
            f"{source}: `model.block_out_channels` {list(bad)} must be divisible by "
            f"`model.norm_num_groups` ({p.model.norm_num_groups})"
        )
    wrong = [lv for lv in p.model.attention_levels if not 0 <= lv < levels]
    if wrong:
        raise ConfigError(
            f"{source}: `model.attention_levels` {wrong} must be level indices in 0..{levels - 1} "
            f"(the {levels} levels of `model.block_out_channels`)"
        )
    if p.sample.grid_size**2 > p.fid.num_samples:
        raise ConfigError(
            f"{source}: `sample.grid_size`^2 ({p.sample.grid_size**2}) must not exceed "
            f"`fid.num_samples` ({p.fid.num_samples}), the sample set the grid is taken from"
        )
    too_many = [n for n in (p.sample.num_inference_steps, *p.fid.steps_sweep) if n > p.scheduler.num_train_timesteps]
    if too_many:
        raise ConfigError(
            f"{source}: `sample.num_inference_steps` and `fid.steps_sweep` ({too_many}) must not exceed "
            f"`scheduler.num_train_timesteps` ({p.scheduler.num_train_timesteps})"
        )
    if not p.model.class_conditional:
        conditional_only = {
            "sample.guidance_scale": p.sample.guidance_scale != 1.0 and p.model.pretrained is None,
            "sample.classes": bool(p.sample.classes),
            "fid.guidance_sweep": bool(p.fid.guidance_sweep) and p.model.pretrained is None,
        }
        for key, is_set in conditional_only.items():
            if is_set:
                raise ConfigError(
                    f"{source}: `{key}` applies to class-conditional models: set `model.class_conditional: true` "
                    "(a labelled dataset), or leave it at its default"
                )
    if p.model.class_conditional:
        _check_guidance_is_trained(p, source)
    if (p.train.max_steps is None) == (p.train.epochs is None):
        raise ConfigError(f"{source}: set exactly one of `train.max_steps` and `train.epochs` (the other null)")
    shares = p.train.gradient_accumulation_steps * p.train.num_processes
    if p.train.batch_size % shares:
        raise ConfigError(
            f"{source}: `train.batch_size` ({p.train.batch_size}) must be divisible by "
            f"`train.gradient_accumulation_steps` x `train.num_processes` ({shares}): each process's micro-batches"
        )
    if p.fid.weights_sha256 and not p.fid.weights:
        raise ConfigError(f"{source}: `fid.weights_sha256` is set but `fid.weights` is not")
    if p.data.kind == "hf" and "/" not in p.data.location:
        raise ConfigError(f"{source}: `data.source` {p.data.source!r} must name a repository as hf:<owner>/<name>")
    _check_hf_only(p.data, source)
    _check_text_to_image(p, source)
    if p.data.kind == "imagefolder" and os.path.normpath(p.data.location) != os.path.normpath(p.data.folder):
        raise ConfigError(
            f"{source}: `data.source` {p.data.source!r} must read `data.folder` "
            f"({p.data.folder!r}), the folder dvc and Snakemake track: set `data.folder: "
            f"{p.data.location}` too"
        )
    _check_source_folders(p, source)


def _check_source_folders(p: Params, source: str) -> None:
    """A source folder (read by download or download_model) equal to or inside an output in `paths.*`: the
    stage writing that output replaces it whole, deleting the user's files with it (and dvc would see the
    stage depend on its own output); or one holding an output, whose files it would read as input."""
    outputs = {f"paths.{key}": value for key, value in dataclasses.asdict(p.paths).items()}
    for key, folder in (("data.folder", p.data.folder), ("model.folder", p.model.folder)):
        mine = Path(os.path.realpath(folder))
        for out_key, out in outputs.items():
            theirs = Path(os.path.realpath(out))
            if mine.is_relative_to(theirs):
                where = "is" if mine == theirs else "is inside"
                raise ConfigError(
                    f"{source}: `{key}` ({folder!r}) {where} `{out_key}` ({out!r}), an output a stage replaces "
                    f"whole: the folder would be deleted; keep `{key}` outside every `paths.*` output"
                )
            if theirs.is_relative_to(mine):  # a source holding an output: it would read what the pipeline wrote
                raise ConfigError(
                    f"{source}: `{key}` ({folder!r}) holds `{out_key}` ({out!r}), an output of the pipeline: its "
                    f"files would be read as input (and DVC would see a stage depend on an output); keep `{key}` "
                    "and the `paths.*` outputs apart"
                )


def _check_hf_only(data: Data, source: str) -> None:
    """The keys only an hf: dataset reads: set for builtin: or imagefolder:, they were silently not used."""
    if data.kind == "hf":
        return
    hf_only = {"data.revision": data.revision, "data.config": data.config, "data.label_column": data.label_column}
    for key, value in hf_only.items():
        if value is not None:
            classes = (
                " (an image folder's classes are its sub-folders, one per class)"
                if key.endswith("label_column")
                else ""
            )
            raise ConfigError(
                f"{source}: `{key}` applies to `data.source: hf:<owner>/<name>` only, not {data.source!r}: "
                f"set it to null{classes}"
            )


def _check_guidance_is_trained(p: Params, source: str) -> None:
    """Classifier-free guidance mixes the "no class" prediction into every step: label dropout must train
    that embedding row (and leave the class rows some labels), or guidance mixes in untrained weights."""
    dropout = p.train.label_dropout
    if dropout == 1:
        raise ConfigError(
            f'{source}: `train.label_dropout` is 1: every label becomes "no class", so the class embeddings '
            "never train; use a share below 1 (0.1 is the default)"
        )
    guided = {
        "sample.guidance_scale": p.sample.guidance_scale != 1.0,
        "fid.guidance_sweep": any(w != 1.0 for w in p.fid.guidance_sweep),
    }
    for key, is_set in guided.items():
        if dropout == 0 and is_set:
            raise ConfigError(
                f'{source}: `{key}` guides with the "no class" prediction, which `train.label_dropout: 0` '
                "never trains: set `train.label_dropout` above 0 (0.1 is the default), or guidance 1"
            )


UNGUIDED = "values >= 1: StableDiffusionPipeline guides only above 1, so any value below makes 1's images"


def _check_text_to_image(p: Params, source: str) -> None:
    """`model.pretrained` (text-to-image fine-tuning) and captions: what each needs of the rest."""
    m = p.model
    if m.revision is not None and m.kind != "hf":
        raise ConfigError(f"{source}: `model.revision` applies to `model.pretrained: hf:<owner>/<name>` only")
    if m.kind == "hf" and "/" not in m.location:
        raise ConfigError(f"{source}: `model.pretrained` {m.pretrained!r} must name a repository as hf:<owner>/<name>")
    if m.kind == "folder" and os.path.normpath(m.location) != os.path.normpath(m.folder):
        raise ConfigError(
            f"{source}: `model.pretrained` {m.pretrained!r} must read `model.folder` ({m.folder!r}), the folder "
            f"dvc and Snakemake track: set `model.folder: {m.location}` too"
        )
    if p.data.caption_column is not None and p.data.kind == "builtin":
        raise ConfigError(
            f"{source}: `data.caption_column` is set but `data.source` {p.data.source!r} has no captions: "
            "use an hf: dataset with a text column, or an image folder with a metadata.jsonl"
        )
    if m.pretrained is None:
        text_only = {
            "data.holdout": p.data.holdout != 0,
            "train.lora_rank": p.train.lora_rank is not None,
            "sample.prompts": bool(p.sample.prompts),
            "sample.negative_prompt": p.sample.negative_prompt is not None,
        }
        for key, is_set in text_only.items():
            if is_set:
                raise ConfigError(
                    f"{source}: `{key}` applies to text-to-image fine-tuning: set `model.pretrained`, or leave it "
                    "at its default"
                )
        return
    needs = {
        "sample.prompts": (bool(p.sample.prompts), "the grid's prompts (one row each)"),
        "data.caption_column": (p.data.caption_column is not None, "the captions to condition on (e.g. text)"),
        "data.channels": (p.data.channels == 3, "3: the VAE encodes RGB images"),
        "model.class_conditional": (not m.class_conditional, "false: the model is conditioned on captions"),
        "sample.guidance_scale": (p.sample.guidance_scale >= 1, UNGUIDED),
        "fid.guidance_sweep": (all(w >= 1 for w in p.fid.guidance_sweep), UNGUIDED),
    }
    for key, (ok, why) in needs.items():
        if not ok:
            raise ConfigError(f"{source}: `model.pretrained` (text-to-image fine-tuning) needs `{key}`: {why}")
    # what the pretrained pipeline decides: a value here would be accepted and silently not used
    own = {f"scheduler.{k}": v for k, v in dataclasses.asdict(p.scheduler).items() if v != getattr(Scheduler(), k)}
    if p.sample.compile:
        own["sample.compile"] = True
    if own:
        raise ConfigError(
            f"{source}: `model.pretrained` (text-to-image fine-tuning) uses the pipeline's own noise schedule, "
            f"prediction type and eager sampling: remove {', '.join(f'`{k}: {v}`' for k, v in own.items())}"
        )
