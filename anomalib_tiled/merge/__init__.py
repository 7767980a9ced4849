"""Merging: tile scaling, per-stage statistics and their policy, tile predictions merged into images, seam smoothing."""
