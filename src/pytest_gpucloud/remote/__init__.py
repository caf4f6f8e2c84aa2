"""Code that runs on the instance. Imports only the standard library and pytest.

It is shipped to the instance as a top-level package of its own, so every import inside
it is relative.
"""
