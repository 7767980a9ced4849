"""``python -m anomalib_tiled train | eval | predict``."""

import sys

from anomalib_tiled.cli import main

sys.exit(main(prog="python -m anomalib_tiled"))
