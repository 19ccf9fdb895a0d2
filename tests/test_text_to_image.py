"""Text-to-image fine-tuning on a tiny Stable Diffusion pipeline (random weights, tests/tiny_sd.py): the
pretrained pipeline taken safely (a folder, or a model repository through the mirror), captions, the encode
stage's cache and its exactness against encoding on the fly, full and LoRA fine-tunes, bitwise resume, and a
result that diffusers loads and generates from."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from tests.helpers import ROOT, card_snippet, merged
from tests.mirror import SECRET_TOKEN, Dataset, hf_env, secret_free
from tests.tiny_sd import save_tiny_sd
from workflow.core.config import ConfigError, Data, load_params
from workflow.formats import checkpoints
from workflow.formats.base_model import read_base
from workflow.formats.captions import load_captions
from workflow.formats.encodings import load_encodings
from workflow.formats.pipeline import LORA_FILE
from workflow.stages import download, download_model, encode, package, preprocess, sample, train

CAPTIONS = [["the red fox"], ["the cat", "a grey cat and the dog"], ["a dog on the sand"]]
TEXT = {
    "data": {
        "source": "imagefolder:data/images",
        "caption_column": "text",
        "resolution": 16,
        "channels": 3,
        "min_images": 2,
    },
    "model": {"pretrained": "folder:models/local"},
    "train": {
        "batch_size": 4,
        "max_steps": 6,
        "checkpoint_every": 3,
        "log_every": 3,
        "warmup_steps": 0,
        "learning_rate": 1e-3,
        "random_flip": True,
    },
    "sample": {"prompts": ["the cat", "a red fox"], "guidance_scale": 2.0, "grid_size": 2, "batch_size": 4},
    "fid": {"num_samples": 4, "num_reference": 6, "batch_size": 6},
}
UNET = "models/trained/unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


pytestmark = pytest.mark.usefixtures("one_thread")


def captioned_folder(folder: Path, n: int = 6) -> None:
    """`n` RGB images and a metadata.jsonl giving each one or two captions (the Hub's imagefolder convention)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        captions = CAPTIONS[i % len(CAPTIONS)]
        rows.append({"file_name": f"{i:02d}.png", "text": captions if len(captions) > 1 else captions[0]})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def text_params(tiny_params, tiny_sd, tmp_path):
    """Params of a tiny text-to-image run in tmp_path: the tiny pipeline in models/local, six captioned images."""
    shutil.copytree(tiny_sd, tmp_path / "models/local")
    captioned_folder(tmp_path / "data/images")

    def make(**overrides):
        return tiny_params(**merged(TEXT, **overrides))

    return make


def prepared(params):
    """The stages before train, in this process: download, download_model, preprocess, encode."""
    for stage in (download, download_model, preprocess, encode):
        stage.run(params)
    return params


# --- the pretrained pipeline --------------------------------------------------------------------------


def test_the_pretrained_pipeline_is_taken_safetensors_and_default_variant_only(tiny_sd, tmp_path, monkeypatch):
    source = tmp_path / "sd"
    shutil.copytree(tiny_sd, source)
    (source / "unet/diffusion_pytorch_model.bin").write_bytes(b"a pickle that would run code")
    shutil.copyfile(
        source / "unet/diffusion_pytorch_model.safetensors", source / "unet/diffusion_pytorch_model.fp16.safetensors"
    )
    (source / "safety_checker").mkdir()
    (source / "safety_checker/model.safetensors").write_bytes(b"not taken")
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "safety_checker": ["x", "SafetyChecker"]}))
    monkeypatch.chdir(tmp_path)
    from workflow.core.config import params_from_dict

    params = params_from_dict(merged(TEXT, model={"pretrained": "folder:sd", "folder": "sd"}))
    record = download_model.run(params)
    taken = sorted(f["path"] for f in record["files"])
    assert taken == sorted(
        ["model_index.json"]
        + [f"{part}/config.json" for part in ("unet", "vae", "text_encoder")]
        + ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"]
        + ["text_encoder/model.safetensors", "scheduler/scheduler_config.json"]
        + [
            f"tokenizer/{name}"
            for name in ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")
        ]
    )
    assert read_base("models/base") == record and record["class_name"] == "StableDiffusionPipeline"
    written = sorted(p.relative_to("models/base").as_posix() for p in Path("models/base").rglob("*") if p.is_file())
    assert written == sorted([*taken, "BASE.json"])
    assert json.loads(Path("models/base/model_index.json").read_text())["safety_checker"] == [None, None]
    from diffusers import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained("models/base").unet.config.cross_attention_dim == 32

    (source / "unet/diffusion_pytorch_model.safetensors").unlink()
    (source / "unet/diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"unet/ has no safetensors weights .*diffusion_pytorch_model\.bin"):
        download_model.run(params)
    assert read_base("models/base") == record  # the earlier pipeline is left whole
    (source / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ConfigError, match="is a 'StableDiffusionXLPipeline', not a StableDiffusionPipeline"):
        download_model.run(params)


def test_without_a_pretrained_model_the_two_stages_only_say_so(tiny_params):
    params = tiny_params()
    assert download_model.run(params) == {"kind": "none"} and sorted(Path("models/base").iterdir()) == [
        Path("models/base/BASE.json")
    ]
    assert encode.run(params) == {"latent": False}
    assert json.loads(Path("data/processed/latents/ENCODING.json").read_text()) == {"latent": False}


def test_a_model_repository_through_the_mirror_pinned_then_offline(mirror, tiny_sd, tmp_path):
    files = {p.relative_to(tiny_sd).as_posix(): p.read_bytes() for p in tiny_sd.rglob("*") if p.is_file()}
    files["unet/diffusion_pytorch_model.bin"] = b"never fetched"
    repo = Dataset.create(mirror, "org/tiny-sd", files, kind="models")
    work = tmp_path / "w"
    work.mkdir()
    (work / "params.yaml").write_text(json.dumps(merged(TEXT, model={"pretrained": "hf:org/tiny-sd"})))
    env = hf_env(mirror, tmp_path / "hf")
    mark = mirror.mark()
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "download_model"], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    base = read_base(work / "models/base")
    assert base["kind"] == "hf" and base["sha"] == repo.head and base["endpoint"] == mirror.endpoint.split("//")[1]
    fetched = {
        path.split("/resolve/", 1)[1].split("/", 1)[1]
        for m, path, _ in mirror.requests(mark)
        if "/resolve/" in path and m == "GET"
    }
    assert fetched and not any(name.endswith(".bin") for name in fetched)  # a pickle is never downloaded
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert f"at {repo.head} from" in done.stdout

    # pinned to the recorded sha, offline: served from the Hugging Face cache, the same bytes
    pinned = {"pretrained": "hf:org/tiny-sd", "revision": repo.head}
    (work / "params.yaml").write_text(json.dumps(merged(TEXT, model=pinned)))
    shutil.rmtree(work / "models/base")
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    mark = mirror.mark()
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "download_model"], cwd=work, env=offline, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert read_base(work / "models/base")["files"] == base["files"]
    assert mirror.requests(mark) == []  # the mirror is up, and was not asked anything

    (work / "params.yaml").write_text(json.dumps(merged(TEXT, model={"pretrained": "hf:org/no-such-model"})))
    done = subprocess.run(
        [sys.executable, "-m", "workflow", "download_model"], cwd=work, env=env, capture_output=True, text=True
    )
    assert done.returncode == 1 and "`model.pretrained` 'hf:org/no-such-model': model not found at" in done.stderr


# --- captions -----------------------------------------------------------------------------------------


def test_captions_come_from_metadata_jsonl_in_image_order(text_params):
    params = text_params(data={"max_images": 4})
    download.run(params)
    meta = preprocess.run(params)
    chosen = [Path(f["path"]).name for f in json.loads(Path("data/raw/SOURCE.json").read_text())["files"]]
    assert meta["count"] == 4 and meta["captions"] == sum(len(c) for c in load_captions(params.paths.captions))
    kept = [int(name[:2]) for name in sorted(chosen)]
    subset = preprocess.select_subset(kept, 4, params.seed)
    assert load_captions(params.paths.captions) == [CAPTIONS[i % 3] for i in subset]


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ({"file_name": "01.png", "text": ""}, ["metadata.jsonl line 2 (01.png)", "missing or empty"]),
        ({"file_name": "01.png", "text": ["ok", " "]}, ["metadata.jsonl line 2 (01.png)", "missing or empty"]),
        ({"file_name": "01.png"}, ["metadata.jsonl line 2 (01.png)", "`data.caption_column` 'text'"]),
        ({"name": "01.png", "text": "x"}, ["metadata.jsonl line 2: no `file_name`"]),
    ],
)
def test_a_missing_or_empty_caption_names_the_file(text_params, line, words):
    params = text_params()
    lines = Path("data/images/metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps(line)
    Path("data/images/metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as error:
        download.run(params)
    assert all(word in str(error.value) for word in words), error.value
    assert not Path("data/raw").exists()  # nothing half-written


def test_an_image_without_a_metadata_line_is_named(text_params):
    params = text_params()
    lines = Path("data/images/metadata.jsonl").read_text().splitlines()
    Path("data/images/metadata.jsonl").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(
        ConfigError, match=r"image 03.png has no caption: no line of a metadata.jsonl names it \(1 of 6"
    ):
        download.run(params)


def test_a_parquet_caption_column_with_several_captions_per_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.mirror import png
    from workflow.sources import fetch

    snapshot, out = tmp_path / "snap", tmp_path / "out"
    (snapshot / "data").mkdir(parents=True)
    out.mkdir()
    cells = [{"bytes": png(i), "path": None} for i in range(3)]
    table = pa.table({"image": cells, "text": ["one", "two", "three"], "many": [["a", "b"], ["c"], []]})
    pq.write_table(table, snapshot / "data/train.parquet")
    data = Data(source="hf:o/d", caption_column="text")
    count, _, _, captions = fetch.export_parquet([snapshot / "data/train.parquet"], snapshot, data, out)
    assert count == 3 and captions == {f"data/train/{i:06d}.png": [t] for i, t in enumerate(["one", "two", "three"])}
    with pytest.raises(ConfigError, match=r"hf:o/d: data/train.parquet row 2: `data.caption_column` 'many' is missing"):
        fetch.export_parquet(
            [snapshot / "data/train.parquet"], snapshot, Data(source="hf:o/d", caption_column="many"), out
        )


# --- the encode stage and training from it -----------------------------------------------------------


def test_the_cached_step_equals_the_step_that_encodes_on_the_fly(text_params):
    """For the same noise, timesteps, flips and caption picks, the loss and gradients of a training step
    from the encode stage's cache equal those of the reference's way: VAE and text encoder every step."""
    from workflow.maths.diffusion import latent_draws, pick_captions, step_noise
    from workflow.stages.train import latent_batch, make_accelerator, setup, step_loss

    params = prepared(text_params(encode={"storage": "float32"}))  # the encoders' output exactly
    encoded = load_encodings(params.paths.latents)
    assert encoded.record["views"] == 2 and encoded.mean.shape == (6, 2, 4, 8, 8) and encoded.text.shape == (8, 16, 32)
    training = setup(params, None, make_accelerator(params), encoded=encoded)
    # trained from the files' pages, as the ranks of one machine share them, not from a copy in each
    cache = training.latents
    for name in ("mean", "logvar", "text", "offsets"):
        assert getattr(cache, name).data_ptr() == getattr(encoded, name).ctypes.data, name
    assert training.model.training  # from_pretrained leaves eval mode; dropout must act as the reference's
    index = torch.tensor([5, 0, 3, 1])
    noise, timesteps, flip = step_noise(params.seed, 0, (4, 4, 8, 8), 1000, torch.device("cpu"))
    draws = latent_draws(params.seed, 0, (4, 4, 8, 8), torch.device("cpu"))
    assert flip.any() and not flip.all()  # both views are exercised

    def loss_and_grads(clean, condition):
        training.model.zero_grad()
        loss = step_loss(training, clean, noise, timesteps, condition)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in training.model.parameters()]

    cached = loss_and_grads(*latent_batch(training, index, flip, draws, torch.device("cpu")))

    # the reference's way, written with diffusers and transformers alone (not this project's encoders):
    # latents = vae.encode(pixels).latent_dist.sample() * scaling_factor, whose sample() is mean + std * noise
    # (the noise here: the step's own draws), and text_encoder(max-length-padded token ids)[0]
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(params.paths.base_model, subfolder="vae").eval()
    tokenizer = CLIPTokenizer.from_pretrained(params.paths.base_model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(params.paths.base_model, subfolder="text_encoder").eval()
    images = torch.from_numpy(np.load(params.paths.images))[index].float()
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    with torch.no_grad():
        dist = vae.encode(images / 127.5 - 1).latent_dist
        latents = (dist.mean + dist.std * draws[0]) * vae.config.scaling_factor
        captions = [c for image in load_captions(params.paths.captions) for c in image]
        rows = pick_captions(torch.from_numpy(np.array(encoded.offsets)), index, draws[1])
        ids = tokenizer(
            [captions[r] for r in rows],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = text_encoder(ids)[0]
    on_the_fly = loss_and_grads(latents, {"encoder_hidden_states": hidden})

    torch.testing.assert_close(cached[0], on_the_fly[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(cached[1], on_the_fly[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_default_float16_cache_is_the_float32_one_rounded_and_trains_alike(text_params):
    """encode.storage float16 (the default) stores exactly the float32 output rounded to float16, in half
    the bytes; a training step from it matches the float32 cache's to float16's precision."""
    from workflow.maths.diffusion import latent_draws, step_noise
    from workflow.stages.train import latent_batch, make_accelerator, setup, step_loss

    exact = prepared(text_params(encode={"storage": "float32"}))
    shutil.copytree(exact.paths.latents, "latents-float32")
    half = text_params()
    assert half.encode.storage == "float16"
    encode.run(half)
    wide, narrow = load_encodings("latents-float32"), load_encodings(half.paths.latents)
    assert narrow.record["storage"] == "float16" and wide.record["storage"] == "float32"
    for name in ("mean", "logvar", "text"):
        stored, full = getattr(narrow, name), getattr(wide, name)
        assert stored.dtype == np.float16 and np.array_equal(stored, full.astype(np.float16)), name
        sizes = [Path(folder, f"{name}.npy").stat().st_size for folder in (half.paths.latents, "latents-float32")]
        assert sizes[0] < 0.51 * sizes[1]
    assert np.array_equal(narrow.offsets, wide.offsets)

    index = torch.tensor([5, 0, 3, 1])
    noise, timesteps, flip = step_noise(half.seed, 0, (4, 4, 8, 8), 1000, torch.device("cpu"))
    draws = latent_draws(half.seed, 0, (4, 4, 8, 8), torch.device("cpu"))
    losses = []
    for encoded in (wide, narrow):
        training = setup(half, None, make_accelerator(half), encoded=encoded)
        clean, condition = latent_batch(training, index, flip, draws, torch.device("cpu"))
        assert clean.dtype == condition["encoder_hidden_states"].dtype == torch.float32
        with torch.no_grad():
            losses.append(step_loss(training, clean, noise, timesteps, condition))
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=0)


def test_a_value_beyond_float16_is_refused_naming_encode_storage(text_params, tmp_path):
    """A VAE whose latents exceed float16's range (its quant_conv bias set to 1e5 here) cannot be cached in
    float16: the stage says so and publishes nothing; float32 storage takes it."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "models/local/vae")
    with torch.no_grad():
        vae.quant_conv.bias[:4] = 1e5  # the mean's channels
    vae.save_pretrained(tmp_path / "models/local/vae")
    params = text_params()
    with pytest.raises(ConfigError, match=r"latent mean values reach 1e\+05.*`encode.storage: float32`"):
        prepared(params)
    assert not Path(params.paths.latents).exists()
    prepared(text_params(encode={"storage": "float32"}))
    assert load_encodings(params.paths.latents).mean.max() > 65504


def test_encode_records_the_hashes_of_the_files_it_encoded_not_of_their_replacements(text_params):
    """The images and captions are hashed before they are read: replaced while the encoders run (at their
    first real forward pass here), the record names the files encoded, so train sees the change and asks for
    a re-run instead of taking stale latents under the new files' hashes."""
    from workflow.core.artifacts import sha256_file
    from workflow.formats.training_images import load_images, write_images

    params = text_params()
    for stage in (download, download_model, preprocess):
        stage.run(params)
    paths = params.paths
    encoded = {"images": sha256_file(paths.images), "captions": sha256_file(paths.captions)}
    replaced = []

    def replace_inputs(module, args):
        if not replaced and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "meta":
            write_images(paths.images, 255 - np.asarray(load_images(paths.images)))
            Path(paths.captions).write_text(Path(paths.captions).read_text().replace("fox", "wolf"))
            replaced.append(True)

    hook = torch.nn.modules.module.register_module_forward_pre_hook(replace_inputs)
    try:
        record = encode.run(params)
    finally:
        hook.remove()
    assert replaced
    assert record["images_sha256"] == encoded["images"] != sha256_file(paths.images)
    assert record["captions_sha256"] == encoded["captions"] != sha256_file(paths.captions)


def test_an_encode_batch_over_its_cap_is_refused_before_the_encoders_load(text_params):
    """Measured on meta-device copies built from the configs (a real CPU pass counts the same): the VAE's
    weights are not even needed to refuse."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig

    from workflow.models.latent import encode_images, encode_peak_bytes, load_encoders
    from workflow.models.memory import PeakBytes

    params = text_params(encode={"batch_size": 8})
    for stage in (download, download_model, preprocess):
        stage.run(params)
    base = params.paths.base_model
    vae_config = AutoencoderKL.load_config(base, subfolder="vae")
    text_config = CLIPTextConfig.from_pretrained(base, subfolder="text_encoder")
    peaks = encode_peak_bytes(vae_config, text_config, 8, 16, views=2)
    encoders = load_encoders(base, torch.device("cpu"))
    with torch.inference_mode(), PeakBytes() as vae:
        pixels = torch.zeros(8, 3, 16, 16)
        encode_images(encoders.vae, pixels.flip(-1))
    with torch.inference_mode(), PeakBytes() as text:
        encoders.text_encoder(torch.zeros(8, text_config.max_position_embeddings, dtype=torch.long))
    assert peaks == {"vae": vae.peak, "text_encoder": text.peak} and vae.peak > text.peak > 0
    cap = peaks["vae"] / 2 / 2**30
    Path(base, "vae/diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(
        ConfigError,
        match=r"`encode.batch_size` \(8\) images at `data.resolution` 16 and their mirror images "
        r"\(`train.random_flip`\) in the VAE encoder of .* over `encode.max_activation_gib`.*lower `encode.batch_size`",
    ):
        encode.run(text_params(encode={"batch_size": 8, "max_activation_gib": cap}))
    assert not Path(params.paths.latents).exists()


@pytest.mark.parametrize("preset", ["text-to-image-naruto-512.yaml", "text-to-image-naruto-lora-512.yaml"])
def test_the_text_to_image_presets_encode_within_the_cap_and_the_bound_does_not(preset):
    """SD 1.5's VAE encoder at 512 px holds 0.63 GiB an image: the presets' 32 flipped images about 20 GiB, the
    bound's 4,096 about 2.5 TiB."""
    from workflow.models.latent import encode_peak_bytes
    from workflow.tools.random_pipeline import clip_vocabulary, components

    params = load_params(ROOT / "configs" / preset)
    with torch.device("meta"):
        parts = components("sd15", clip_vocabulary())
    configs = parts["vae"].config, parts["text_encoder"].config
    views = 2 if params.train.random_flip else 1
    peaks = encode_peak_bytes(*configs, params.encode.batch_size, params.data.resolution, views)
    assert 15 < max(peaks.values()) / 2**30 < params.encode.max_activation_gib
    bound = encode_peak_bytes(*configs, 4096, params.data.resolution, views)
    assert bound["vae"] / 2**30 > 50 * params.encode.max_activation_gib  # 2.5 TiB


def test_a_full_fine_tune_resumes_bitwise_and_loads_as_a_stable_diffusion_pipeline(text_params):
    from diffusers import StableDiffusionPipeline

    params = prepared(text_params())
    info = train.run(params)
    assert info["steps"] == 6 and info["trainable_parameters"] == info["num_parameters"]
    assert sorted(p.name for p in Path(params.paths.train_log, "grids").iterdir()) == [
        "step-0000003.png",
        "step-0000006.png",
    ]
    straight = load_file(UNET)
    base = load_file("models/base/unet/diffusion_pytorch_model.safetensors")
    assert any(not np.array_equal(straight[k], base[k]) for k in base)  # it trained

    run_dir = next(Path(params.paths.checkpoints).iterdir())
    shutil.rmtree(run_dir / "step-0000006")
    shutil.rmtree(params.paths.trained)
    assert train.run(params)["resumed_from_step"] == 3
    resumed = load_file(UNET)
    assert all(np.array_equal(resumed[k], straight[k]) for k in straight)

    pipe = StableDiffusionPipeline.from_pretrained(params.paths.trained)
    image = pipe("the cat", height=16, width=16, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_lora_saves_only_the_adapter_which_loads_onto_the_pretrained_pipeline(text_params):
    from diffusers import StableDiffusionPipeline

    params = prepared(text_params(train={"lora_rank": 4}))
    info = train.run(params)
    assert 0 < info["trainable_parameters"] < info["num_parameters"] / 10
    assert sorted(p.name for p in Path(params.paths.trained).iterdir()) == ["manifest.json", LORA_FILE]

    def generate(pipe):
        out = pipe(
            "the cat",
            height=16,
            width=16,
            num_inference_steps=2,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        )
        return out.images

    pipe = StableDiffusionPipeline.from_pretrained(params.paths.base_model)
    before = generate(pipe)
    pipe.load_lora_weights(params.paths.trained)
    assert not np.array_equal(generate(pipe), before)  # the adapter changes what the pipeline makes

    run_dir = next(Path(params.paths.checkpoints).iterdir())
    assert checkpoints.latest_checkpoint(run_dir).name == "step-0000006"

    # the saved adapter is the trained one: the final checkpoint's EMA weights, in memory, compute what the
    # pretrained UNet with the adapter loaded back from models/trained computes
    from workflow.formats.pipeline import load_finetuned_unet
    from workflow.stages.train import ema_weights, make_accelerator, resume, setup

    encoded = load_encodings(params.paths.latents)
    training = setup(params, None, make_accelerator(params), encoded=encoded)
    assert resume(training, run_dir) is not None
    unet = training.accelerator.unwrap_model(training.eager_model)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 16, 32, generator=g)
    with ema_weights(training, unet), torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=text).sample
    loaded = load_finetuned_unet(params.paths.trained, params.paths.base_model, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=text).sample, expected, rtol=1e-5, atol=1e-6)
    assert sample.run(params)["count"] == 4  # the sample stage puts the adapter on the pretrained UNet itself
    from workflow.stages import evaluate, fid_reference

    for stage in (fid_reference, evaluate, package):
        stage.run(params)
    card = Path(params.paths.pipeline, "README.md").read_text()
    assert sorted(p.name for p in Path(params.paths.pipeline).iterdir()) == sorted(
        ["README.md", LORA_FILE, "manifest.json", "samples.png"]
    )
    code = card_snippet(card.split("\n---\n", 1)[1])
    assert (
        "pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, clip_sample=False, "
        "timestep_spacing='leading')" in code
    )
    assert ", eta=1.0)" in code  # the evaluated sampler's eta (diffusers' call defaults to 0)
    namespace: dict = {}
    exec(code, namespace)  # the card's lines: the pretrained pipeline, this adapter, the evaluated sampler
    assert len(namespace["images"]) == params.sample.grid_size


def test_a_compiled_lora_run_saves_an_adapter_that_loads(text_params):
    """accelerate's unwrap_model keeps the torch.compile wrapper: an adapter taken from it has keys under
    _orig_mod., which load_lora_weights cannot place on a UNet."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file as load_tensors

    params = prepared(text_params(train={"lora_rank": 4, "compile": True, "max_steps": 2, "progress_grids": False}))
    info = train.run(params)
    assert info["compiled"] is True  # compiled, not fallen back to eager
    keys = list(load_tensors(Path(params.paths.trained, LORA_FILE)))
    assert keys and not any("_orig_mod" in k for k in keys)
    pipe = StableDiffusionPipeline.from_pretrained(params.paths.base_model)
    pipe.load_lora_weights(params.paths.trained)
    assert len(pipe.get_list_adapters()["unet"]) == 1


def test_held_out_images_leave_training_and_are_what_fid_scores(text_params):
    """data.holdout: two images (seeded) leave the training set with their captions; the FID reference is
    theirs and the sample set is generated from their captions."""
    from workflow.stages import fid_reference

    params = text_params(data={"holdout": 2}, fid={"num_reference": None})
    download.run(params)
    meta = preprocess.run(params)
    training, held = np.load(params.paths.images), np.load(params.paths.holdout_images)
    assert meta["count"] == 4 and meta["holdout"] == 2 and len(training) == 4 and len(held) == 2  # count: training
    everything = {image.tobytes() for image in np.concatenate([training, held])}
    assert len(everything) == 6  # a partition: no image in both
    captions, held_captions = load_captions(params.paths.captions), load_captions(params.paths.holdout_captions)
    assert len(captions) == 4 and len(held_captions) == 2
    assert sorted(map(str, captions + held_captions)) == sorted(str(CAPTIONS[i % 3]) for i in range(6))
    assert int(fid_reference.run(params)["num_images"]) == 2
    with pytest.raises(ConfigError, match=r"`data.holdout` \(5\) leaves 1 of the 6 usable images for training"):
        preprocess.run(text_params(data={"holdout": 5}))
    from workflow.core.config import params_from_dict

    with pytest.raises(ConfigError, match="`data.holdout` applies to text-to-image fine-tuning"):
        params_from_dict({"data": {"holdout": 1}})


@pytest.mark.parametrize(
    "override, named",
    [
        ({"scheduler": {"prediction_type": "v_prediction"}}, "`scheduler.prediction_type: v_prediction`"),
        ({"scheduler": {"num_train_timesteps": 500}}, "`scheduler.num_train_timesteps: 500`"),
        ({"sample": {"compile": True}}, "`sample.compile: True`"),
    ],
)
def test_what_the_pretrained_pipeline_decides_is_refused_not_ignored(text_params, override, named):
    """Training and sampling take the pipeline's own scheduler and run it eagerly: a value set here would
    change the run key (a retrain from scratch) and nothing else."""
    text_params()  # the defaults pass
    with pytest.raises(ConfigError, match="uses the pipeline's own noise schedule.*" + named.replace(".", r"\.")):
        text_params(**override)


def test_sample_and_package_a_fine_tune(text_params):
    sweeps = {"num_reference": None, "steps_sweep": [4], "guidance_sweep": [2.0]}
    params = prepared(text_params(train={"progress_grids": False}, data={"holdout": 2}, fid=sweeps))
    train.run(params)
    record = sample.run(params)
    held = load_captions(params.paths.holdout_captions)
    assert record["prompts"] == [held[i % 2][0] for i in range(4)] and record["count"] == 4
    assert record["prompts_from"] == "held-out images"
    grid = Image.open(params.paths.grid)
    assert grid.height == 2 * 16 + 3 * 2 and grid.width > 2 * 16 + 3 * 2  # two rows of two, labelled on the left
    from workflow.stages import evaluate, fid_reference, fid_sweep, report

    for stage in (fid_reference, evaluate, fid_sweep, report):
        stage.run(params)
    fid = json.loads(Path(params.paths.metrics).read_text())["fid"]
    for path in (params.paths.fid_steps, params.paths.fid_guidance):  # each sweep point at the run's own
        (row,) = list(csv.DictReader(Path(path).read_text().splitlines()))  # settings: the sample stage's set
        assert float(row["fid"]) == pytest.approx(fid, rel=1e-5), path  # the CSV keeps 6 digits
    info = package.run(params)
    assert info["class"] == "StableDiffusionPipeline"
    card = Path(params.paths.pipeline, "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "fine-tuned (its whole UNet" in card and "models/local" in card
    assert "4 samples vs 2 held-out images" in card and "| held-out images |" in card
    namespace: dict = {}
    exec(card_snippet(card.split("\n---\n", 1)[1]), namespace)  # the card's own lines load it and generate
    assert len(namespace["images"]) == params.sample.grid_size
    index = json.loads(Path(params.paths.pipeline, "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]  # the sampler the evaluation used


def test_sampling_decodes_a_batch_an_image_at_a_time(tiny_sd):
    """The sample stage's and the progress grids' pipeline slices its VAE decode (250 images at 512 px in
    one call need tens of GB). The images are the whole batch's decode to float rounding (a convolution
    over one image rounds differently from one over four: measured 3e-6 at most), so a pixel may move by
    one level where its value sits on a rounding boundary."""
    from workflow.core.config import Sample
    from workflow.models.builders import load_pretrained_unet
    from workflow.models.text_sampling import prompt_batches, text_pipeline

    settings = Sample(sampler="ddim", num_inference_steps=2, guidance_scale=2.0, batch_size=4)
    pipe = text_pipeline(tiny_sd, load_pretrained_unet(tiny_sd), settings, torch.device("cpu"))
    assert pipe.vae.use_slicing

    def images():
        batches = prompt_batches(pipe, ["the cat", "a red fox", "a dog", "the sand"], settings, 0, 16, progress=False)
        return np.concatenate([images for _, images in batches]).astype(int)

    sliced = images()
    pipe.vae.disable_slicing()
    assert sliced.shape == (4, 16, 16, 3) and np.abs(sliced - images()).max() <= 1
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = pipe.vae.decode(latents).sample
        pipe.vae.enable_slicing()
        assert torch.allclose(whole, pipe.vae.decode(latents).sample, rtol=0, atol=1e-5)


def test_a_text_batch_is_held_to_the_sampling_cap_guided_twice(tiny_sd):
    """The UNet's pass over the latents and the caption embeddings, both halves when guidance is on."""
    from workflow.core.config import Sample
    from workflow.models.builders import load_pretrained_unet, sampling_peak_bytes
    from workflow.models.text_sampling import prompt_batches, text_pipeline

    unet, prompts = load_pretrained_unet(tiny_sd), ["the cat", "a red fox", "a dog", "the sand"]
    pipe = text_pipeline(tiny_sd, unet, Sample(), torch.device("cpu"))
    latent = (unet.config.in_channels, 16 // pipe.vae_scale_factor, 16 // pipe.vae_scale_factor)
    text = (pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)  # the padded caption embeddings
    cap = sampling_peak_bytes(unet, 4, latent, text) / 2**30
    assert sampling_peak_bytes(unet, 8, latent, text) / 2**30 > cap
    for guidance in (1.0, 2.0):
        settings = Sample(num_inference_steps=2, guidance_scale=guidance, batch_size=4, max_activation_gib=cap)
        if guidance > 1:
            with pytest.raises(ConfigError, match=r"runs the UNet on 8 inputs \(twice the images"):
                prompt_batches(pipe, prompts, settings, 0, 16, progress=False)
        else:
            prompt_batches(pipe, prompts, settings, 0, 16, progress=False)


# --- the whole DAG, under both orchestrators, through the mirror ----------------------------------------


def captioned_parquet(n: int) -> bytes:
    """A parquet shard as `datasets` writes an Image feature, with a `text` column: naruto-blip-captions' layout."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.mirror import png

    cells = [{"bytes": png(100 + i, (20, 20)), "path": None} for i in range(n)]
    texts = [CAPTIONS[i % len(CAPTIONS)][0] for i in range(n)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": cells, "text": texts}), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def text_repos(mirror, tiny_sd):
    """The tiny pipeline as a model repository and a captioned parquet dataset, both on the mirror."""
    files = {p.relative_to(tiny_sd).as_posix(): p.read_bytes() for p in tiny_sd.rglob("*") if p.is_file()}
    model = Dataset.create(mirror, "org/tiny-sd-dag", files, kind="models")
    data = Dataset.create(mirror, "org/captioned", {"data/train-00000-of-00001.parquet": captioned_parquet(8)})
    return model, data


E2E = merged(
    TEXT,
    data={"source": "hf:org/captioned", "max_images": None},
    model={"pretrained": "hf:org/tiny-sd-dag"},
    train={"max_steps": 4, "checkpoint_every": 2, "log_every": 2},
    cluster={"gpu": False},
)


def test_the_text_to_image_dag_under_dvc_and_snakemake(mirror, text_repos, tmp_path):
    """`dvc repro` and `snakemake --cores 2`, side by side, run the whole DAG through the mirror with a token set,
    to the same bytes; provenance reaches the records, the report and the card, the token no file; an
    up-to-date download asks the mirror nothing; a new learning rate re-runs train and what follows, not encode."""
    import yaml

    from tests.helpers import card_parts, make_repo, repo_env

    model, data = text_repos
    repos = {"dvc": make_repo(tmp_path / "dvc", **E2E), "snakemake": make_repo(tmp_path / "smk", **E2E)}
    envs = {
        name: repo_env(
            HF_ENDPOINT=mirror.endpoint,
            HF_HOME=str(tmp_path / f"hf-{name}"),
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_TOKEN=SECRET_TOKEN,
        )
        for name in repos
    }
    commands = {"dvc": ["dvc", "repro"], "snakemake": ["snakemake", "--cores", "2"]}
    runs = {
        name: subprocess.Popen(
            commands[name], cwd=repos[name], env=envs[name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name in repos
    }  # side by side: their stages are mostly one core each (imports, dvc's own work)
    for name, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}:\n{out[-3000:]}\n{err[-5000:]}"
    dvc, smk = repos["dvc"], repos["snakemake"]
    for repo in (dvc, smk):
        assert read_base(repo / "models/base")["sha"] == model.head
        source = json.loads((repo / "data/raw/SOURCE.json").read_text())
        assert source["sha"] == data.head and source["endpoint"] == f"127.0.0.1:{mirror.port}"
        report = (repo / "reports/index.html").read_text()
        assert data.head in report  # provenance in the report
        meta, _ = card_parts((repo / "models/pipeline/README.md").read_text())
        assert meta["base_model"] == "org/tiny-sd-dag" and meta["datasets"] == ["org/captioned"]
        (result,) = meta["model-index"][0]["results"]
        assert result["dataset"]["revision"] == data.head and result["task"]["type"] == "text-to-image"
        secret_free(repo, tmp_path / f"hf-{'dvc' if repo == dvc else 'snakemake'}")  # no record, log or cache
    for name in ("data/processed/latents/mean.npy", "data/processed/latents/text.npy", UNET):
        assert (dvc / name).read_bytes() == (smk / name).read_bytes(), name
    metrics = [json.loads((repo / "reports/metrics.json").read_text()) for repo in (dvc, smk)]
    assert metrics[0]["fid"] == metrics[1]["fid"]

    def dvc_says(*args):
        done = subprocess.run(["dvc", *args], cwd=dvc, env=envs["dvc"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    mark = mirror.mark()
    assert "didn't change, skipping" in dvc_says("repro", "download_model")
    assert mirror.requests(mark) == []  # up to date: dvc did not even start the stage
    params = yaml.safe_load((dvc / "params.yaml").read_text())
    params["train"]["learning_rate"] = 5e-4
    (dvc / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = {line.split("'")[1] for line in dvc_says("repro", "--dry").splitlines() if line.startswith("Running stage")}
    assert "train" in ran and not ran & {"download", "download_model", "preprocess", "encode", "fid_reference"}


def test_the_encode_benchmark_times_both_loops_side_by_side(tiny_params, capsys):
    from workflow.tools import bench

    tiny_params()  # params.yaml in the working directory: the bench's base params
    argv = ["encode", "--random", "tiny", "--resolution", "16", "--batch-size", "4", "--images", "8"]
    bench.main([*argv, "--steps", "2", "--warmup", "1", "--repeats", "2", "--lora-rank", "4", "--json", "b.json"])
    r = json.loads(Path("b.json").read_text())
    assert len(r["cache_trials"]) == len(r["on_the_fly_trials"]) == 2
    assert r["cache_images_per_second"] == max(r["cache_trials"]) > 0 and r["on_the_fly_images_per_second"] > 0
    assert r["ratio"] == pytest.approx(r["cache_images_per_second"] / r["on_the_fly_images_per_second"])
    assert r["latent_shape"] == [4, 8, 8] and 0 < r["trainable_parameters"] < r["unet_parameters"]
    out = capsys.readouterr().out
    assert "cache / on the fly:" in out and r["command"] in out and r["pipeline"].endswith("random-tiny")
    assert not Path(r["pipeline"]).exists()  # the random pipeline lived in a scratch folder


def test_the_random_sd15_pipeline_has_stable_diffusion_1_5s_shapes():
    """What `bench encode --random sd15` times: SD 1.5's published parameter counts, built on the meta device."""
    from workflow.tools.random_pipeline import clip_vocabulary, components

    with torch.device("meta"):
        parts = components("sd15", clip_vocabulary())
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.mark.parametrize("preset", ["text-to-image-naruto-512.yaml", "text-to-image-naruto-lora-512.yaml"])
def test_the_text_to_image_presets_sample_within_the_cap(preset):
    """SD 1.5's UNet at 512 px (64 x 64 latents, 77 x 768 caption embeddings), guided: both halves."""
    from workflow.models.builders import sampling_peak_bytes
    from workflow.tools.random_pipeline import clip_vocabulary, components

    params = load_params(ROOT / "configs" / preset)
    with torch.device("meta"):
        unet = components("sd15", clip_vocabulary())["unet"]
    latent = params.data.resolution // 8
    batch = params.sample.batch_size * (2 if params.sample.guidance_scale > 1 else 1)
    gib = sampling_peak_bytes(unet, batch, (4, latent, latent), (77, 768)) / 2**30
    assert gib > 0.1 and gib * 10 < params.sample.max_activation_gib
