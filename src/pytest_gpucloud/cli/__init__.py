"""``python -m pytest_gpucloud COMMAND``: the commands outside a pytest session.

May import: every layer below ``desk`` (never ``session`` nor ``sim``).
"""
