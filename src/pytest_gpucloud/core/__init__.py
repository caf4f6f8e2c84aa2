"""The bottom layer: what every other layer may import."""
