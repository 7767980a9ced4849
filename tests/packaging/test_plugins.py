"""Plugin discovery (``anomalib_tiled.integration.plugins``) and the start-up hook that wires it into anomalib's CLI."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import anomalib.cli
import anomalib.cli.pipelines
import pytest
from anomalib.cli import AnomalibCLI
from anomalib.pipelines import Benchmark

from anomalib_tiled.integration import plugins
from anomalib_tiled.integration.pipeline import TiledPipeline
from anomalib_tiled.integration.plugins import PluginWarning, register_pipelines
from tests.conftest import REPO as ROOT

HOOK_SOURCE = ROOT / "startup" / "anomalib_tiled_autoload.py"
DISABLE_ENV = "ANOMALIB_DISABLE_PLUGIN_AUTOLOAD"
BIN = Path(sys.executable).parent

_PIPELINE = '''
import pluggy
from anomalib.pipelines.components.base import Pipeline
from jsonargparse import ArgumentParser

hookimpl = pluggy.HookimplMarker("anomalib_plugins")


class FakePipeline(Pipeline):
    """Fake third-party pipeline."""

    def _setup_runners(self, args):
        return []


class OtherPipeline(FakePipeline):
    """Another fake pipeline."""


class NestedPipeline(FakePipeline):
    @staticmethod
    def get_parser(parser=None):
        nested = ArgumentParser()
        nested.add_subcommands().add_subcommand("inner", ArgumentParser())
        return nested


class FailingParserPipeline(FakePipeline):
    @staticmethod
    def get_parser(parser=None):
        raise ValueError("no parser today")
'''

# Fake plugin modules, each behind an entry point of the ``anomalib.plugins`` group.
FAKE_PLUGINS = {
    "good": _PIPELINE + '\n@hookimpl\ndef anomalib_register_pipelines():\n    return {"good": FakePipeline}\n',
    "broken": 'raise ImportError("boom")\n',
    "nohook": "VALUE = 1\n",
    "raising": _PIPELINE + '\n@hookimpl\ndef anomalib_register_pipelines():\n    raise RuntimeError("kaput")\n',
    "garbage": _PIPELINE + '\n@hookimpl\ndef anomalib_register_pipelines():\n    return ["good"]\n',
    "clash": _PIPELINE
    + textwrap.dedent("""
        @hookimpl
        def anomalib_register_pipelines():
            return {"train": FakePipeline, "benchmark": OtherPipeline, "extra": OtherPipeline}
        """),
    "invalid": _PIPELINE
    + textwrap.dedent("""
        @hookimpl
        def anomalib_register_pipelines():
            return {
                "number": 42,
                "bad name!": FakePipeline,
                "nested": NestedPipeline,
                "failing": FailingParserPipeline,
            }
        """),
}


def _module(name: str) -> str:
    return f"fake_anomalib_plugin_{name}"


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Install the fake plugins as a distribution on ``sys.path``; yields entry point name -> module."""
    for name, source in FAKE_PLUGINS.items():
        (tmp_path / f"{_module(name)}.py").write_text(source)
    dist_info = tmp_path / "fake_anomalib_plugins-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-anomalib-plugins\nVersion: 1.0\n")
    lines = [f"{name} = {_module(name)}" for name in FAKE_PLUGINS]
    (dist_info / "entry_points.txt").write_text("[anomalib.plugins]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield {name: _module(name) for name in FAKE_PLUGINS}
    for name in FAKE_PLUGINS:
        sys.modules.pop(_module(name), None)


def _warnings_by_plugin(record: pytest.WarningsRecorder) -> dict[str, list[str]]:
    by_plugin: dict[str, list[str]] = {}
    for warning in record:
        if not issubclass(warning.category, PluginWarning):
            continue
        message = str(warning.message)
        match = re.match(r"anomalib plugin '([^']+)' \(", message)
        assert match, message
        by_plugin.setdefault(match[1], []).append(message)
    return by_plugin


def test_register_pipelines_keeps_good_plugins_and_warns_about_broken_ones(fake_plugins: dict[str, str]) -> None:
    registry: dict = {"benchmark": Benchmark}
    with pytest.warns(PluginWarning) as record:
        register_pipelines(registry)

    good, clash = sys.modules[fake_plugins["good"]], sys.modules[fake_plugins["clash"]]
    fake = {name: pipeline for name, pipeline in registry.items() if name != "tiled"}
    assert fake == {"benchmark": Benchmark, "good": good.FakePipeline, "extra": clash.OtherPipeline}

    warned = _warnings_by_plugin(record)
    assert set(warned) == {"broken", "nohook", "raising", "garbage", "clash", "invalid"}
    assert "entry point 'broken = fake_anomalib_plugin_broken' of fake-anomalib-plugins 1.0" in warned["broken"][0]
    assert "failed to load (ImportError: boom)" in warned["broken"][0]
    assert "implements no anomalib_register_pipelines hook" in warned["nohook"][0]
    assert "raised RuntimeError: kaput" in warned["raising"][0]
    assert "returned list; it must return dict[str, type[Pipeline]]" in warned["garbage"][0]
    assert len(warned["clash"]) == 2
    assert "'train' clashes with anomalib's own 'train' subcommand" in warned["clash"][0]
    assert "'benchmark' is already taken by anomalib.pipelines.benchmark.pipeline.Benchmark" in warned["clash"][1]
    invalid = "\n".join(warned["invalid"])
    assert len(warned["invalid"]) == 4
    assert "pipeline 'number' is int, not a subclass of anomalib.pipelines.components.base.Pipeline" in invalid
    assert "pipeline name 'bad name!' is not a valid subcommand" in invalid
    assert "NestedPipeline.get_parser() has subcommands" in invalid
    assert "FailingParserPipeline.get_parser() raised ValueError: no parser today" in invalid


def test_register_pipelines_again_is_a_no_op_for_registered_pipelines(fake_plugins: dict[str, str]) -> None:
    registry: dict = {"benchmark": Benchmark}
    with pytest.warns(PluginWarning):
        register_pipelines(registry)
    before = dict(registry)
    with pytest.warns(PluginWarning) as record:
        register_pipelines(registry)

    assert registry == before
    assert "good" not in _warnings_by_plugin(record)


def test_own_entry_point_registers_tiled() -> None:
    registry: dict = {"benchmark": Benchmark}
    register_pipelines(registry)

    assert registry["tiled"] is TiledPipeline


def test_reserved_subcommands_are_anomalib_cli_subcommands() -> None:
    # Guards against anomalib adding a subcommand that a plugin could then shadow.
    anomalib_own = {"install", *AnomalibCLI.subcommands(), *AnomalibCLI.anomalib_subcommands()}

    assert anomalib_own == plugins.RESERVED_SUBCOMMANDS


def test_anomalib_cli_sees_pipelines_registered_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # anomalib.cli.cli bound PIPELINE_REGISTRY at import: only changes to that very dict reach the CLI.
    registry = anomalib.cli.pipelines.PIPELINE_REGISTRY
    monkeypatch.delitem(registry, "tiled", raising=False)  # as if the start-up hook had not run
    with pytest.raises(SystemExit):
        AnomalibCLI(["tiled", "eval", "--root", "x"], run=False)

    register_pipelines(registry)

    cli = AnomalibCLI(["tiled", "eval", "--root", "x"], run=False)
    assert cli.subcommand == "tiled"
    assert list(cli.config.tiled.args) == ["eval", "--root", "x"]


# -- start-up hook, in process: the repository's copy of the hook on a fresh import of anomalib.cli.pipelines


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The hook module from ``startup/``, with ``anomalib.cli.pipelines`` out of ``sys.modules``."""
    spec = importlib.util.spec_from_file_location("_anomalib_tiled_autoload_under_test", HOOK_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "PipelineRegistryFinder"])
    monkeypatch.delitem(sys.modules, "anomalib.cli.pipelines")
    monkeypatch.setattr(anomalib.cli, "pipelines", anomalib.cli.pipelines)
    return module


def _finders(hook: ModuleType) -> int:
    return sum(isinstance(finder, hook.PipelineRegistryFinder) for finder in sys.meta_path)


def test_hook_registers_pipelines_once_anomalib_cli_pipelines_is_imported(hook: ModuleType) -> None:
    hook.install()
    hook.install()
    assert _finders(hook) == 1
    assert hook.PipelineRegistryFinder().find_spec("json", None) is None

    module = importlib.import_module("anomalib.cli.pipelines")

    assert {"benchmark": Benchmark, "tiled": TiledPipeline} == module.PIPELINE_REGISTRY
    assert _finders(hook) == 0
    # The real loader is back in place: the module looks as if imported without the hook.
    assert type(module.__loader__).__name__ == "SourceFileLoader"
    assert module.__spec__.loader is module.__loader__


def test_hook_is_not_installed_when_disabled(hook: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_ENV, "1")
    hook.install()

    assert _finders(hook) == 0
    assert "tiled" not in importlib.import_module("anomalib.cli.pipelines").PIPELINE_REGISTRY


def test_hook_failure_warns_and_anomalib_still_imports(hook: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(registry: dict) -> None:
        raise RuntimeError("registry on fire")

    monkeypatch.setattr(plugins, "register_pipelines", fail)
    hook.install()
    with pytest.warns(UserWarning, match="anomalib plugins not loaded: RuntimeError: registry on fire"):
        module = importlib.import_module("anomalib.cli.pipelines")

    assert {"benchmark": Benchmark} == module.PIPELINE_REGISTRY


def test_hook_without_anomalib_tiled_warns_and_anomalib_still_imports(
    hook: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "anomalib_tiled.integration.autoload", None)  # import fails
    hook.install()
    with pytest.warns(UserWarning, match="anomalib plugins not loaded: .*reinstall anomalib-tiled"):
        module = importlib.import_module("anomalib.cli.pipelines")

    assert {"benchmark": Benchmark} == module.PIPELINE_REGISTRY
    assert _finders(hook) == 0


# -- installed entry points, as a user runs them: one process each, started together (each imports anomalib)

COMMANDS = {
    "anomalib": [str(BIN / "anomalib"), "--help"],
    "anomalib tiled": [str(BIN / "anomalib"), "tiled", "--help"],
    "anomalib-tiled": [str(BIN / "anomalib-tiled"), "--help"],
    "python -m anomalib_tiled": [sys.executable, "-m", "anomalib_tiled", "--help"],
    "disabled": [str(BIN / "anomalib"), "--help"],
}


@pytest.fixture(scope="module")
def help_outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("help")
    env = {key: value for key, value in os.environ.items() if key != DISABLE_ENV}
    env["COLUMNS"] = "120"
    processes = {
        name: subprocess.Popen(
            command,
            cwd=cwd,
            env={**env, DISABLE_ENV: "1"} if name == "disabled" else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in COMMANDS.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(COMMANDS[name], process.returncode, stdout, stderr)
    return results


@pytest.mark.slow
def test_anomalib_help_lists_tiled(help_outputs: dict[str, subprocess.CompletedProcess]) -> None:
    result = help_outputs["anomalib"]

    assert result.returncode == 0, result.stderr
    assert re.search(r"\btiled\s+Tiled ensemble", result.stdout), result.stdout


@pytest.mark.slow
def test_anomalib_help_without_autoload_has_no_tiled(help_outputs: dict[str, subprocess.CompletedProcess]) -> None:
    result = help_outputs["disabled"]

    assert result.returncode == 0, result.stderr
    assert "benchmark" in result.stdout
    assert "tiled" not in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", ["anomalib tiled", "anomalib-tiled", "python -m anomalib_tiled"])
def test_tiled_help_lists_subcommands(help_outputs: dict[str, subprocess.CompletedProcess], command: str) -> None:
    result = help_outputs[command]

    assert result.returncode == 0, result.stderr
    for subcommand in ("train", "eval", "predict"):
        assert re.search(rf"^\s+{subcommand}\s+\w", result.stdout, re.MULTILINE), result.stdout
