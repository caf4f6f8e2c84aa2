"""The ``--gpu-cloud`` session in this process: what runs where, and its local side."""
