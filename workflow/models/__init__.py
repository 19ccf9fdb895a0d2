"""The networks: building the UNet and schedulers, the sampling loop, the Inception feature extractor.

The layer map: docs/ARCHITECTURE.md."""
