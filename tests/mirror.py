"""A real Hugging Face mirror on loopback for the tests: olah serving small git dataset repositories.

    from tests.mirror import Mirror, ParquetDataset
    with Mirror.start(tmp) as mirror:                        # olah-cli on a free port, offline
        repo = ParquetDataset.create(mirror, "org", "pets", n=6)   # committed at <mirrors>/datasets/org/pets
        mark = mirror.mark()
        ... HF_ENDPOINT=mirror.endpoint python -m workflow download ...
        mirror.requests(mark)                                # what clients asked for since the mark

olah (PyPI, a test dependency only: requirements-test.txt) serves a local git repository placed at
`<mirrors-path>/datasets/<org>/<name>/` in offline mode, with the real Hub API: the real client, the
real protocol. The repositories hold plain git blobs (no LFS). The pytest fixture `mirror` (one
server for the session) is at the bottom: import it into a test module to use it.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT

OLAH = Path(sys.executable).parent / "olah-cli"
ACCESS = re.compile(r'"(GET|HEAD|POST) (\S+) HTTP/[\d.]+" (\d{3})')
BARRIER = "/api/datasets/barrier/"  # barrier()'s requests, left out of requests()
# A token-shaped secret, new each session (so no source file holds it): the tests check it never
# reaches any file, log, report or lock.
SECRET_TOKEN = "hf_" + secrets.token_hex(17)


_issued_ports: set[int] = set()


def free_port() -> int:
    """A loopback port that binds now, never handed out before in this process, and, where the system
    leaves room, below its ephemeral range: a port from bind(0) can be taken again, between this call
    and the server's own bind, by any client connection's source port (the tests make many). The scan
    starts at a pid-derived offset so two test sessions on one machine look at different ports first."""
    low, _ = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    first, last = 10000, low - 1
    candidates = range(first, last + 1) if last - first >= 1000 else ()
    start = (os.getpid() * 97) % len(candidates) if candidates else 0
    for i in range(len(candidates)):
        port = candidates[(start + i) % len(candidates)]
        if port in _issued_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _issued_ports.add(port)
        return port
    while True:  # no room below the ephemeral range: the system's choice, still never twice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


# --- the server ------------------------------------------------------------------------------------


@dataclass
class Mirror:
    root: Path
    port: int
    process: subprocess.Popen | None = None
    mirrors: Path = field(init=False)
    barriers: int = 0  # requests made by barrier(), each to its own path

    def __post_init__(self):
        self.mirrors = self.root / "mirrors"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "olah.log"

    @classmethod
    @contextlib.contextmanager
    def start(cls, root: Path):
        mirror = cls(Path(root), free_port())
        try:
            mirror.launch()
            yield mirror
        finally:
            mirror.stop()

    def launch(self) -> None:
        if not OLAH.is_file():
            pytest.fail(
                f"{OLAH} missing: the mirror tests need the test dependencies "
                "(pip install -r requirements-test.txt, or `make test`)"
            )
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.mirrors.mkdir(parents=True, exist_ok=True)
        netloc = f"127.0.0.1:{self.port}"
        (self.root / "olah.toml").write_text(f"""[basic]
host = "127.0.0.1"
port = {self.port}
repos-path = "{self.root / "repos"}"
mirrors-path = ["{self.mirrors}"]
mirror-scheme = "http"
mirror-netloc = "{netloc}"
mirror-lfs-netloc = "{netloc}"
hf-scheme = "http"
hf-netloc = "127.0.0.1:9"
hf-lfs-netloc = "127.0.0.1:9"
metadata-cache-ttl = 0
[accessibility]
offline = true
""")
        env = {**clean_env(), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [str(OLAH), "-c", "olah.toml"],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"olah exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:  # `GET /` answers 500 (the wheel has no static files): ask the API for a missing repo
                urllib.request.urlopen(f"{self.endpoint}/api/datasets/none/none/revision/main", timeout=1)
                return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"olah not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: olah and nothing else
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def mark(self) -> int:
        """A position in the access log; `requests(mark)` lists what came after it."""
        return self.barrier()

    def requests(self, since: int = 0) -> list[tuple[str, str, int]]:
        end = self.barrier()
        with open(self.log, "rb") as log:
            log.seek(since)
            text = log.read(end - since).decode(errors="replace")
        return [(m[1], m[2], int(m[3])) for m in ACCESS.finditer(text) if not m[2].startswith(BARRIER)]

    def barrier(self, timeout: float = 30.0) -> int:
        """Ask the server something new and wait for its access line; return the log's size after it. The
        server writes a request's line before its answer goes out, so every request answered before this
        call is in the log by then: no sleep that a loaded machine could outrun."""
        self.barriers += 1
        path = f"{BARRIER}{self.barriers}/revision/main"
        with contextlib.suppress(urllib.error.HTTPError):  # a missing repository: it answers 404
            urllib.request.urlopen(f"{self.endpoint}{path}", timeout=timeout)
        wanted, deadline = f'"GET {path} '.encode(), time.monotonic() + timeout
        while True:  # the whole line: its end is where the next reader starts
            text = self.log.read_bytes()
            at = text.find(wanted)
            if at >= 0 and (end := text.find(b"\n", at)) >= 0:
                return end + 1
            if time.monotonic() > deadline:
                pytest.fail(f"olah answered {path} but logged no line for it in {timeout} s: {self.log}")
            time.sleep(0.02)

    def file_gets(self, since: int, repo: str) -> list[str]:
        """Paths of the files of `repo` fetched (GET .../resolve/<rev>/<path>) since the mark."""
        prefix = f"/datasets/{repo}/resolve/"
        return sorted(
            path[len(prefix) :].split("/", 1)[1]
            for method, path, _ in self.requests(since)
            if method == "GET" and path.startswith(prefix)
        )


# --- dataset repositories --------------------------------------------------------------------------


def png(seed: int, size: tuple[int, int] = (12, 10)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Dataset:
    """A dataset (or model) git repository under the mirror: `commit()` adds files and moves `main`."""

    path: Path
    repo_id: str

    @classmethod
    def create(cls, mirror: Mirror, repo_id: str, files: dict[str, bytes], kind: str = "datasets") -> Dataset:
        """A repository of `kind` ("datasets", or "models" for a model repository such as a pipeline)."""
        path = mirror.mirrors / kind / repo_id
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")
        dataset = cls(path, repo_id)
        card = f"---\nlicense: cc0-1.0\npretty_name: {repo_id}\n---\n# {repo_id}\nTest data.\n"
        dataset.commit({"README.md": card.encode(), **files}, "initial")
        return dataset

    def commit(self, files: dict[str, bytes], message: str = "update") -> str:
        for name, blob in files.items():
            (self.path / name).parent.mkdir(parents=True, exist_ok=True)
            (self.path / name).write_bytes(blob)
        git(self.path, "add", "-A")
        git(self.path, "commit", "-qm", message)
        return self.head

    @property
    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")

    def blob(self, name: str, rev: str = "HEAD") -> bytes:
        return subprocess.run(["git", "show", f"{rev}:{name}"], cwd=self.path, check=True, capture_output=True).stdout


def parquet_shard(images: list[bytes], column: str = "image", start: int = 0) -> bytes:
    """A parquet file as `datasets` writes an Image feature: a struct column {bytes, path}, and a label."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": b, "path": f"{start + i:04d}.png"} for i, b in enumerate(images)]
    buf = io.BytesIO()
    pq.write_table(pa.table({column: cells, "label": [(start + i) % 3 for i in range(len(images))]}), buf)
    return buf.getvalue()


def parquet_files(n: int, shards: int = 1, split: str = "train", column: str = "image", seed: int = 0) -> dict:
    """`data/<split>-0000k-of-0000n.parquet` shards holding `n` PNGs in all."""
    images = [png(seed + i) for i in range(n)]
    per = -(-n // shards)
    return {
        f"data/{split}-{k:05d}-of-{shards:05d}.parquet": parquet_shard(images[k * per : (k + 1) * per], column, k * per)
        for k in range(shards)
    }


def labelled_parquet(classes: list[str], labels: list[int], seed: int = 0) -> bytes:
    """A parquet shard as `datasets` writes it: an Image column and a ClassLabel column `label`, the
    features (class names) in the file's schema metadata."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    cells = [{"bytes": png(seed + i), "path": None} for i in range(len(labels))]
    table = datasets.Dataset.from_dict({"image": cells, "label": labels}, features=features)
    buf = io.BytesIO()
    table.to_parquet(buf)
    return buf.getvalue()


def image_files(counts: dict[str, int], seed: int = 100) -> dict:
    """Plain image files: {"train": 3} -> train/a/0000.png ... (classes a, b alternate)."""
    files, i = {}, 0
    for split, n in counts.items():
        for k in range(n):
            files[f"{split}/{'ab'[k % 2]}/{k:04d}.png"] = png(seed + i)
            i += 1
    return files


def secret_free(*roots: Path, texts: tuple[str, ...] = (), saved: Path | None = None) -> None:
    """SECRET_TOKEN appears in no file under `roots` (binary or text) but `saved` (the login's token
    file) and in none of `texts`."""
    needle = SECRET_TOKEN.encode()
    for text in texts:
        assert SECRET_TOKEN not in text
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and path != saved:
                assert needle not in path.read_bytes(), f"HF_TOKEN written to {path}"


# --- running the download stage as users do: a fresh process, the environment set before it starts ---


def clean_env(**extra: str) -> dict:
    """This process's environment without anything Hugging Face reads (tests choose it), plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def hf_env(mirror_or_endpoint, hf_home: Path, **extra: str) -> dict:
    endpoint = getattr(mirror_or_endpoint, "endpoint", mirror_or_endpoint)
    return clean_env(
        HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), PYTHONPATH=str(ROOT), HF_HUB_DISABLE_PROGRESS_BARS="1", **extra
    )


def run_stage(workdir: Path, env: dict, stage: str = "download", timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workflow", stage], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


# --- a loopback proxy that can stall one file mid-body, to interrupt a download for real ------------


class StallingProxy:
    """Forwards to the mirror; a GET whose path ends with `stall` gets its headers and half its body,
    then nothing (the client waits, as on a dropped link) until the proxy is closed.

    With `private=(repo_id, token)`, it checks credentials as the Hub does for a private repository
    (olah, offline, checks none): a request for that dataset without `Authorization: Bearer <token>`
    gets 401 and `X-Error-Code: RepoNotFound`. `authorized` says, per request, whether it carried the
    token (the token itself is kept in memory only). With `fail=(text, n)`, the n-th request whose path
    contains `text` gets a 500. With `gate=text`, a request whose path contains `text` gets the Hub's answer
    for a gated file the token has no access to (403, `X-Error-Code: GatedRepo`)."""

    def __init__(
        self,
        upstream_port: int,
        stall: str | None = None,
        private: tuple[str, str] | None = None,
        fail: tuple[str, int] | None = None,
        gate: str | None = None,
    ):
        self.upstream_port, self.stall = upstream_port, stall
        self.fail, self.fail_count = fail, 0
        self.gate = gate
        self.private, self.token = private or (None, None)
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.authorized: list[bool] = []  # per request in `seen`: did it carry the token
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                proxy.forward(self, "HEAD")

            def do_GET(self):
                proxy.forward(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def forward(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        self.seen.append((method, handler.path, handler.headers.get("Range")))
        self.authorized.append(handler.headers.get("Authorization") == f"Bearer {self.token}")
        if self.private and f"datasets/{self.private}/" in handler.path and not self.authorized[-1]:
            return self.refuse(handler, method)
        if self.gate and self.gate in handler.path:
            return self.gated(handler, method)
        if self.fail and self.fail[0] in handler.path:
            self.fail_count += 1
            if self.fail_count == self.fail[1]:
                return self.server_error(handler, method)
        upstream = HTTPConnection("127.0.0.1", self.upstream_port, timeout=30)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
        upstream.request(method, handler.path, headers=headers)
        response = upstream.getresponse()
        body = response.read()
        handler.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() in ("transfer-encoding", "content-length", "connection", "content-encoding"):
                continue
            if key.lower() == "location":
                value = value.replace(f"127.0.0.1:{self.upstream_port}", f"127.0.0.1:{self.port}")
            handler.send_header(key, value)
        length = int(response.getheader("content-length", len(body))) if method == "HEAD" else len(body)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
        if method == "HEAD":
            return
        try:
            if self.stall and method == "GET" and handler.path.endswith(self.stall):
                handler.close_connection = True
                handler.wfile.write(body[: len(body) // 2])
                handler.wfile.flush()
                self.stalled.set()
                self.released.wait(120)
                return
            handler.wfile.write(body)
        except OSError:  # the client went away (killed): nothing to deliver
            handler.close_connection = True

    @staticmethod
    def answer(handler: BaseHTTPRequestHandler, method: str, status: int, error: str, code: str | None = None) -> None:
        """A JSON error as the Hub sends it, with its X-Error-Code (which huggingface_hub maps to an exception)."""
        body = f'{{"error":"{error}"}}'.encode()
        handler.send_response(status)
        if code:
            handler.send_header("X-Error-Code", code)
            handler.send_header("X-Error-Message", error)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)

    @classmethod
    def refuse(cls, handler: BaseHTTPRequestHandler, method: str) -> None:
        """The Hub's answer to a private repository without a valid token."""
        cls.answer(handler, method, 401, "Repository not found", "RepoNotFound")

    @classmethod
    def gated(cls, handler: BaseHTTPRequestHandler, method: str) -> None:
        """The Hub's answer to a gated file the token has no access to."""
        cls.answer(handler, method, 403, "Access to this dataset is restricted", "GatedRepo")

    @classmethod
    def server_error(cls, handler: BaseHTTPRequestHandler, method: str) -> None:
        """A 500, as a Hub or mirror having a bad moment answers."""
        cls.answer(handler, method, 500, "Internal Error")

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


# --- pytest fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mirror(tmp_path_factory):
    """One olah server for the session; tests add their own repositories (unique names) to it."""
    with Mirror.start(tmp_path_factory.mktemp("olah")) as server:
        yield server
