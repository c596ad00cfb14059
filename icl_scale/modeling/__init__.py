"""Models: loading (load.py), tiny test models (tiny.py), named capture points (capture.py)."""
