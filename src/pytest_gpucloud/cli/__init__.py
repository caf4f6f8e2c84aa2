"""``python -m pytest_gpucloud COMMAND``: the commands outside a pytest session.

May import: every layer except ``session`` and ``sim``.
"""
