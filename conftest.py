"""Top-level conftest: the test suite drives real pytest sessions through ``pytester``."""

pytest_plugins = ["pytester"]
