"""The start-up hook's work, done once ``anomalib.cli.pipelines`` is being imported.

``anomalib_tiled_autoload`` (installed at the site-packages root, imported by every Python process
through ``anomalib_tiled_autoload.pth``) holds only a one-shot :data:`sys.meta_path` finder. When
``anomalib.cli.pipelines`` is imported, that finder calls :func:`registering_spec`: the real spec is
found by the remaining finders and its loader wrapped, so the module is created and executed as
usual and then :func:`anomalib_tiled.integration.plugins.register_pipelines` adds the plugins' pipelines to its
``PIPELINE_REGISTRY`` in place, before ``anomalib.cli.cli`` reads it.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING

from anomalib_tiled.integration.notices import filter_log_lines, filter_warnings, is_tiled_command

if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType


def registering_spec(fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
    """Spec of ``fullname`` from the other :data:`sys.meta_path` finders, with a plugin-registering loader.

    Args:
        fullname: Module being imported (``anomalib.cli.pipelines``).
        path: Its parent package's ``__path__``.
        target: Module being reloaded, if any.

    Returns:
        The spec, or None when no finder knows the module.
    """
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec(fullname, path, target) if find_spec is not None else None
        if spec is not None:
            break
    else:
        return None
    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
        spec.loader = _RegisteringLoader(spec.loader)
    return spec


class _RegisteringLoader:
    """Runs the real loader, then registers the plugins' pipelines in the module's registry."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> object:
        # create_module, get_source, is_package, ...: the real loader answers.
        return getattr(self._loader, name)

    def exec_module(self, module: ModuleType) -> None:
        # The real loader goes back first, so the module looks untouched (reload, inspect, pickle).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        if is_tiled_command(sys.argv):
            # anomalib's start-up (this module imports every model) would print notices that do not
            # concern this command; this process runs nothing else.
            filter_warnings()
            filter_log_lines()
        self._loader.exec_module(module)
        registry = getattr(module, "PIPELINE_REGISTRY", None)
        if registry is None:
            # anomalib installed without its pipelines: there is no registry to add to.
            return
        try:
            from anomalib_tiled.integration.plugins import register_pipelines  # noqa: PLC0415 - pluggy etc. only now

            register_pipelines(registry)
        except Exception as error:  # noqa: BLE001 - never break importing anomalib
            warnings.warn(
                f"anomalib plugins not loaded: {type(error).__name__}: {error}; "
                "reinstall anomalib-tiled, or set ANOMALIB_DISABLE_PLUGIN_AUTOLOAD=1 to skip plugins",
                stacklevel=2,
            )
