"""One module per artifact format: its file names, its writer and its reader, side by side.

The layer map: docs/ARCHITECTURE.md."""
