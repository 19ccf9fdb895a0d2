"""Self-contained HTML pages and the figures on them (the run report, the experiment comparison).

The layer map: docs/ARCHITECTURE.md."""
