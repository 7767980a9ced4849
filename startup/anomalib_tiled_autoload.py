"""Start-up hook: load ``anomalib.plugins`` pipelines into anomalib's CLI (docs/plugins.md).

Imported by every Python process (``anomalib_tiled_autoload.pth``/``.start``): keep it tiny and
import nothing that start-up has not loaded already; the work is in ``anomalib_tiled.integration.autoload``.
"""

import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing would cost more than this module
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

TARGET = "anomalib.cli.pipelines"
DISABLE_ENV = "ANOMALIB_DISABLE_PLUGIN_AUTOLOAD"


class PipelineRegistryFinder:
    """One-shot :data:`sys.meta_path` finder that fires on the import of ``anomalib.cli.pipelines``."""

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None", target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        """Spec of ``anomalib.cli.pipelines`` whose loader registers the plugins; None for other modules."""
        if fullname != TARGET:
            return None
        # One shot; off the list before the real finders run so nothing can call back into us.
        uninstall()
        try:
            from anomalib_tiled.integration.autoload import registering_spec  # noqa: PLC0415

            return registering_spec(fullname, path, target)
        except Exception as error:  # noqa: BLE001 - never break importing anomalib
            import importlib.util  # noqa: PLC0415
            import warnings  # noqa: PLC0415

            warnings.warn(f"anomalib plugins not loaded: {error!r}; reinstall anomalib-tiled", stacklevel=2)
            # Not None: the import system would then skip the finder that followed us on sys.meta_path.
            return importlib.util.find_spec(fullname)


def install() -> None:
    """Put the finder first on :data:`sys.meta_path`, once, unless ``$ANOMALIB_DISABLE_PLUGIN_AUTOLOAD`` is set."""
    if not os.environ.get(DISABLE_ENV) and not any(isinstance(f, PipelineRegistryFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PipelineRegistryFinder())


def uninstall() -> None:
    """Take the finder off :data:`sys.meta_path`."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PipelineRegistryFinder)]
