"""Artifacts beyond the workspace (issue 17): the outputs travel with `dvc push` / `dvc pull`, to the default
local remote and to S3 (moto's server and SeaweedFS on loopback, through dvc-s3), experiments with
`dvc exp push` / `dvc exp pull` through a bare git remote, and a corrupt object on the server is named and
never checked out (`python -m workflow pull`).

Everything starts from the session's `dvc_repo` (the tiny pipeline, run once as the experiment
`baseline`) and moves it between fresh clones: no test here trains. Every command runs with HOME in tmp,
so the default remote (`~/.cache/diffusion-pipeline/dvc-remote`) lands there too, with DVC_NO_ANALYTICS
and no AWS_* variable but the session's own keys where a test passes them."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import PACKAGED_WEIGHTS, repo_env, snapshot
from tests.s3 import BUCKET, CREDENTIALS, aws_env

pytestmark = pytest.mark.e2e

DEFAULT_REMOTE = ".cache/diffusion-pipeline/dvc-remote"  # under HOME: .dvc/config's url
# What the moto round trip moves: everything snapshot() compares, without the 5,000 raw images (SeaweedFS
# moves those too), since moto stores each object at about 200 a second on the 2-core box.
TRAINED = ("preprocess", "train", "sample", "package")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def run(repo: Path, home: Path, *cmd: str, **env: str) -> subprocess.CompletedProcess:
    """`cmd` in `repo` as a user runs it, HOME in tmp and `env` added; the caller checks the outcome."""
    base = {k: v for k, v in repo_env().items() if not k.startswith("AWS_")}
    full = {**base, "HOME": str(home), "DVC_NO_ANALYTICS": "1", **env}
    return subprocess.run(cmd, cwd=repo, env=full, capture_output=True, text=True, timeout=300)


def ok(repo: Path, home: Path, *cmd: str, **env: str) -> str:
    done = run(repo, home, *cmd, **env)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done.stdout


def git(repo: Path, home: Path, *args: str) -> str:
    return ok(repo, home, "git", "-c", "user.name=t", "-c", "user.email=t@t", *args).strip()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def object_key(prefix: str, data: bytes) -> str:
    """Where DVC 3 keeps an object of these bytes under a remote's URL."""
    oid = md5(data)
    return f"{prefix}/files/md5/{oid[:2]}/{oid[2:]}"


def assert_no_secret_in_git(repo: Path, home: Path, secret: str) -> None:
    """Neither the working tree's tracked files nor any commit holds `secret`."""
    commits = git(repo, home, "rev-list", "--all").split()
    found = run(repo, home, "git", "grep", "-I", "-l", secret, *commits, "--")
    assert found.returncode == 1 and not found.stdout, f"a key reached git: {found.stdout}"
    tracked = git(repo, home, "ls-files").split()
    assert ".dvc/config.local" not in tracked and all(
        secret not in (repo / name).read_text("latin-1") for name in tracked
    )
    assert secret not in (repo / ".dvc/config").read_text()


@pytest.fixture(scope="module")
def origin(dvc_repo, home, tmp_path_factory) -> Path:
    """A bare git remote holding the baseline's parent commit as `main` and the experiment itself, pushed with
    `dvc exp push` and no other set-up: its artifacts go to the committed default remote."""
    repo, _ = dvc_repo
    bare = tmp_path_factory.mktemp("origin") / "project.git"
    ok(bare.parent, home, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    (ref,) = [
        r
        for r in git(repo, home, "for-each-ref", "--format=%(refname)", "refs/exps").split()
        if r.endswith("/baseline")
    ]
    git(repo, home, "push", "-q", str(bare), f"{ref}^:refs/heads/main")
    ok(repo, home, "dvc", "exp", "push", str(bare), "baseline")
    return bare


@pytest.fixture(scope="module")
def colleague(origin, home, tmp_path_factory) -> Path:
    """A colleague's clone of `origin` that pulled the experiment and applied it."""
    clone = tmp_path_factory.mktemp("colleague") / "project"
    ok(clone.parent, home, "git", "clone", "-q", str(origin), str(clone))
    ok(clone, home, "dvc", "exp", "pull", "origin", "baseline")
    ok(clone, home, "dvc", "exp", "apply", "baseline")
    return clone


def test_an_experiment_reaches_a_colleague_with_its_artifacts_and_nothing_retrains(dvc_repo, colleague, home):
    repo, original = dvc_repo
    assert snapshot(colleague) == original  # weights, samples, dataset, grids and metrics, bit for bit
    assert (colleague / "data/raw/images").is_dir() and (colleague / PACKAGED_WEIGHTS).is_file()
    # Nothing ran here, and nothing needs to: train's resume state (never pushed, no DVC output) is not
    # missed, so the clone's pipeline is up to date as it came
    assert not (colleague / "models/checkpoints").exists()
    assert json.loads(ok(colleague, home, "dvc", "status", "--json")) == {}
    dry = ok(colleague, home, "dvc", "repro", "--dry")
    assert "Running stage" not in dry and "Data and pipelines are up to date." in dry
    # `dvc exp push` used the committed default remote, in HOME (tmp here), with no set-up
    weights = original["weights"]  # the baseline's, whatever another test left in the workspace since
    assert (home / object_key(DEFAULT_REMOTE, weights)).read_bytes() == weights
    assert "Everything is up to date." in ok(colleague, home, "dvc", "push")  # no -r: the default remote
    assert ok(colleague, home, "dvc", "config", "remote.local.verify").strip() == "true"


@pytest.fixture(scope="module")
def published(colleague, origin, home, moto, seaweed) -> str:
    """The colleague commits the experiment's results on the branch `results` with two S3 remotes in
    .dvc/config (URL and endpoint committed, `verify true`; keys never): `s3` on moto (keys from the
    environment) and `weed` on SeaweedFS (keys in .dvc/config.local); pushes to both and to origin."""
    git(colleague, home, "checkout", "-q", "-b", "results")
    git(colleague, home, "add", "-A")
    git(colleague, home, "commit", "-qm", "the baseline's results")
    for name, server in (("s3", moto), ("weed", seaweed)):
        ok(colleague, home, "dvc", "remote", "add", name, f"s3://{BUCKET}/project")
        ok(colleague, home, "dvc", "remote", "modify", name, "endpointurl", server.endpoint)
        ok(colleague, home, "dvc", "remote", "modify", name, "verify", "true")
    git(colleague, home, "commit", "-qam", "S3 remotes")
    for key, value in CREDENTIALS.items():
        ok(colleague, home, "dvc", "remote", "modify", "--local", "weed", key, value)
    ok(colleague, home, "dvc", "push", "-r", "weed")
    ok(colleague, home, "dvc", "push", "-r", "s3", *TRAINED, **aws_env())
    git(colleague, home, "push", "-q", "origin", "results")
    return "results"


def clone_of(origin: Path, branch: str, home: Path, path: Path) -> Path:
    ok(path.parent, home, "git", "clone", "-q", "-b", branch, str(origin), str(path))
    return path


def test_s3_round_trip_through_moto_with_keys_from_the_environment(dvc_repo, origin, published, home, tmp_path):
    _, original = dvc_repo
    clone = clone_of(origin, published, home, tmp_path / "project")
    ok(clone, home, "python", "-m", "workflow", "pull", "-r", "s3", *TRAINED, **aws_env())
    assert snapshot(clone) == original
    assert_no_secret_in_git(clone, home, CREDENTIALS["secret_access_key"])


def test_s3_round_trip_through_seaweedfs_which_checks_the_keys(dvc_repo, colleague, origin, published, home, tmp_path):
    _, original = dvc_repo
    clone = clone_of(origin, published, home, tmp_path / "project")
    ok(clone, home, "dvc", "remote", "modify", "--local", "weed", "access_key_id", CREDENTIALS["access_key_id"])
    ok(clone, home, "dvc", "remote", "modify", "--local", "weed", "secret_access_key", "not-the-secret")
    refused = run(clone, home, "python", "-m", "workflow", "pull", "-r", "weed")
    assert refused.returncode == 1
    # DVC's own line names the refusal; ours says what was (not) done and where the keys go
    assert re.search(r"ERROR: failed to connect to s3 \(.*\) - Forbidden: .*\(403\)", refused.stderr), refused.stderr
    assert "nothing was checked out" in refused.stderr and "dvc remote modify --local" in refused.stderr
    assert not (clone / "data/raw").exists()

    ok(clone, home, "dvc", "remote", "modify", "--local", "weed", "secret_access_key", CREDENTIALS["secret_access_key"])
    ok(clone, home, "python", "-m", "workflow", "pull", "-r", "weed")
    assert snapshot(clone) == original
    assert sorted(p.name for p in (clone / "data/raw/images").iterdir()) == sorted(
        p.name for p in (colleague / "data/raw/images").iterdir()
    )
    assert json.loads(ok(clone, home, "dvc", "status", "--json")) == {}
    ok(clone, home, "git", "check-ignore", "-q", ".dvc/config.local")  # where the keys are: ignored by git
    for repo in (clone, colleague):
        assert_no_secret_in_git(repo, home, CREDENTIALS["secret_access_key"])


def test_a_corrupt_object_on_the_server_is_named_and_never_checked_out(
    colleague, origin, published, home, moto, tmp_path
):
    """An object overwritten on the server: the pull fails naming it, the output it belongs to and the way
    back; the previous good copy stays in the workspace, and no corrupt byte in the cache. The repair the
    error describes then works."""
    prefix = "corruption-test"  # the committed remote `s3`, moved for this test alone (config.local in both clones)
    clone = clone_of(origin, published, home, tmp_path / "project")
    for repo in (colleague, clone):
        ok(repo, home, "dvc", "remote", "modify", "--local", "s3", "url", f"s3://{BUCKET}/{prefix}")
    try:
        ok(colleague, home, "dvc", "push", "-r", "s3", "package", **aws_env())
        pull = ("python", "-m", "workflow", "pull", "-r", "s3", "package")
        ok(clone, home, *pull, **aws_env())
        good = (clone / PACKAGED_WEIGHTS).read_bytes()
        oid, key = md5(good), object_key(prefix, good)

        moto.client().put_object(Bucket=BUCKET, Key=key, Body=b"not the weights")
        cached = clone / ".dvc/cache/files/md5" / oid[:2] / oid[2:]
        cached.chmod(0o644)
        cached.unlink()  # the clone no longer has it: the pull must fetch the corrupt copy
        for verify in ("true", "false"):  # the check does not rest on the remote's `verify`
            ok(clone, home, "dvc", "remote", "modify", "--local", "s3", "verify", verify)
            failed = run(clone, home, *pull, **aws_env())
            assert failed.returncode == 1, failed.stdout + failed.stderr
            error = failed.stderr
            assert f"{PACKAGED_WEIGHTS} (output models/pipeline): md5 {oid} at s3://{BUCKET}/{key}" in error, error
            assert "corrupt on remote 's3'" in error and "dvc checkout models/pipeline" in error
            assert "dvc push -r s3" in error
            assert (clone / PACKAGED_WEIGHTS).read_bytes() == good  # the previous good copy, kept
            assert not cached.exists()  # and the corrupt bytes not kept

        # The repair, as the error says: delete what it lists from the remote, push again from the colleague
        urls = re.findall(rf"^\s+s3://{BUCKET}/(\S+)$", error, flags=re.M)
        assert key in urls and any(u.endswith(".dir") for u in urls)
        for url_key in urls:
            moto.client().delete_object(Bucket=BUCKET, Key=url_key)
        ok(colleague, home, "dvc", "push", "-r", "s3", "package", **aws_env())
        ok(clone, home, *pull, **aws_env())
        assert (clone / PACKAGED_WEIGHTS).read_bytes() == good and cached.read_bytes() == good
    finally:  # the colleague's clone serves the other tests: its remote back where it was
        ok(colleague, home, "dvc", "remote", "modify", "--local", "--unset", "s3", "url")
