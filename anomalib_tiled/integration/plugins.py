"""Plugins for ``anomalib``'s CLI: pipelines from installed packages become ``anomalib`` subcommands.

anomalib builds its CLI from ``anomalib.cli.pipelines.PIPELINE_REGISTRY`` and has no plugin discovery
of its own. This module adds one with `pluggy <https://pluggy.readthedocs.io>`_:

* pluggy project ``anomalib_plugins``, one hook: :meth:`PipelineSpecs.anomalib_register_pipelines`;
* plugins are found through the entry point group ``anomalib.plugins``; each entry point names a
  module (or object) holding hook implementations. anomalib-tiled registers itself there
  (``tiled = "anomalib_tiled.integration.plugins"``, whose hook returns ``{"tiled": TiledPipeline}``);
* :func:`register_pipelines` adds the discovered pipelines to a registry in place. The start-up
  hook ``anomalib_tiled_autoload`` calls it when ``anomalib.cli.pipelines`` is imported.

A third-party package registers its own pipeline the same way::

    # my_package/anomalib_plugin.py
    import pluggy

    hookimpl = pluggy.HookimplMarker("anomalib_plugins")


    @hookimpl
    def anomalib_register_pipelines():
        from my_package.pipeline import MyPipeline  # import lazily: runs on every `anomalib` call

        return {"mine": MyPipeline}

    # pyproject.toml
    [project.entry-points."anomalib.plugins"]
    mine = "my_package.anomalib_plugin"

A broken plugin never breaks ``anomalib``: it is skipped with a :class:`PluginWarning` that names it.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import warnings
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from anomalib.pipelines.components.base import Pipeline

PROJECT_NAME = "anomalib_plugins"
ENTRY_POINT_GROUP = "anomalib.plugins"
HOOK_NAME = "anomalib_register_pipelines"

# anomalib's own subcommands (AnomalibCLI: install, Trainer's fit/validate/test, train/predict/export);
# names already in the registry (benchmark, earlier plugins) are taken as well.
RESERVED_SUBCOMMANDS = frozenset({"install", "fit", "validate", "test", "train", "predict", "export"})
_SUBCOMMAND_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

logger = logging.getLogger(__name__)


class PluginWarning(UserWarning):
    """An ``anomalib.plugins`` plugin failed to load, or one of its pipelines was rejected."""


class PipelineSpecs:
    """Hook specifications of the ``anomalib_plugins`` pluggy project."""

    @hookspec
    def anomalib_register_pipelines(self) -> dict[str, type[Pipeline]]:  # type: ignore[empty-body] # a spec has no body
        """Pipelines to add to ``anomalib``'s CLI, keyed by subcommand name.

        Called on every ``anomalib`` invocation, so import heavy modules inside the implementation.
        Each pipeline becomes ``anomalib <name>``; its ``get_parser()`` must return a
        ``jsonargparse.ArgumentParser`` without subcommands of its own (anomalib nests pipeline
        parsers one level deep), and ``anomalib <name> ...`` calls ``Pipeline().run(namespace)``.

        Returns:
            Mapping of subcommand name (letters, digits, ``_`` and ``-``; not one of anomalib's own
            subcommands) to a subclass of ``anomalib.pipelines.components.base.Pipeline``.
        """


@hookimpl
def anomalib_register_pipelines() -> dict[str, type[Pipeline]]:
    """anomalib-tiled's pipeline: ``anomalib tiled train|eval|predict``."""
    from anomalib_tiled.integration.pipeline import TiledPipeline  # noqa: PLC0415 - keeps discovery cheap

    return {"tiled": TiledPipeline}


def get_plugin_manager() -> pluggy.PluginManager:
    """Plugin manager with every loadable plugin of the ``anomalib.plugins`` entry point group.

    Entry points are loaded one by one: one that fails to import, or that implements no
    ``anomalib_register_pipelines`` hook, is skipped with a :class:`PluginWarning`.
    """
    manager = pluggy.PluginManager(PROJECT_NAME)
    manager.add_hookspecs(PipelineSpecs)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = _entry_point_origin(entry_point)
        if manager.has_plugin(entry_point.name):
            _warn(entry_point.name, where, "a plugin of that name is already loaded; rename the entry point")
            continue
        try:
            plugin = entry_point.load()
            manager.register(plugin, name=entry_point.name)
        except Exception as error:  # noqa: BLE001 - any failure of a third-party import is skipped
            _warn(entry_point.name, where, f"failed to load ({_one_line(error)}); fix or uninstall that package")
            continue
        if not any(impl.plugin is plugin for impl in manager.hook.anomalib_register_pipelines.get_hookimpls()):
            manager.unregister(plugin)
            _warn(
                entry_point.name,
                where,
                f"implements no {HOOK_NAME} hook; decorate it with pluggy.HookimplMarker({PROJECT_NAME!r})",
            )
    return manager


def register_pipelines(
    registry: dict[str, type[Pipeline]],
    plugin_manager: pluggy.PluginManager | None = None,
) -> None:
    """Add the plugins' pipelines to ``registry`` in place.

    The dict is modified, never replaced: ``anomalib.cli.cli`` holds the same object as
    ``anomalib.cli.pipelines.PIPELINE_REGISTRY``. A hook that raises or returns something other than
    ``dict[str, type[Pipeline]]``, and a pipeline whose name clashes with anomalib's subcommands or
    with a pipeline already registered, are skipped with a :class:`PluginWarning`. Registering the
    same pipeline under the same name again is a no-op.

    Args:
        registry: anomalib's pipeline registry (subcommand name -> pipeline class).
        plugin_manager: Plugins to ask; default: :func:`get_plugin_manager` (the installed entry points).
    """
    manager = plugin_manager if plugin_manager is not None else get_plugin_manager()
    # One implementation at a time, in pluggy's call order, so a failure is pinned on its plugin and
    # does not stop the others (a plain hook call would abort at the first exception).
    for impl in reversed(manager.hook.anomalib_register_pipelines.get_hookimpls()):
        where = _plugin_origin(impl.plugin)
        try:
            pipelines = impl.function()
        except Exception as error:  # noqa: BLE001 - any failure of a third-party hook is skipped
            _warn(impl.plugin_name, where, f"{HOOK_NAME}() raised {_one_line(error)}; fix or uninstall that package")
            continue
        if not isinstance(pipelines, dict):
            _warn(
                impl.plugin_name,
                where,
                f"{HOOK_NAME}() returned {type(pipelines).__name__}; it must return dict[str, type[Pipeline]]",
            )
            continue
        for name, pipeline in pipelines.items():
            if registry.get(name) is pipeline:
                continue
            problem = _pipeline_problem(name, pipeline, registry)
            if problem:
                _warn(impl.plugin_name, where, problem)
                continue
            registry[name] = pipeline
            logger.debug("Registered pipeline %r from plugin %r", name, impl.plugin_name)


def _pipeline_problem(name: object, pipeline: object, registry: dict[str, type[Pipeline]]) -> str | None:
    """Why ``pipeline`` can't become ``anomalib <name>``, or None if it can."""
    from anomalib.pipelines.components.base import Pipeline  # noqa: PLC0415 - loaded by anomalib's CLI already
    from jsonargparse import ArgumentParser  # noqa: PLC0415

    if not isinstance(name, str) or not _SUBCOMMAND_NAME.fullmatch(name):
        return f"pipeline name {name!r} is not a valid subcommand; use letters, digits, '_' and '-'"
    if name in RESERVED_SUBCOMMANDS:
        return f"pipeline name {name!r} clashes with anomalib's own '{name}' subcommand; rename the pipeline"
    if name in registry:
        return f"pipeline name {name!r} is already taken by {_qualname(registry[name])}; rename the pipeline"
    if not (isinstance(pipeline, type) and issubclass(pipeline, Pipeline)):
        return (
            f"pipeline {name!r} is {_qualname(pipeline)}, not a subclass of "
            "anomalib.pipelines.components.base.Pipeline; return the class itself"
        )
    # anomalib's CLI builds every pipeline's parser on every call: a failing one would break `anomalib`.
    try:
        parser = pipeline.get_parser()
    except Exception as error:  # noqa: BLE001 - any failure of a third-party parser is skipped
        return f"{_qualname(pipeline)}.get_parser() raised {_one_line(error)}; fix the pipeline"
    where = f"{_qualname(pipeline)}.get_parser()"
    if not isinstance(parser, ArgumentParser):
        return f"{where} returned {type(parser).__name__}; it must return a jsonargparse.ArgumentParser"
    if parser._subparsers is not None:  # noqa: SLF001 - the condition under which jsonargparse refuses to nest it
        return f"{where} has subcommands; anomalib nests pipeline parsers one level deep only, drop them"
    return None


def _warn(plugin_name: str, where: str, problem: str) -> None:
    warnings.warn(f"anomalib plugin {plugin_name!r} ({where}) skipped: {problem}", PluginWarning, stacklevel=3)


def _entry_point_origin(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    package = f" of {dist.metadata['Name']} {dist.version}" if dist is not None else ""
    return f"entry point '{entry_point.name} = {entry_point.value}'{package}"


def _plugin_origin(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__name__


def _qualname(obj: object) -> str:
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return type(obj).__name__


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"
