"""Commands beside the DAG: the benchmark harness, the experiment comparison, presets.

The layer map: docs/ARCHITECTURE.md."""
