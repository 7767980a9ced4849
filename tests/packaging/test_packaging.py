"""Packaging of the start-up hook: wheel layout, editable installs, a fresh install and uninstall, start-up cost."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil
import re
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO as ROOT

HOOK_FILES = ("anomalib_tiled_autoload.py", "anomalib_tiled_autoload.pth", "anomalib_tiled_autoload.start")
HOOK_MODULE = "anomalib_tiled_autoload"
DISABLE_ENV = "ANOMALIB_DISABLE_PLUGIN_AUTOLOAD"

needs_hatchling = pytest.mark.skipif(
    importlib.util.find_spec("hatchling") is None, reason="hatchling (the build backend) is not installed"
)


def _build(kind: str, directory: Path) -> Path:
    """Build a ``standard`` or ``editable`` wheel with hatchling's PEP 517 hooks, as pip would."""
    from hatchling import build

    hook = build.build_wheel if kind == "standard" else build.build_editable
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # PEP 517 hooks build the project in the working directory
        return directory / hook(str(directory))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build("standard", tmp_path_factory.mktemp("wheel"))


def _assert_ships_hook(wheel_path: Path) -> None:
    with zipfile.ZipFile(wheel_path) as archive:
        names = set(archive.namelist())
        record_name = next(name for name in names if name.endswith(".dist-info/RECORD"))
        recorded = {line.split(",")[0] for line in archive.read(record_name).decode().splitlines()}
        entry_points = archive.read(record_name.replace("RECORD", "entry_points.txt")).decode()
        for name in HOOK_FILES:
            assert name in names, f"{name} is not at the root of {wheel_path.name}"
            assert name in recorded, f"{name} is not in RECORD, so pip uninstall would leave it behind"
            assert archive.read(name) == (ROOT / "startup" / name).read_bytes()
    assert "[anomalib.plugins]\ntiled = anomalib_tiled.integration.plugins" in entry_points


@needs_hatchling
def test_wheel_ships_startup_hook_at_site_packages_root(wheel: Path) -> None:
    _assert_ships_hook(wheel)


@needs_hatchling
@pytest.mark.skipif(importlib.util.find_spec("editables") is None, reason="editables is not installed")
def test_editable_wheel_ships_startup_hook_too(tmp_path: Path) -> None:
    # hatchling's editable wheels hold a path .pth of their own; force-include must still apply.
    _assert_ships_hook(_build("editable", tmp_path))


def test_installed_startup_hook_is_current() -> None:
    distribution = importlib.metadata.distribution("anomalib-tiled")
    installed = {file.name: file for file in distribution.files or [] if file.name in HOOK_FILES}

    assert set(installed) == set(HOOK_FILES), "start-up hook missing: run `pip install -e .`"
    for name, file in installed.items():
        assert Path(file.locate()).read_bytes() == (ROOT / "startup" / name).read_bytes(), (
            f"installed {name} differs from startup/{name}: run `pip install -e .` again"
        )


def test_start_file_entry_point_installs_the_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python >= 3.15 (PEP 829): skips blank and '#' lines, resolves each `pkg.mod:callable` with
    # pkgutil.resolve_name and calls it without arguments.
    lines = (ROOT / "startup" / "anomalib_tiled_autoload.start").read_text(encoding="utf-8").splitlines()
    entry_points = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    assert entry_points == [f"{HOOK_MODULE}:install"]
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "PipelineRegistryFinder"])
    monkeypatch.delenv(DISABLE_ENV, raising=False)

    pkgutil.resolve_name(entry_points[0])()

    assert [type(f).__name__ for f in sys.meta_path].count("PipelineRegistryFinder") == 1


# -- start-up cost: the hook runs in every Python process


def _python(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, check=True, cwd="/")
    return result.stdout + result.stderr


@pytest.mark.slow
def test_startup_hook_loads_only_its_own_module() -> None:
    env = {key: value for key, value in os.environ.items() if key != DISABLE_ENV}
    code = "import sys; print(*sorted(sys.modules), sep='\\n')"
    enabled = set(_python("-c", code, env=env).split())
    disabled = set(_python("-c", code, env={**env, DISABLE_ENV: "1"}).split())

    assert enabled - disabled == {HOOK_MODULE}


@pytest.mark.slow
def test_startup_hook_import_time() -> None:
    env = {key: value for key, value in os.environ.items() if key != DISABLE_ENV}
    self_us = []
    for _ in range(5):
        output = _python("-X", "importtime", "-c", "pass", env=env)
        match = re.search(rf"^import time:\s+(\d+) \|\s+\d+ \|\s+{HOOK_MODULE}$", output, re.MULTILINE)
        assert match, output
        self_us.append(int(match[1]))
    # About 0.3-0.7 ms on the loaded 2-core dev machine (mostly the import system's first look at
    # site-packages); the bound only catches a heavy import creeping into the hook.
    assert min(self_us) < 5000, self_us


# -- a real install into a fresh virtual environment, then uninstall


@pytest.fixture
def fresh_venv(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A virtual environment without packages; yields its python and site-packages."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    yield python, Path(purelib)


def _pip(python: Path, *args: str) -> None:
    # --python: pip only sees the fresh environment, never this one's packages.
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args], check=True, capture_output=True)


def _run(python: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    # Away from the checkout: `-c` puts the working directory first on sys.path.
    env = {key: value for key, value in os.environ.items() if key != DISABLE_ENV}
    return subprocess.run(
        [str(python), "-c", code, *args],
        check=False,
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "120"},
        cwd=python.parent,
    )


@pytest.mark.slow
@needs_hatchling
@pytest.mark.skipif(importlib.util.find_spec("pip") is None, reason="pip is not installed")
def test_fresh_install_activates_plugin_and_uninstall_removes_hook(wheel: Path, fresh_venv: tuple[Path, Path]) -> None:
    python, purelib = fresh_venv
    _pip(python, "install", "--no-deps", "--no-index", str(wheel))
    assert all((purelib / name).is_file() for name in HOOK_FILES)
    # anomalib and the other dependencies come from this environment, after the fresh site-packages.
    link = purelib / "zz_test_dependencies.pth"
    link.write_text("\n".join([*site.getsitepackages(), site.getusersitepackages()]) + "\n")

    probe = _run(
        python,
        "import sys, anomalib_tiled, anomalib_tiled_autoload as hook; "
        "print(hook.__file__, anomalib_tiled.__file__, *map(type, sys.meta_path))",
    )
    assert probe.stdout.split()[:2] == [
        str(purelib / f"{HOOK_MODULE}.py"),
        str(purelib / "anomalib_tiled" / "__init__.py"),
    ]
    assert "PipelineRegistryFinder" in probe.stdout
    result = _run(python, "import sys; from anomalib.cli.cli import main; sys.argv[0] = 'anomalib'; main()", "--help")
    assert result.returncode == 0, result.stderr
    assert re.search(r"\btiled\s+Tiled ensemble", result.stdout), result.stdout

    link.unlink()
    _pip(python, "uninstall", "--yes", "anomalib-tiled")
    assert not [name for name in HOOK_FILES if (purelib / name).exists()]
    assert not (purelib / "anomalib_tiled").exists()
    finders = _run(python, "import sys; print(*map(type, sys.meta_path))")
    assert finders.returncode == 0, finders.stderr
    assert "PipelineRegistryFinder" not in finders.stdout
