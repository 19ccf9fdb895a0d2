"""Stage download: fetch `data.source` into `paths.raw` (images/ + SOURCE.json).

    python -m workflow download [--params params.yaml]

The only stage that may read the network (for `hf:` sources; `HF_ENDPOINT`, `HF_HUB_OFFLINE` and
`HF_TOKEN` or the token `hf auth login` saved are honoured, and no token is ever written). The source
logic lives in workflow/sources.py, the Hugging Face side (mirror, cache, pinning, retries) in
workflow/hub.py.
"""
from workflow import sources
from workflow.cli import parse_params


def summary(record: dict, source: str, raw: str) -> str:
    """One line: what was fetched, from where, into where."""
    detail = {"builtin": lambda r: f" (package {r['package']} {r['package_version']})",
              "imagefolder": lambda r: "",
              "hf": lambda r: f" at {r['sha']} from {r['endpoint']}"}[record["kind"]](record)
    skipped = f"; {len(record['skipped'])} rows skipped, see SOURCE.json" if record.get("skipped") else ""
    return f"download: {record['count']} images from {source}{detail} -> {raw}{skipped}"


def main(argv=None) -> dict:
    params = parse_params(argv, __doc__)
    record = sources.fetch(params)
    print(summary(record, params.data.source, params.paths.raw))
    return record


if __name__ == "__main__":
    main()
