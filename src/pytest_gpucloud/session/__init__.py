"""The ``--gpu-cloud`` pytest session: controller, replay of remote reports, interrupts, the
engine thread and the stash keys. Only this layer (and ``plugin.py``) calls pytest hooks.

May import: every layer below it (``desk``, ``features``, ``scheduling``, ``machine``,
``providers``, ``transport``, ``config``, ``core``, ``remote``).
"""
