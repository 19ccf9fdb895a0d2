"""The DAG's stages, one module each: run(params) -> summary, headline(summary, params) -> str.

The layer map: docs/ARCHITECTURE.md."""
