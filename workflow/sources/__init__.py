"""Where datasets come from: embedded packages, a local folder, the Hugging Face Hub (or a mirror).

The layer map: docs/ARCHITECTURE.md."""
