"""Pure maths: diffusion training arithmetic and FID/KID. No I/O, no workflow imports.

The layer map: docs/ARCHITECTURE.md."""
