"""Data: image sources, ``.npy`` files, splits and their decode-once cache, tile datasets, synthetic data."""
