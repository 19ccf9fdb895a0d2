"""Stage download: fetch `data.source` into `paths.raw` (images/ + SOURCE.json).

    python -m workflow download [--params params.yaml]

The only stage that may read the network (for `hf:` sources; `HF_ENDPOINT`, `HF_HUB_OFFLINE` and
`HF_TOKEN` or the token `hf auth login` saved are honoured, and no token is ever written). The source
logic lives in workflow/sources/fetch.py, the Hugging Face side (mirror, cache, pinning, retries) in
workflow/sources/hub.py.
"""

from workflow.core.config import Params
from workflow.sources.fetch import fetch


def run(params: Params) -> dict:
    """Fetch `data.source` into `paths.raw`; the SOURCE.json record."""
    return fetch(params)


def headline(record: dict, params: Params) -> str:
    """One line: what was fetched, from where, into where."""
    detail = {
        "builtin": lambda r: f" (package {r['package']} {r['package_version']})",
        "imagefolder": lambda r: "",
        "hf": lambda r: f" at {r['sha']} from {r['endpoint']}",
    }[record["kind"]](record)
    skipped = f"; {len(record['skipped'])} rows skipped, see SOURCE.json" if record.get("skipped") else ""
    return f"download: {record['count']} images from {params.data.source}{detail} -> {params.paths.raw}{skipped}"
