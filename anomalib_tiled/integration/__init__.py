"""Integration with anomalib: the ``anomalib tiled`` plugin, its pipeline, the start-up hook and third-party notices."""
