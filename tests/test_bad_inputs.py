"""Bad datasets: every kind of broken, odd or hostile file is either used correctly or skipped with its
reason in meta.json; too few usable images is one clear error; dataset file names never choose where
we write (path traversal)."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from workflow.core.config import ConfigError, Data, load_params
from workflow.sources import fetch
from workflow.stages import download, preprocess

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("RGB", (6, 6), BLUE).convert("P")
    return encoded(image, "PNG", transparency=0)


# file name -> (bytes, expected RGB colour if it must be used, or the reason's start if it must be skipped)
CASES = {
    "cmyk.jpg": (encoded(Image.new("RGB", (12, 12), RED).convert("CMYK"), "JPEG", quality=100), RED),
    "palette.png": (palette_with_transparency(), BLUE),
    "gray-alpha.png": (encoded(Image.new("LA", (8, 8), (255, 90)), "PNG"), (255, 255, 255)),
    "rgba.png": (encoded(Image.new("RGBA", (8, 8), (*GREEN, 10)), "PNG"), GREEN),
    "deep16.png": (encoded(Image.fromarray(np.full((8, 8), 0xFF00, np.uint16)), "PNG"), (255, 255, 255)),
    "one-pixel.png": (encoded(Image.new("RGB", (1, 1), GREEN), "PNG"), GREEN),
    "a/same.png": (encoded(Image.new("RGB", (8, 8), RED), "PNG"), RED),  # duplicate base names
    "b/same.png": (encoded(Image.new("RGB", (8, 8), BLUE), "PNG"), BLUE),
    "ünïcødé/猫 cat.png": (encoded(Image.new("RGB", (8, 8), GREEN), "PNG"), GREEN),
    "zero-bytes.png": (b"", "UnidentifiedImageError"),
    "text-named.png": (b"just some text, not an image", "UnidentifiedImageError"),
    "corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "UnidentifiedImageError"),
    "truncated.png": (None, "OSError: image file is truncated"),
    "bomb.png": (header_only_png(30000, 30000), "DecompressionBombError"),
    "nearly-bomb.png": (header_only_png(12000, 12000), "DecompressionBombWarning"),
    "labels.csv": (b"file,label\n", "not an image file name: .csv"),
}


@pytest.fixture
def bad_folder(tmp_path, monkeypatch):
    """An imagefolder with every case, and params reading it (3 channels, 8 px)."""
    src = tmp_path / "src"
    noise = encoded(Image.effect_noise((64, 64), 60).convert("RGB"), "PNG")
    for name, (data, _) in CASES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(noise[: len(noise) // 2] if data is None else data)
    monkeypatch.chdir(tmp_path)

    def params(**data):
        values = {"source": f"imagefolder:{src}", "folder": str(src), "channels": 3, "resolution": 8, **data}
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": values}))

    return params


def test_each_bad_file_is_used_correctly_or_skipped_with_its_reason(bad_folder):
    bad_folder(min_images=1)
    download.run(load_params("params.yaml"))
    meta = preprocess.run(load_params("params.yaml"))
    used = sorted(n for n, (_, want) in CASES.items() if isinstance(want, tuple))
    order = sorted(used, key=lambda n: n)  # files are decoded in relative-path order
    array = np.load("data/processed/images.npy")
    assert meta["count"] == len(used) == len(array)
    for name, image in zip(order, array, strict=True):
        expected = np.array(CASES[name][1])[:, None, None]
        assert np.abs(image.astype(int) - expected).max() <= 6, name  # JPEG and CMYK round trips: near
    reasons = {item["file"]: item["reason"] for item in meta["skipped"]}
    assert set(reasons) == {n for n, (_, want) in CASES.items() if isinstance(want, str)}
    for name, reason in reasons.items():
        assert reason.startswith(CASES[name][1]) or CASES[name][1] in reason, (name, reason)
    assert json.loads(Path("data/processed/meta.json").read_text()) == meta


def test_too_few_usable_images_names_the_count_and_the_commonest_reasons(bad_folder):
    bad_folder(min_images=10)
    download.run(load_params("params.yaml"))
    with pytest.raises(ConfigError) as error:
        preprocess.run(load_params("params.yaml"))
    message = str(error.value)
    assert "`data.min_images` is 10 but only 9 usable images" in message and "7 files skipped" in message
    assert "UnidentifiedImageError: 3" in message  # the commonest reason first
    assert not list(Path("data/processed").iterdir())  # nothing half made: the folder decoded in is empty


def test_parquet_path_column_cannot_choose_where_images_go(tmp_path):
    """A hostile `path` in the image struct (`../../evil.png`, an absolute path) is never used as a name."""
    snapshot, out = tmp_path / "snap", tmp_path / "raw" / "images"
    (snapshot / "data").mkdir(parents=True)
    png = encoded(Image.new("RGB", (4, 4), RED), "PNG")
    rows = [{"bytes": png, "path": "../../evil.png"}, {"bytes": png, "path": str(tmp_path / "abs-evil.png")}]
    shard = snapshot / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": rows}), shard)
    count, skipped, labels, _ = fetch.export_parquet([shard], snapshot, Data(source="hf:org/evil"), out)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert count == 2 and skipped == [] and labels is None
    assert written == [
        "raw/images/data/train-00000-of-00001/000000.png",
        "raw/images/data/train-00000-of-00001/000001.png",
    ]


@pytest.mark.parametrize("name", ["../../evil.png", "sub/../../evil.png", "/tmp/evil.png"])
def test_a_file_name_that_escapes_the_raw_folder_is_refused(tmp_path, name):
    root, images = tmp_path / "snapshot", tmp_path / "raw" / "images"
    images.mkdir(parents=True)
    hostile = Path(name) if name.startswith("/") else root / name  # as a file list could name it
    with pytest.raises(ConfigError, match="points outside .*refused"):
        fetch.copy_images([hostile], root, images)
    with pytest.raises(ConfigError, match="points outside"):
        fetch.inside(images, name)
    assert fetch.inside(images, "a/b.png") == images / "a" / "b.png"
    assert list(tmp_path.rglob("evil.png")) == []


def test_a_decompression_bomb_row_is_skipped_with_its_reason_not_a_crash(tmp_path):
    """PIL raises DecompressionBombError (not an OSError) when it opens a bomb's header: one row skipped,
    named, and the rest of the shard still exported."""
    snapshot, out = tmp_path / "snap", tmp_path / "raw" / "images"
    (snapshot / "data").mkdir(parents=True)
    png = encoded(Image.new("RGB", (4, 4), RED), "PNG")
    rows = [{"bytes": blob, "path": None} for blob in (png, header_only_png(30000, 30000), png)]
    shard = snapshot / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": rows}), shard)
    count, skipped, _, _ = fetch.export_parquet([shard], snapshot, Data(source="hf:org/bomb"), out)
    assert count == 2
    assert sorted(p.name for p in (out / "data" / "train-00000-of-00001").iterdir()) == ["000000.png", "000002.png"]
    assert [(item["file"], item["row"]) for item in skipped] == [("data/train-00000-of-00001.parquet", 1)]
    assert skipped[0]["reason"].startswith("not a supported image (unknown: DecompressionBombError: Image size")


def test_a_camera_mpo_jpeg_row_is_exported_as_a_jpg_and_decodes(tmp_path):
    """PIL names a JPEG carrying a second picture (many cameras' files) "MPO": it is a .jpg, and preprocess
    reads its first picture."""
    snapshot, out = tmp_path / "snap", tmp_path / "raw" / "images"
    (snapshot / "data").mkdir(parents=True)
    mpo = encoded(Image.new("RGB", (8, 8), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    shard = snapshot / "data" / "train-00000-of-00001.parquet"
    pq.write_table(pa.table({"image": [{"bytes": mpo, "path": "DSC0001.JPG"}]}), shard)
    count, skipped, _, _ = fetch.export_parquet([shard], snapshot, Data(source="hf:org/camera"), out)
    written = out / "data" / "train-00000-of-00001" / "000000.jpg"
    assert count == 1 and skipped == [] and written.read_bytes() == mpo
    array, skipped = preprocess.preprocess_images([written], 8, 3, True)
    assert skipped == [] and np.abs(array[0].astype(int) - np.array(RED)[:, None, None]).max() <= 6
