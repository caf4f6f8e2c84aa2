"""The pytest session with --gpu-cloud: what runs in the process that owns the items."""
