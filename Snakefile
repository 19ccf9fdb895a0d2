"""The pipeline, Snakemake's way:  snakemake --cores all [--configfile configs/<preset>.yaml]

The same DAG as dvc.yaml: the same stages running the same `python -m workflow <stage>` commands
on the same inputs, outputs and params (tests/test_dag.py fails if the two drift apart).
params.yaml is the config, with `--configfile` presets and `--config` merged over it; each job runs
on that merged config (`--params logs/params/<hash>.yaml`) and keeps its stderr in logs/<stage>.log.
profiles/default (loaded automatically) lets one GPU job run at a time.
`snakemake --report reports/snakemake.html` (after a run) collects the grid, the loss plot, the metrics
and the run report into Snakemake's own self-contained report.
"""
from snakemake.utils import min_version

min_version("9.27")  # the version this workflow is tested with (requirements.txt)


configfile: "params.yaml"


report: "workflow/pages/captions/workflow.rst"  # snakemake --report reports/snakemake.html (after a run)


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/package.smk"


rule all:
    input:
        rules.report.output.report,
        rules.evaluate.output.metrics,
        rules.fid_sweep.output.fid_steps,
        rules.package.output.pipeline,
    default_target: True
