"""The session layer: pytest hooks' side of a run, and what it leaves behind for people."""
