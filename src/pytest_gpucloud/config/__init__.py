"""Configuration: options, ini keys and environment into settings; reads pytest only."""
