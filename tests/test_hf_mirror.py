"""The hf: source against a real Hugging Face mirror (olah) on loopback: both dataset layouts, pinning,
resume after an interruption, offline re-runs, every user-facing error, and the token kept secret.

Each download runs as users run it: `python -m workflow download` in a fresh process whose
environment (HF_ENDPOINT, HF_HOME, HF_TOKEN, HF_HUB_OFFLINE) is set before it starts; HF_HOME is a
temporary folder per test, so the Hugging Face cache is isolated.
"""

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, make_repo
from tests.mirror import (
    SECRET_TOKEN,
    Dataset,
    Mirror,
    StallingProxy,
    clean_env,
    hf_env,
    image_files,
    labelled_parquet,
    parquet_files,
    png,
    run_stage,
    secret_free,
)
from workflow.core.artifacts import sha256_file


def write_params(workdir: Path, data: dict, base: Path | None = None) -> None:
    params = yaml.safe_load(base.read_text()) if base else {}
    params.setdefault("data", {}).update(data)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def download(workdir: Path, env: dict, **data):
    """Run the download stage in `workdir` with `data.*` params; (process, SOURCE record or None)."""
    write_params(workdir, data)
    done = run_stage(workdir, env)
    source = workdir / "data" / "raw" / "SOURCE.json"
    return done, (json.loads(source.read_text()) if done.returncode == 0 else None)


def ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, f"download failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def one_error(done: subprocess.CompletedProcess) -> str:
    """The stage failed with one clear line (a ConfigError), not a traceback."""
    assert done.returncode == 1, f"expected a ConfigError:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    lines = [line for line in done.stderr.splitlines() if line.startswith("error in stage download: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-4000:]
    return lines[0]


def exported(workdir: Path) -> dict:
    images = workdir / "data" / "raw" / "images"
    return {p.relative_to(images).as_posix(): p.read_bytes() for p in sorted(images.rglob("*")) if p.is_file()}


# --- both layouts, through the mirror ----------------------------------------------------------------


def test_parquet_dataset_through_the_mirror(mirror, tmp_path):
    files = parquet_files(5, shards=2)
    files.update(parquet_files(2, split="test", seed=50))
    repo = Dataset.create(mirror, "org/parquet-pets", files)
    mark = mirror.mark()
    env = hf_env(mirror, tmp_path / "hf", HF_TOKEN=SECRET_TOKEN)
    done, record = download(tmp_path / "w", env, source="hf:org/parquet-pets")
    out = ok(done)

    used = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    assert record["sha"] == repo.head and record["revision"] == "main"
    assert record["endpoint"] == f"127.0.0.1:{mirror.port}" and record["layout"] == "parquet"
    assert record["split"] == "train" and record["count"] == 5 and record["skipped"] == []
    assert record["files"] == [
        {"path": name, "size": len(repo.blob(name)), "sha256": hashlib.sha256(repo.blob(name)).hexdigest()}
        for name in used
    ]
    images = exported(tmp_path / "w")
    assert sorted(images) == [
        "data/train-00000-of-00002/000000.png",
        "data/train-00000-of-00002/000001.png",
        "data/train-00000-of-00002/000002.png",
        "data/train-00001-of-00002/000000.png",
        "data/train-00001-of-00002/000001.png",
    ]
    assert images["data/train-00001-of-00002/000001.png"] == png(4)  # the fifth image, byte for byte
    assert f"at {repo.head} from 127.0.0.1:{mirror.port}" in out
    # the mirror is really the host contacted: it served the revision and the files, only the card and
    # the train split's (not the test split's)
    asked = mirror.requests(mark)
    assert ("GET", "/api/datasets/org/parquet-pets/revision/main", 200) in asked
    assert mirror.file_gets(mark, "org/parquet-pets") == ["README.md", *used]
    assert record["config"] == "default"
    secret_free(tmp_path, texts=(done.stdout, done.stderr))


def test_a_class_label_column_gives_the_labels(mirror, tmp_path):
    """`data.label_column`: each exported image's class, the names from the dataset's features; preprocess
    keeps them beside the images."""
    classes = ["iris", "rose", "tulip"]
    Dataset.create(
        mirror, "org/flowers", {"data/train-00000-of-00001.parquet": labelled_parquet(classes, [2, 0, 1, 2])}
    )
    env = hf_env(mirror, tmp_path / "hf")
    done, record = download(tmp_path / "w", env, source="hf:org/flowers", label_column="label")
    ok(done)
    assert record["classes"] == 3
    raw = json.loads((tmp_path / "w/data/raw/LABELS.json").read_text())
    shard = "data/train-00000-of-00001"
    assert raw == {"classes": classes, "labels": {f"{shard}/{i:06d}.png": c for i, c in enumerate([2, 0, 1, 2])}}
    write_params(tmp_path / "w", {"min_images": 2, "max_images": None})
    ok(run_stage(tmp_path / "w", env, "preprocess"))
    processed = json.loads((tmp_path / "w/data/processed/labels.json").read_text())
    assert processed == {"classes": classes, "labels": [2, 0, 1, 2]}


def test_a_missing_label_is_refused_naming_the_row(mirror, tmp_path):
    Dataset.create(mirror, "org/unlabelled-row", {"data/train.parquet": labelled_parquet(["a", "b"], [1, -1])})
    done, _ = download(
        tmp_path / "w", hf_env(mirror, tmp_path / "hf"), source="hf:org/unlabelled-row", label_column="label"
    )
    line = one_error(done)
    assert "`data.label_column` 'label' in data/train.parquet row 1: label -1 is not a class index 0..1" in line
    assert not (tmp_path / "w/data/raw").exists()


def test_image_files_layout_and_splits(mirror, tmp_path):
    repo = Dataset.create(mirror, "org/folder-pets", image_files({"train": 3, "test": 2}))
    env = hf_env(mirror, tmp_path / "hf")
    done, record = download(tmp_path / "w", env, source="hf:org/folder-pets")
    ok(done)
    assert record["layout"] == "images" and record["count"] == 3 and record["sha"] == repo.head
    assert [f["path"] for f in record["files"]] == ["train/a/0000.png", "train/a/0002.png", "train/b/0001.png"]
    assert exported(tmp_path / "w")["train/b/0001.png"] == repo.blob("train/b/0001.png")
    assert all(f["sha256"] == sha256_file(tmp_path / "w/data/raw/images" / f["path"]) for f in record["files"])

    done, record = download(tmp_path / "w", env, source="hf:org/folder-pets", split="test")
    ok(done)
    assert record["count"] == 2 and sorted(exported(tmp_path / "w")) == ["test/a/0000.png", "test/b/0001.png"]
    line = one_error(download(tmp_path / "w", env, source="hf:org/folder-pets", split="validation")[0])
    assert "`data.split` 'validation'" in line and "splits found: test, train" in line
    assert json.loads((tmp_path / "w/data/raw/SOURCE.json").read_text())["split"] == "test"  # kept, untouched


def test_parquet_not_named_by_split_is_the_train_split(mirror, tmp_path):
    shard = parquet_files(3)["data/train-00000-of-00001.parquet"]
    Dataset.create(mirror, "org/unnamed", {"data/0.parquet": shard, "images.parquet": shard})
    env = hf_env(mirror, tmp_path / "hf")
    done, record = download(tmp_path / "w", env, source="hf:org/unnamed")
    ok(done)
    assert record["count"] == 6
    line = one_error(download(tmp_path / "w", env, source="hf:org/unnamed", split="test")[0])
    assert "`data.split` 'test'" in line and "splits found: train" in line


# --- the card's configs, and only the requested split ------------------------------------------------

CONFIGS_CARD = b"""---
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
---
# Photos in odd folders; the card says where.
"""

# `datasets` itself, as the Hub's dataset viewer uses it: load the split from the mirror, print each
# image's mode, size and pixel hash.
VIEWER = """import hashlib, json, sys, datasets
repo, sha = sys.argv[1:3]
for config, split in json.loads(sys.argv[3]):
    rows = datasets.load_dataset(repo, name=config, split=split, revision=sha)
    rows = rows.cast_column("image", datasets.Image())  # the fixture's parquet has no features metadata
    print(json.dumps(sorted([im.mode, list(im.size), hashlib.sha256(im.tobytes()).hexdigest()]
                            for im in rows["image"])))
"""


def pixels(workdir: Path) -> list:
    """The exported images as VIEWER prints them."""
    from PIL import Image

    images = []
    for blob in exported(workdir).values():
        with Image.open(io.BytesIO(blob)) as im:
            images.append([im.mode, list(im.size), hashlib.sha256(im.tobytes()).hexdigest()])
    return sorted(images)


def test_card_configs_load_what_datasets_loads_and_only_that_split(mirror, tmp_path):
    """A card whose `configs:` put the data in odd folders: each config's split exports exactly the
    images `datasets.load_dataset` (the Hub viewer's reader) gives for it, through the same mirror,
    and only that split's files are downloaded; offline, a split not downloaded yet is not there."""
    shard = lambda n, seed: parquet_files(n, seed=seed)["data/train-00000-of-00001.parquet"]  # noqa: E731
    files = {
        "odd/place/a.parquet": shard(2, 0),
        "odd/place/c.parquet": shard(1, 10),
        "more/b.parquet": shard(2, 20),
        "elsewhere/x/y.parquet": shard(1, 30),
        "art/train/s.parquet": shard(2, 40),
        "art/test/t.parquet": shard(1, 50),
        **parquet_files(3, seed=60),
    }  # data/train-*: not train here
    repo = Dataset.create(mirror, "org/odd-folders", files)
    repo.commit({"README.md": CONFIGS_CARD}, "card with configs")
    hf_home = tmp_path / "hf"
    cases = [
        (None, "train", ["more/b.parquet", "odd/place/a.parquet", "odd/place/c.parquet"]),
        (None, "holdout", ["elsewhere/x/y.parquet"]),
        ("sketches", "test", ["art/test/t.parquet"]),
    ]
    ours = []
    for config, split, used in cases:
        if split == "holdout":  # not downloaded yet: the cache does not have it
            line = one_error(
                download(
                    tmp_path / "w",
                    hf_env(mirror, hf_home, HF_HUB_OFFLINE="1"),
                    source="hf:org/odd-folders",
                    split=split,
                )[0]
            )
            assert "no complete snapshot of the files it needs" in line, line
        mark = mirror.mark()
        chosen = {"config": config} if config else {}  # null: the card's default
        done, record = download(
            tmp_path / "w", hf_env(mirror, hf_home), source="hf:org/odd-folders", split=split, **chosen
        )
        ok(done)
        assert record["config"] == (config or "photos") and record["split"] == split
        assert [f["path"] for f in record["files"]] == used
        assert set(mirror.file_gets(mark, "org/odd-folders")) - {"README.md"} == set(used)  # that split only
        ours.append(pixels(tmp_path / "w"))
    snapshot = hf_home / "hub" / "datasets--org--odd-folders" / "snapshots" / repo.head
    assert sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.parquet")) == sorted(
        name for *_, used in cases for name in used
    )  # never data/ nor art/train/

    viewer = subprocess.run(
        [
            sys.executable,
            "-c",
            VIEWER,
            "org/odd-folders",
            repo.head,
            json.dumps([[config, split] for config, split, _ in cases]),
        ],
        env=hf_env(mirror, tmp_path / "viewer-home"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert viewer.returncode == 0, viewer.stderr[-3000:]
    assert [json.loads(line) for line in viewer.stdout.splitlines()] == ours
    assert [len(images) for images in ours] == [5, 1, 1]


# --- the token: HF_TOKEN, or the one `hf auth login` saved --------------------------------------------


@pytest.mark.parametrize("how", ["login", "env"])
def test_token_opens_a_private_dataset_and_is_written_nowhere(mirror, tmp_path, how):
    """A private dataset (the proxy in front of the mirror answers as the Hub does without a valid
    token): the token from HF_TOKEN or from the file `hf auth login` saves in HF_HOME is sent with
    every request, and written to no output, log or cache file."""
    repo = Dataset.create(mirror, f"org/private-{how}", parquet_files(3))
    proxy = StallingProxy(mirror.port, private=(repo.repo_id, SECRET_TOKEN))
    hf_home, source = tmp_path / "hf", f"hf:{repo.repo_id}"
    try:
        line = one_error(download(tmp_path / "w", hf_env(proxy, hf_home), source=source)[0])
        assert "dataset not found" in line and "HF_TOKEN" in line and "hf auth login" in line, line
        assert proxy.seen and not any(proxy.authorized)
        extra = {"HF_TOKEN": SECRET_TOKEN} if how == "env" else {}
        if how == "login":
            hf_home.mkdir(parents=True, exist_ok=True)
            (hf_home / "token").write_text(SECRET_TOKEN)  # what `hf auth login` writes: HF_HOME/token
        seen = len(proxy.seen)
        done, record = download(tmp_path / "w", hf_env(proxy, hf_home, **extra), source=source)
        ok(done)
    finally:
        proxy.close()
    assert record["sha"] == repo.head and record["count"] == 3
    asked = [
        carried
        for (_, path, _), carried in zip(proxy.seen[seen:], proxy.authorized[seen:], strict=True)
        if repo.repo_id in path
    ]
    assert len(asked) >= 3 and all(asked)  # every request for the dataset carried the token
    secret_free(tmp_path, texts=(done.stdout, done.stderr), saved=hf_home / "token")


# --- pinning -----------------------------------------------------------------------------------------


def test_pinning_by_sha_after_main_moves(mirror, tmp_path):
    repo = Dataset.create(mirror, "org/moving", parquet_files(3))
    first = repo.head
    env = hf_env(mirror, tmp_path / "hf")
    done, pinned = download(tmp_path / "w", env, source="hf:org/moving", revision=first)
    ok(done)
    assert pinned["sha"] == pinned["revision"] == first and pinned["count"] == 3

    second = repo.commit(parquet_files(5, seed=10), "more images")  # main moves
    mark = mirror.mark()
    done, again = download(tmp_path / "w", env, source="hf:org/moving", revision=first)
    ok(done)
    assert again == pinned  # the same commit, the same files
    assert mirror.requests(mark) == []  # a pinned, cached snapshot: not one request, nothing fetched

    mark = mirror.mark()
    done, latest = download(tmp_path / "w", env, source="hf:org/moving")
    ok(done)
    assert latest["sha"] == second != first and latest["count"] == 5
    assert mirror.file_gets(mark, "org/moving") == ["data/train-00000-of-00001.parquet"]  # only what changed
    mark = mirror.mark()
    done, same = download(tmp_path / "w", env, source="hf:org/moving")
    ok(done)
    assert same == latest
    assert mirror.file_gets(mark, "org/moving") == []  # main re-resolved, nothing fetched again


def test_a_failed_request_never_passes_off_the_cached_commit_of_main_as_current(mirror, tmp_path):
    """huggingface_hub's snapshot_download answers a failed listing request from the cache's record of
    `main`: after main moved, that is the old commit. The stage checks it against the commit main names
    now, and retries."""
    repo = Dataset.create(mirror, "org/flaky-main", parquet_files(3))
    hf_home = tmp_path / "hf"
    done, old = download(tmp_path / "w", hf_env(mirror, hf_home), source="hf:org/flaky-main")
    ok(done)
    second = repo.commit(parquet_files(5, seed=10), "more images")  # main moves
    # 1st request for main: the stage's own check (answered); 2nd: snapshot_download's (a 500)
    proxy = StallingProxy(mirror.port, fail=("/api/datasets/org/flaky-main/revision/main", 2))
    try:
        done, latest = download(tmp_path / "w", hf_env(proxy, hf_home), source="hf:org/flaky-main")
    finally:
        proxy.close()
    ok(done)
    assert old["sha"] != second and latest["sha"] == second and latest["count"] == 5
    assert "from the cache; retrying in 1 s (2/3)" in done.stderr, done.stderr[-3000:]


def test_a_server_error_on_a_pinned_commit_is_retried_not_taken_for_a_missing_one(mirror, tmp_path):
    """olah answers a missing sha with a 500, and so does a server having a bad moment: a correct pin
    is asked again (a missing one is named after the last try: test_errors_name_the_cause...)."""
    repo = Dataset.create(mirror, "org/pinned-flaky", parquet_files(3))
    proxy = StallingProxy(mirror.port, fail=(f"/api/datasets/org/pinned-flaky/revision/{repo.head}", 1))
    try:
        done, record = download(
            tmp_path / "w", hf_env(proxy, tmp_path / "hf"), source="hf:org/pinned-flaky", revision=repo.head
        )
    finally:
        proxy.close()
    ok(done)
    assert record["sha"] == repo.head and "retrying in 1 s (2/3)" in done.stderr, done.stderr[-3000:]


def test_a_gated_data_file_is_one_error_saying_how_to_get_access(mirror, tmp_path):
    """The card and the listing answered, the data file refused (403 GatedRepo): the stage's own message."""
    Dataset.create(mirror, "org/gated-files", parquet_files(3))
    proxy = StallingProxy(mirror.port, gate=".parquet")
    try:
        done, _ = download(tmp_path / "w", hf_env(proxy, tmp_path / "hf"), source="hf:org/gated-files")
    finally:
        proxy.close()
    line = one_error(done)
    assert "'hf:org/gated-files'" in line and "is gated" in line and "hf auth login" in line, line
    assert "Traceback" not in done.stderr


# --- interruption and resume -------------------------------------------------------------------------


def test_resume_after_an_interrupted_download(mirror, tmp_path):
    repo = Dataset.create(mirror, "org/interrupted", parquet_files(6, shards=2))
    stalled_file = "data/train-00001-of-00002.parquet"
    proxy = StallingProxy(mirror.port, stall=stalled_file)
    hf_home = tmp_path / "hf"
    snapshot = hf_home / "hub" / "datasets--org--interrupted" / "snapshots" / repo.head
    try:
        write_params(tmp_path / "w", {"source": "hf:org/interrupted"})
        process = subprocess.Popen(
            [sys.executable, "-m", "workflow", "download"],
            cwd=tmp_path / "w",
            env=hf_env(proxy, hf_home, HF_HUB_DOWNLOAD_TIMEOUT="60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert proxy.stalled.wait(60), "the download never reached the stalled file"
            deadline = time.monotonic() + 30
            while not (snapshot / "data/train-00000-of-00002.parquet").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # the interruption: no clean-up runs
            process.communicate()
        assert (snapshot / "data/train-00000-of-00002.parquet").is_file()
        assert not (snapshot / stalled_file).exists()
        assert not (tmp_path / "w/data/raw").exists()  # nothing that looks finished

        proxy.stall = None
        seen = len(proxy.seen)
        done, record = download(tmp_path / "w", hf_env(proxy, hf_home), source="hf:org/interrupted")
        ok(done)
    finally:
        proxy.close()
    fetched = [path for method, path, _ in proxy.seen[seen:] if method == "GET" and "/resolve/" in path]
    assert [p.rsplit("/", 2)[-2:] for p in fetched] == [["data", "train-00001-of-00002.parquet"]]  # only the rest
    assert record["count"] == 6 and record["sha"] == repo.head
    assert [f["sha256"] for f in record["files"]] == [
        hashlib.sha256(repo.blob(f"data/train-0000{k}-of-00002.parquet")).hexdigest() for k in (0, 1)
    ]


def test_mirror_going_away_mid_download_is_one_clear_error_then_resumes(mirror, tmp_path):
    """The endpoint vanishes with one file half sent: one clear error (after the retries), nothing that
    looks finished, the completed file kept; with the mirror back, only the missing file is fetched."""
    repo = Dataset.create(mirror, "org/vanishing", parquet_files(6, shards=2))
    stalled_file = "data/train-00001-of-00002.parquet"
    proxy = StallingProxy(mirror.port, stall=stalled_file)
    hf_home = tmp_path / "hf"
    write_params(tmp_path / "w", {"source": "hf:org/vanishing"})
    process = subprocess.Popen(
        [sys.executable, "-m", "workflow", "download"],
        cwd=tmp_path / "w",
        env=hf_env(proxy, hf_home, HF_HUB_DOWNLOAD_TIMEOUT="60", HF_TOKEN=SECRET_TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proxy.stalled.wait(60), "the download never reached the stalled file"
    proxy.close()  # the mirror goes away mid-file, and stays away
    stdout, stderr = process.communicate(timeout=120)
    line = one_error(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    assert "did not answer after 3 attempts" in line and "no complete snapshot" in line, line
    assert not (tmp_path / "w/data/raw").exists()
    secret_free(tmp_path / "w", hf_home, texts=(stdout, stderr))

    back = StallingProxy(mirror.port)
    try:
        done, record = download(tmp_path / "w", hf_env(back, hf_home), source="hf:org/vanishing")
        ok(done)
    finally:
        back.close()
    fetched = [path for method, path, _ in back.seen if method == "GET" and "/resolve/" in path]
    assert [p.rsplit("/", 2)[-2:] for p in fetched] == [["data", "train-00001-of-00002.parquet"]]
    assert record["count"] == 6 and record["sha"] == repo.head


# --- offline -----------------------------------------------------------------------------------------


def test_offline_rerun_with_the_server_stopped(tmp_path):
    hf_home = tmp_path / "hf"
    with Mirror.start(tmp_path / "own-mirror") as server:  # its own server, to stop it
        repo = Dataset.create(server, "org/offline", parquet_files(4))
        Dataset.create(server, "org/never-fetched", parquet_files(2))
        endpoint = server.endpoint
        done, online = download(tmp_path / "w", hf_env(server, hf_home), source="hf:org/offline")
        ok(done)
    assert server.process.poll() is not None  # stopped

    # HF_HUB_OFFLINE=1: the cache, for the pinned sha and for the branch it has seen
    for revision in (repo.head, None):
        env = hf_env(endpoint, hf_home, HF_HUB_OFFLINE="1")
        done, record = download(tmp_path / "w", env, source="hf:org/offline", revision=revision)
        ok(done)
        assert "did not answer" not in done.stderr and "retrying" not in done.stderr  # never tried the network
        assert {k: v for k, v in record.items() if k != "revision"} == {
            k: v for k, v in online.items() if k != "revision"
        }
    # no flag, the mirror down: retries, then the cache, and it says so
    done, record = download(tmp_path / "w", hf_env(endpoint, hf_home), source="hf:org/offline")
    ok(done)
    assert record == online
    assert "did not answer after 3 attempts" in done.stderr and f"using the cached snapshot {repo.head}" in done.stderr

    # not in the cache: one clear message that says what was tried and what to set
    for extra, tried in (
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({}, f"http://127.0.0.1:{server.port} did not answer after 3 attempts"),
    ):
        env = hf_env(endpoint, hf_home, HF_TOKEN=SECRET_TOKEN, **extra)
        done, _ = download(tmp_path / "w", env, source="hf:org/never-fetched")
        line = one_error(done)
        for words in (
            "'hf:org/never-fetched'",
            tried,
            "HF_ENDPOINT",
            "HF_HUB_OFFLINE",
            "HF_TOKEN for a private or gated dataset (now set)",
            "no complete snapshot",
            "pin `data.revision`",
        ):
            assert words in line, (words, line)
        secret_free(tmp_path / "w", hf_home, texts=(done.stdout, done.stderr))


# --- errors users meet ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def errors_repo(mirror):
    return Dataset.create(mirror, "org/errors", parquet_files(2, column="img"))


@pytest.mark.parametrize(
    "data, words",
    [
        ({"source": "hf:org/no-such-dataset"}, ["dataset not found at http://127.0.0.1:", "(HF_ENDPOINT)", "HF_TOKEN"]),
        (
            {"source": "hf:org/errors", "revision": "v9"},
            ["`data.revision` 'v9': no such branch, tag or commit", "'hf:org/errors' at http://127.0.0.1:"],
        ),
        ({"source": "hf:org/errors", "revision": "0" * 40}, [f"`data.revision` '{'0' * 40}': no such"]),
        (
            {"source": "hf:org/errors"},
            ["`data.image_column` 'image' is not a column of data/train-00000-of-00001.parquet; columns: img, label"],
        ),
        ({"source": "hf:org/errors", "split": "valid"}, ["`data.split` 'valid'", "splits found: train"]),
        (
            {"source": "hf:org/errors", "image_column": "img", "label_column": "species"},
            ["`data.label_column` 'species' is not a column of data/train-00000-of-00001.parquet"],
        ),
        (
            {"source": "hf:org/errors", "image_column": "img", "label_column": "label"},
            ["`data.label_column` 'label' of data/train-00000-of-00001.parquet is not a ClassLabel column"],
        ),
    ],
    ids=[
        "repo-not-found",
        "branch-not-found",
        "sha-not-found",
        "no-image-column",
        "no-such-split",
        "no-label-column",
        "not-a-class-label",
    ],
)
def test_errors_name_the_cause_and_the_endpoint(mirror, errors_repo, tmp_path, data, words):
    done, _ = download(tmp_path / "w", hf_env(mirror, tmp_path / "hf"), **data)
    line = one_error(done)
    for word in words:
        assert word in line, (word, line)
    assert not (tmp_path / "w/data/raw").exists()


def test_image_column_param_reads_another_column(mirror, errors_repo, tmp_path):
    done, record = download(tmp_path / "w", hf_env(mirror, tmp_path / "hf"), source="hf:org/errors", image_column="img")
    ok(done)
    assert record["count"] == 2


def test_network_timeout_retries_with_backoff_then_explains(tmp_path):
    with socket.socket() as silent:  # accepts connections (the kernel does), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        done, _ = download(
            tmp_path / "w", hf_env(endpoint, tmp_path / "hf", HF_HUB_ETAG_TIMEOUT="1"), source="hf:org/slow"
        )
    line = one_error(done)
    assert "did not answer after 3 attempts" in line and "Timeout" in line and "HF_ENDPOINT" in line
    assert (
        done.stderr.count("retrying in") == 2 and "retrying in 1 s" in done.stderr and "retrying in 2 s" in done.stderr
    )


# --- the endpoint is read when the stage runs (huggingface_hub#2871) ----------------------------------


def test_endpoint_set_after_huggingface_hub_was_imported_is_still_used(mirror, tmp_path):
    """huggingface_hub reads HF_ENDPOINT once, at import: the stage passes the environment's endpoint to
    every call, so even a process that imported it first talks to the mirror, never to huggingface.co."""
    repo = Dataset.create(mirror, "org/late-endpoint", parquet_files(2))
    write_params(tmp_path / "w", {"source": "hf:org/late-endpoint"})
    env = hf_env(mirror, tmp_path / "hf")
    del env["HF_ENDPOINT"]
    script = (
        "import os, huggingface_hub.constants as c; assert c.ENDPOINT == 'https://huggingface.co'; "
        f"os.environ['HF_ENDPOINT'] = {mirror.endpoint!r}; "
        "from workflow.__main__ import main; assert main(['download']) == 0"
    )
    mark = mirror.mark()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path / "w", env=env, capture_output=True, text=True, timeout=120
    )
    ok(done)
    record = json.loads((tmp_path / "w/data/raw/SOURCE.json").read_text())
    assert record["endpoint"] == f"127.0.0.1:{mirror.port}" and record["sha"] == repo.head
    assert "data/train-00000-of-00001.parquet" in mirror.file_gets(mark, "org/late-endpoint")


# --- the presets' datasets, in the layout the Hub serves them -----------------------------------------


@pytest.mark.parametrize(
    "preset, repo_id",
    [
        ("tutorial-butterflies-128.yaml", "huggan/smithsonian_butterflies_subset"),
        ("train-unconditional-flowers-64.yaml", "huggan/flowers-102-categories"),
        (None, "huggan/anime-face-dataset"),
    ],
)
def test_presets_download_their_datasets_through_a_mirror(mirror, tmp_path, preset, repo_id):
    """huggan/* datasets are parquet shards `data/train-*.parquet` with an `image` column of
    `{bytes, path}` structs: the presets' `data` sections read them as they are."""
    Dataset.create(mirror, repo_id, parquet_files(4, shards=2))
    base = ROOT / "configs" / preset if preset else ROOT / "params.yaml"
    write_params(tmp_path / "w", {} if preset else {"source": f"hf:{repo_id}", "channels": 3}, base=base)
    done = run_stage(tmp_path / "w", hf_env(mirror, tmp_path / "hf"))
    ok(done)
    record = json.loads((tmp_path / "w/data/raw/SOURCE.json").read_text())
    assert record["repo_id"] == repo_id and record["count"] == 4 and record["layout"] == "parquet"


# --- end to end, under dvc -----------------------------------------------------------------------------


def dvc(repo: Path, env: dict, *args: str) -> str:
    done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    secret_free(texts=(done.stdout, done.stderr))
    return done.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_editing_the_imagefolder_reruns_download_and_preprocess(tmp_path, where):
    folder = Path("data/images") if where == "inside" else tmp_path / "photos"
    repo = make_repo(
        tmp_path / "repo",
        data={"source": f"imagefolder:{folder}", "folder": str(folder), "channels": 3, "max_images": None},
    )
    images = repo / folder if where == "inside" else folder
    images.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        (images / f"{i}.png").write_bytes(png(i))
    env = clean_env()
    dvc(repo, env, "repro", "preprocess")
    assert json.loads((repo / "data/processed/meta.json").read_text())["count"] == 3
    assert json.loads(dvc(repo, env, "status", "--with-deps", "preprocess", "--json")) == {}

    (images / "new" / "3.png").parent.mkdir()
    (images / "new" / "3.png").write_bytes(png(3))  # a new image, one folder down
    assert set(json.loads(dvc(repo, env, "status", "--with-deps", "preprocess", "--json"))) == {"download"}
    dvc(repo, env, "repro", "preprocess")
    assert json.loads((repo / "data/processed/meta.json").read_text())["count"] == 4

    (images / "0.png").write_bytes(png(10))  # an edited image: same names, new content
    assert set(json.loads(dvc(repo, env, "status", "--with-deps", "preprocess", "--json"))) == {"download"}
    out = dvc(repo, env, "repro", "preprocess")
    assert "Running stage 'download'" in out and "Running stage 'preprocess'" in out


@pytest.mark.e2e
def test_editing_the_imagefolder_reruns_download_under_snakemake(tmp_path):
    """Snakemake sees an image edited in place or added one folder down, as dvc does: the rules list
    data.folder's files, where a directory input alone is judged by the directory's own mtime."""
    from tests.helpers import run

    repo = make_repo(
        tmp_path / "repo",
        data={"source": "imagefolder:data/images", "folder": "data/images", "channels": 3, "max_images": None},
    )
    images = repo / "data/images"
    (images / "new").mkdir()  # before the first run: adding a file to it leaves data/images' own mtime
    for i in range(3):
        (images / f"{i}.png").write_bytes(png(i))
    target = "data/processed/meta.json"

    def planned() -> set:
        done = run(repo, "snakemake", "--cores", "1", "-n", target)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return set(re.findall(r"^(?:local)?rule (\w+):", done.stdout + done.stderr, re.M))

    def build() -> None:
        done = run(repo, "snakemake", "--cores", "1", target)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    build()
    assert json.loads((repo / target).read_text())["count"] == 3 and planned() == set()
    (images / "new" / "3.png").write_bytes(png(3))  # a new image, one folder down
    assert planned() == {"download", "preprocess"}
    build()
    assert json.loads((repo / target).read_text())["count"] == 4 and planned() == set()
    edited = images / "new" / "3.png"
    edited.write_bytes(png(10))  # an edited image: same name, new content
    later = (repo / target).stat().st_mtime + 1  # after the last run's outputs, however coarse the clock
    os.utime(edited, (later, later))
    assert planned() == {"download", "preprocess"}
