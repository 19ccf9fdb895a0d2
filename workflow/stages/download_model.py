"""Stage download_model: fetch `model.pretrained` into `paths.base_model` (a pipeline's parts + BASE.json).

    python -m workflow download_model [--params params.yaml]

Text-to-image runs only: without `model.pretrained` it writes BASE.json saying so, and nothing else.
Like download, it may read the network (`hf:` models; `HF_ENDPOINT`, `HF_HUB_OFFLINE`, `HF_TOKEN` or the
token `hf auth login` saved), and pinning `model.revision` to the recorded sha makes reruns offline.
What is taken and why: workflow/sources/pretrained.py.
"""

from workflow.core.config import Params
from workflow.sources.pretrained import fetch_pretrained


def run(params: Params) -> dict:
    """Fetch `model.pretrained` into `paths.base_model`; the BASE.json record."""
    return fetch_pretrained(params)


def headline(record: dict, params: Params) -> str:
    if record["kind"] == "none":
        return f"download_model: no `model.pretrained`, nothing to fetch -> {params.paths.base_model}"
    where = f" at {record['sha']} from {record['endpoint']}" if record["kind"] == "hf" else ""
    size = sum(f["size"] for f in record["files"]) / 2**20
    return (
        f"download_model: {record['class_name']} {params.model.pretrained}{where}, {len(record['files'])} files "
        f"({size:,.1f} MiB) -> {params.paths.base_model}"
    )
