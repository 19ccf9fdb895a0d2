"""The Hugging Face Hub (or a mirror of it) as the download stage sees it: the files a split needs, at one commit.

    from workflow.sources.hub import HubEnv, HubRepo, snapshot
    repo = HubRepo("huggan/smithsonian_butterflies_subset")            # a dataset, named by data.source
    sha, folder, chosen = snapshot(repo, "main", HubEnv.from_environ(), select)

`select(folder, listing)` sees the repository's card files (a dataset's README.md and .huggingface.yaml,
a model's README.md and model_index.json, in `folder`) and the commit's file listing ({path: size}), and
returns what to download: an object whose `.files` are repo paths (workflow/sources/fetch.py resolves a
dataset config's split with `datasets`, workflow/sources/pretrained.py picks a pipeline's weights).
Only those files are fetched.

Everything comes from the environment, read when the stage runs (not when huggingface_hub was
imported, which is when the library itself reads HF_ENDPOINT, huggingface_hub#2871):
  HF_ENDPOINT      the Hub or a mirror (default https://huggingface.co), passed to every call
  HF_HUB_OFFLINE   1: no network at all, the local cache only
  HF_TOKEN         for private or gated repositories, else the token `hf auth login` saved (huggingface_hub's
                   own look-up, `get_token()`); sent to the endpoint only, never written, never printed
  HF_HOME / HF_HUB_CACHE, HF_HUB_ETAG_TIMEOUT   huggingface_hub's own cache folder and metadata timeout

huggingface_hub's cache does the heavy lifting: files already in the cache are not fetched again,
an interrupted file resumes from its `.incomplete` part (where the server honours Range), sizes are
checked against the server's, the commit's file listing is cached with it, and `local_files_only`
serves a branch or sha from the cache only when the cached listing says every requested file is
there. This module adds what users need around it: the revision resolved to a commit sha, retries
with backoff on network errors, the cache when the mirror is unreachable (saying so), and one clear
ConfigError for each way it can fail.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2  # huggingface_hub's HTTP client: its network errors
from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_token_to_send

from workflow.core.config import ConfigError

DEFAULT_ENDPOINT = "https://huggingface.co"
ATTEMPTS = 3  # tries of the network part before falling back to the cache
BACKOFF_SECONDS = 1.0  # wait before the second try, doubled before each further one
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
TRUE = {"1", "ON", "YES", "TRUE"}
# Worth another try: no connection, a timeout, a reset; LocalEntryNotFoundError (or no cached listing)
# is how snapshot_download reports that it lost the network with nothing in the cache.
TRANSIENT = (httpx2.TransportError, LocalEntryNotFoundError, CachedRepoTreeNotFoundError)
DATASET_CARD = ("README.md", ".huggingface.yaml")  # the card and its standalone YAML: they declare configs
Select = Callable[[Path, dict[str, int]], Any]  # (card folder, {path: size}) -> what to fetch, with `.files`


@dataclass(frozen=True)
class HubEnv:
    endpoint: str
    offline: bool
    token: str | None = field(default=None, repr=False)  # never in a repr, a message or a record

    @classmethod
    def from_environ(cls, environ=os.environ) -> HubEnv:
        """Endpoint and offline flag from `environ`; the token huggingface_hub will send (HF_TOKEN, else
        the file `hf auth login` wrote under HF_HOME), kept only to say whether one is set and to keep
        it out of messages."""
        offline = environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or ""
        return cls(
            endpoint=(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            offline=offline.upper() in TRUE,
            token=get_token_to_send(None),
        )

    @property
    def host(self) -> str:
        return host(self.endpoint)

    @property
    def shown(self) -> str:
        """The endpoint as messages show it: scheme and host, no credentials, path or query."""
        return f"{urlsplit(self.endpoint).scheme}://{self.host}"


def host(endpoint: str) -> str:
    """The endpoint's host[:port] only: never credentials (`user:token@`), never a path or query."""
    return urlsplit(endpoint).netloc.rsplit("@", 1)[-1]


@dataclass(frozen=True)
class HubRepo:
    """A repository as a param names it: what to fetch, and the keys a message names."""

    repo_id: str
    repo_type: str = "dataset"  # "dataset" | "model"
    source_key: str = "data.source"
    revision_key: str = "data.revision"
    card_files: tuple[str, ...] = DATASET_CARD  # fetched first, for `select`: what the repo says of its files

    @property
    def source(self) -> str:
        return f"hf:{self.repo_id}"


class Unreachable(Exception):
    """The endpoint did not answer (after retries)."""


def snapshot(repo: HubRepo, revision: str, env: HubEnv, select: Select) -> tuple[str, Path, Any]:
    """(commit sha, local snapshot folder, what `select` chose) of `repo` at `revision`.

    Only the card files and `select`'s files are fetched. A commit sha whose files are all in the cache is
    used without any network request. Otherwise they are downloaded from `env.endpoint`; if that is
    unreachable (or HF_HUB_OFFLINE is set), the cache serves `revision` when it holds every file
    needed, and a ConfigError says what to set when it does not.
    """
    if COMMIT_SHA.fullmatch(revision) and (cached := from_cache(repo, revision, select)):
        return cached
    if env.offline:
        tried = "HF_HUB_OFFLINE is set, so no download was tried"
    else:
        try:
            return download(repo, revision, env, select)
        except Unreachable as exc:
            tried = f"{env.shown} did not answer after {ATTEMPTS} attempts ({exc})"
    cached = from_cache(repo, revision, select)
    if cached is None:
        raise ConfigError(not_available(repo, revision, tried, env))
    if not env.offline:
        print(
            f"download: {tried}; using the cached snapshot {cached[0]} of {repo.source} at revision {revision!r}",
            file=sys.stderr,
        )
    return cached


class StaleSnapshot(Exception):
    """snapshot_download answered from the cache's older record of a branch: its own request failed."""


def fetch(
    repo: HubRepo, revision: str, select: Select, env: HubEnv | None, expect: str | None = None
) -> tuple[str, Path, Any]:
    """The card files and the commit's listing, then `select`'s files: from `env.endpoint`, or with env
    None from the cache alone (huggingface_hub's `local_files_only`, which checks the cached listing).
    With `expect`, the commit `revision` resolved to must be that one, before any data file is fetched."""
    where = {"endpoint": env.endpoint} if env else {"local_files_only": True}
    kind = {"repo_type": repo.repo_type}
    cards = list(repo.card_files)
    folder = Path(snapshot_download(repo.repo_id, revision=revision, allow_patterns=cards, **kind, **where))
    sha = folder.name
    if expect is not None and sha != expect:  # answered from the cache's older record of the branch
        raise StaleSnapshot(f"{revision!r} is at {expect} but the download answered {sha} from the cache")
    listing = {f.path: f.size for f in get_cached_repo_tree(repo.repo_id, revision=sha, **kind)}
    chosen = select(folder, listing)
    # exact paths, not patterns: a `[` or `*` in a file name matches only itself
    names = [glob.escape(name) for name in chosen.files]
    snapshot_download(repo.repo_id, revision=sha, allow_patterns=names, **kind, **where)
    return sha, folder, chosen


def from_cache(repo: HubRepo, revision: str, select: Select) -> tuple[str, Path, Any] | None:
    """The cache's snapshot of `revision` (a sha, or a branch/tag it has seen) if it holds every file needed."""
    try:
        return fetch(repo, revision, select, env=None)
    except (LocalEntryNotFoundError, CachedRepoTreeNotFoundError):  # IncompleteSnapshotError is one
        return None


def download(repo: HubRepo, revision: str, env: HubEnv, select: Select) -> tuple[str, Path, Any]:
    """Resolve and download, retrying network errors with backoff; Unreachable if every try failed."""
    api = HfApi(endpoint=env.endpoint)
    last = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            wait = BACKOFF_SECONDS * 2 ** (attempt - 1)
            print(f"download: {env.shown}: {last}; retrying in {wait:g} s ({attempt + 1}/{ATTEMPTS})", file=sys.stderr)
            time.sleep(wait)
        try:
            # first: snapshot_download itself would fall back to the cache without a word
            sha = check_revision(api, repo, revision, env, final=attempt == ATTEMPTS - 1)
            # by name: the cache records what `main` is; where its own request fails, snapshot_download
            # answers from that record without a word, hence `expect`
            return fetch(repo, revision, select, env, expect=sha)
        except (*TRANSIENT, StaleSnapshot) as exc:
            last = describe(exc, env)
        except GatedRepoError:  # the card may be open and the data files gated
            raise ConfigError(gated(repo, env)) from None
        except HfHubHTTPError as exc:
            if not transient_status(exc):
                raise ConfigError(
                    f"`{repo.source_key}` {repo.source!r} at revision {revision!r}: {env.shown} (HF_ENDPOINT) "
                    f"answered {describe(exc, env)}"
                ) from None
            last = describe(exc, env)
    raise Unreachable(last)


def status(exc: HfHubHTTPError) -> int | None:
    return exc.response.status_code if exc.response is not None else None


def transient_status(exc: HfHubHTTPError) -> bool:
    code = status(exc)
    return code is None or code >= 500 or code in (408, 429)


def describe(exc: BaseException, env: HubEnv) -> str:
    """`ErrorType: first line`, with the endpoint as `env.shown` (no credentials) and never the token."""
    cause = exc.__cause__ if isinstance(exc, LocalEntryNotFoundError) and exc.__cause__ else exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    text = text.replace(env.endpoint, env.shown)
    if env.token:
        text = text.replace(env.token, "<HF_TOKEN>")
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


def check_revision(api: HfApi, repo: HubRepo, revision: str, env: HubEnv, final: bool = True) -> str:
    """The commit sha `revision` names, or a ConfigError that says which of repo or revision is wrong.

    Network errors and server errors (5xx, 408, 429) propagate for the caller to retry. Mirrors do not
    all answer like the Hub: olah answers "repository not found" (401) for a missing branch and a 500
    for a missing sha, so such a failure is checked against the repository's `main` branch; a 500 only
    on the `final` try, since a server having a bad moment answers the same, and a rate limit or a
    gateway error never (a correct pin must not be called missing).
    """
    timeout = constants.HF_HUB_ETAG_TIMEOUT  # repo_info has no timeout of its own
    try:
        return api.repo_info(repo.repo_id, repo_type=repo.repo_type, revision=revision, timeout=timeout).sha
    except RevisionNotFoundError:
        raise ConfigError(revision_not_found(repo, revision, env)) from None
    except GatedRepoError:
        raise ConfigError(gated(repo, env)) from None
    except HfHubHTTPError as exc:
        missing = isinstance(exc, RepositoryNotFoundError) or status(exc) in (401, 403, 404)
        maybe_missing = missing or (final and status(exc) == 500)
        if revision != "main" and maybe_missing and has_main(api, repo, timeout):
            raise ConfigError(revision_not_found(repo, revision, env)) from None
        if missing:
            raise ConfigError(repo_not_found(repo, env)) from None
        raise


def has_main(api: HfApi, repo: HubRepo, timeout: float) -> bool:
    for _ in range(2):  # a server that just failed may reset the kept-alive connection: one more try
        try:
            api.repo_info(repo.repo_id, repo_type=repo.repo_type, revision="main", timeout=timeout)
            return True
        except HfHubHTTPError:
            return False
        except httpx2.TransportError:
            continue
    return False


# --- messages: what happened, where, and what to set ------------------------------------------------

LOGIN = "set HF_TOKEN in the environment or log in once with `hf auth login`"


def repo_not_found(repo: HubRepo, env: HubEnv) -> str:
    token = (
        "a token is set (HF_TOKEN or `hf auth login`): check that it grants access to it"
        if env.token
        else f"a private or gated {repo.repo_type} needs a token: {LOGIN}"
    )
    return (
        f"`{repo.source_key}` {repo.source!r}: {repo.repo_type} not found at {env.shown} (HF_ENDPOINT). "
        f"Check the name; {token}; a mirror may not carry every {repo.repo_type}."
    )


def gated(repo: HubRepo, env: HubEnv) -> str:
    token = "the token set (HF_TOKEN or `hf auth login`)" if env.token else "no token set"
    return (
        f"`{repo.source_key}` {repo.source!r} at {env.shown} (HF_ENDPOINT) is gated and {token} grants access: "
        f"accept its conditions on its Hub page, then {LOGIN} with a token of that account."
    )


def revision_not_found(repo: HubRepo, revision: str, env: HubEnv) -> str:
    return (
        f"`{repo.revision_key}` {revision!r}: no such branch, tag or commit in {repo.source!r} at {env.shown} "
        "(HF_ENDPOINT); set it to an existing one, or to null for `main`."
    )


def not_available(repo: HubRepo, revision: str, tried: str, env: HubEnv) -> str:
    source, what = repo.source, repo.repo_type
    return (
        f"`{repo.source_key}` {source!r} at revision {revision!r} is not available: {tried}, and the local "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}) holds no complete snapshot of the files it needs. "
        f"To download it, set HF_ENDPOINT to a Hub or mirror you can reach (now {env.shown}; "
        f"e.g. https://hf-mirror.com), unset HF_HUB_OFFLINE (now {'set' if env.offline else 'unset'}), "
        f"and set HF_TOKEN for a private or gated {what} (now {'set' if env.token else 'unset'}) or log "
        "in once with `hf auth login`. "
        f"To work offline later: download once, pin `{repo.revision_key}` to the commit sha the download "
        "recorded, then HF_HUB_OFFLINE=1 uses the cache."
    )
