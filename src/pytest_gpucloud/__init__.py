"""Run GPU-marked pytest tests on ephemeral cloud GPU instances."""
