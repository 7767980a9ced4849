"""anomalib-tiled: the tiled ensemble for high-resolution anomaly detection, as an anomalib plugin.

Importing the package is cheap (the ``.pth`` start-up hook imports it); the engine and its heavy
dependencies load on first use of :class:`TiledEnsembleEngine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["TiledEnsembleEngine", "__version__"]

if TYPE_CHECKING:
    from anomalib_tiled.engine import TiledEnsembleEngine


def __getattr__(name: str) -> Any:
    if name == "TiledEnsembleEngine":
        from anomalib_tiled.engine import TiledEnsembleEngine  # noqa: PLC0415

        return TiledEnsembleEngine
    msg = f"module 'anomalib_tiled' has no attribute {name!r}"
    raise AttributeError(msg)
