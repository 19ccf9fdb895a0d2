"""`dvc pull` that never lets a corrupt remote object into the workspace, and names it when it finds one.

    python -m workflow pull                     # the workspace's outputs, from the default remote
    python -m workflow pull -r s3               # from another remote
    python -m workflow pull models/pipeline     # some outputs or stages only, as `dvc pull` takes them
    make pull REMOTE=s3

Why not plain `dvc pull`: DVC names each object by the md5 of its bytes, but by default (`verify: false`
for S3) never hashes what it downloads, so an object overwritten on the server lands in the cache and
the workspace with exit code 0. With `verify: true` (this project's remotes) DVC drops such an object,
says so only under `-v` ("corrupted cache file"), counts the fetch a success, and its checkout then
fails with "Is your cache up to date?" and deletes the output from the workspace, the copy you had
before included.

This tool is what `dvc pull` is, `dvc fetch` then `dvc checkout`, with a check between them: every
object the outputs name must be in the local cache and its bytes hash to its name (hashed here,
whatever the remote's `verify`; a bad copy is deleted from the cache). An output with a
missing or corrupt object is not checked out, so its workspace copy stays as it was; the others are.
Then one error names each bad object (its URL on the remote and its md5, the file and the output it
belongs to) and how to recover, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class BadObject:
    output: str  # the output as dvc.yaml or its .dvc file names it
    path: str  # the file it is in the workspace (the output itself for a folder's listing, a `.dir` object)
    md5: str
    url: str  # where it is on the remote
    listing: str | None  # the URL of its folder's listing (`.dir`), for a file inside a folder output
    on_remote: bool  # the remote holds it, so its bytes are corrupt; else it was never pushed


def dvc(*args: str) -> int:
    """A real `dvc` command (this environment's), its output straight to the user's terminal."""
    return subprocess.run([sys.executable, "-m", "dvc", *args]).returncode


def intact(out, oid: str) -> bool:
    """Whether the local cache holds `oid` with bytes that hash to it; a copy that does not is deleted.
    The bytes are hashed here, every time: DVC's own check trusts its state database, which records the
    name a download was asked for as its hash when `verify` is off."""
    from dvc_data.hashfile.hash import file_md5

    cache, path = out.cache, out.cache.oid_to_path(oid)
    if not cache.fs.exists(path):
        return False
    if file_md5(path, cache.fs, name=out.hash_name) == oid.split(".")[0]:
        return True
    cache.fs.remove(path)
    return False


def objects_of(out) -> list[tuple[str, str, bool]]:
    """(md5, workspace path, whether it is a file of a folder) of each object an output needs: its own, or
    each file of its folder listing once that listing is intact."""
    from dvc_data.hashfile.tree import Tree

    output = str(out.def_path)
    if not (out.hash_info.isdir and intact(out, out.hash_info.value)):
        return [(out.hash_info.value, output, False)]
    return [(info.value, "/".join((output, *key)), True) for key, _, info in Tree.load(out.cache, out.hash_info)]


def check_outputs(targets: list[str], remote: str | None) -> tuple[str, list[BadObject], list[str]]:
    """After a fetch: (the remote's name, the objects of `targets`' outputs that the local cache lacks or
    held corrupt, the outputs that are whole). Every file of every cached output is checked."""
    from dvc.repo import Repo

    with Repo() as repo:
        name = remote or repo.config["core"].get("remote")
        storage = repo.cloud.get_remote_odb(name, "pull")
        url = lambda oid: storage.fs.unstrip_protocol(storage.oid_to_path(oid))
        bad, whole = [], []
        for out in repo.index.targets_view(targets or None).outs:
            if not (out.use_cache and out.hash_info and out.hash_info.value):
                continue  # `cache: false` outputs live in git; an output never produced has no object
            output, listing = str(out.def_path), url(out.hash_info.value)
            found = [
                BadObject(output, path, md5, url(md5), listing if in_folder else None, storage.exists(md5))
                for md5, path, in_folder in objects_of(out)
                if not intact(out, md5)
            ]
            bad += found
            if not found:
                whole.append(output)
    return name, bad, whole


def report(remote: str, bad: list[BadObject], others: bool) -> str:
    """The one error: each bad object, what was (not) done, and how to recover."""
    lines = []
    for on_remote, what in (
        (True, "corrupt on remote {!r} (the bytes do not hash to the md5 that names them)"),
        (False, "missing from remote {!r} (never pushed)"),
    ):
        found = [b for b in bad if b.on_remote == on_remote]
        if found:
            lines.append(f"{len(found)} object{'s' if len(found) > 1 else ''} {what.format(remote)}:")
            lines += [f"  {b.path} (output {b.output}): md5 {b.md5} at {b.url}" for b in found]
    outputs = " ".join(sorted({b.output for b in bad}))
    # `dvc push` skips an object the remote has, corrupt or not, and takes a folder whose listing (`.dir`)
    # the remote has as complete: the repair deletes both, then pushes again.
    delete = sorted({b.url for b in bad if b.on_remote} | {b.listing for b in bad if b.listing})
    lines += [
        f"Nothing corrupt reached the cache or the workspace; left as they were (not checked out): {outputs}"
        + ("; the other outputs are checked out." if others else "."),
        "To recover:",
        "  - repair the remote, in the checkout that pushed them (its cache holds the good copies):",
        *(
            ["      delete these from the remote (`aws s3 rm URL`): `dvc push` skips what the remote already has"]
            if delete
            else []
        ),
        *(f"        {url}" for url in delete),
        f"      then `dvc push -r {remote}` there, and pull again here;",
        "  - or rebuild them here: `dvc repro`;",
        f"  - `dvc checkout {outputs}` restores from the local cache once it holds the objects; until then it, like "
        "a plain `dvc pull`, deletes the workspace copy it cannot replace.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workflow pull", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="outputs or stages (default: all of the workspace's)")
    parser.add_argument("-r", "--remote", help="the remote to pull from (default: core.remote, `local`)")
    parser.add_argument("-j", "--jobs", help="parallel transfers (dvc's default: 4 per CPU core)")
    args = parser.parse_args(argv)
    options = [*(["-r", args.remote] if args.remote else []), *(["-j", args.jobs] if args.jobs else [])]

    if dvc("fetch", *options, *args.targets) != 0:
        print(
            "error in pull: `dvc fetch` failed (above), so nothing was checked out. A 403 or Forbidden means the "
            "remote refused the keys: `dvc remote modify --local REMOTE access_key_id ...` and `secret_access_key "
            "...`, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (README, Remotes)",
            file=sys.stderr,
        )
        sys.exit(1)
    remote, bad, whole = check_outputs(args.targets, args.remote)
    if not bad:
        sys.exit(dvc("checkout", *args.targets))
    if whole:  # what arrived intact goes into the workspace; the rest stays as it was
        dvc("checkout", *whole)
    print(f"error in pull: {report(remote, bad, bool(whole))}", file=sys.stderr)
    sys.exit(1)
