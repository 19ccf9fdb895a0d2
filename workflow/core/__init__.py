"""The ground every layer stands on: params (config), atomic artifacts, runtime policy, environment, faults.

The layer map: docs/ARCHITECTURE.md."""
