# Helpers shared by the rules: paths from params.yaml, each stage's code, and its params.
from workflow.config import params_from_dict

params_from_dict(config, source="params.yaml")  # validate when the workflow is parsed

P = config["paths"]
GROUND = ["config", "artifacts", "faults", "cli"]


def code(*modules):
    """The stage's own modules plus the shared ground it imports: a change to any re-runs it."""
    return [f"workflow/{m}.py" for m in (*modules, *GROUND)]


def params_of(*keys):
    """{dotted key: value} of the params a stage reads; Snakemake re-runs the job when one changes."""
    values = {}
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        values[key] = value
    return values
