"""Run sessions: create or resume a run, capture its log, and keep its manifest truthful.

A run's ``manifest.json`` says whether it is complete. :meth:`RunSession.training` moves it through
``training`` → ``trained``, or to ``interrupted`` (Ctrl-C, SIGTERM: finished tiles are kept and the
run can be resumed) or ``failed`` (any other error) — a half-written run never looks complete.
Signal handlers and the console belong to the application (the CLI), not to this module.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from anomalib_tiled.config.checks import check_writable
from anomalib_tiled.errors import RunInterruptedError
from anomalib_tiled.run.config import RunConfig, check_frozen, read_run_config, write_run_config
from anomalib_tiled.run.directory import RunDirectory, RunStatus


def create_run(config: RunConfig, datamodule: Any) -> RunDirectory:
    """A new ``<default_root_dir>/<Model>/<Dataset>/<category>/vN`` run with its ``config.yaml``.

    Raises:
        RunDirectoryError: If ``default_root_dir`` is not writable.
    """
    root = config.settings.runtime.default_root_dir
    check_writable(root)
    dataset = getattr(datamodule, "name", type(datamodule).__name__)
    category = getattr(datamodule, "category", "") or ""
    model = str(config.model_spec["class_path"]).rpartition(".")[2]
    run = RunDirectory.create(root, model, dataset, category)
    write_run_config(run, config)
    return run


def resume_run(root: Path | str, config: RunConfig) -> RunDirectory:
    """An interrupted or failed run, after checking ``config`` keeps what it was trained with.

    Raises:
        RunDirectoryError: If ``root`` is not a run.
        ConfigError: If ``config`` changes a frozen key.
    """
    run = RunDirectory.open(root, require_trained=False, option="--resume")
    check_frozen(read_run_config(run), config.settings, config.model_spec)
    return run


class RunSession:
    """Manifest transitions of one run.

    Args:
        run: The run directory.
        tiles: Number of tile positions (for messages).
    """

    def __init__(self, run: RunDirectory, tiles: int) -> None:
        self.run = run
        self.tiles = tiles
        self.started = time.perf_counter()

    @contextmanager
    def training(self) -> Iterator[None]:
        """Mark the run as training; on the way out, as interrupted or failed if the block raised.

        Raises:
            RunInterruptedError: Instead of ``KeyboardInterrupt``/SIGTERM, with how to resume.
        """
        self.run.update_manifest(status=RunStatus.TRAINING)
        try:
            yield
        except (KeyboardInterrupt, SystemExit) as interrupt:
            raise self._interrupted("interrupted") from interrupt
        except BaseException as error:
            # Lightning stops a fit on SIGTERM with its own exception type.
            if type(error).__name__ == "SIGTERMException":
                raise self._interrupted("stopped by SIGTERM") from error
            self.run.update_manifest(status=RunStatus.FAILED)
            raise

    def trained(self, splits: dict[str, str], stages: dict[str, float]) -> None:
        """Mark the run complete, with the fingerprints of the splits it learned from and its stage times.

        Args:
            splits: Fingerprint of each split, by name.
            stages: Wall seconds of each training stage (``decode``, ``tiles``, ``statistics``).
        """
        # Every tile is recorded and no tile job runs: shared files no tile references (left by killed
        # or retrained jobs) can go, before the run says it is complete.
        self.run.prune_shared()
        # Time of this session only: a resumed run reports the time it took to finish.
        seconds = round(time.perf_counter() - self.started, 1)
        self.run.update_manifest(
            status=RunStatus.TRAINED, splits=splits, training_seconds=seconds, training_stages=stages
        )

    def evaluated(self, output: Path, results: dict[str, float], seconds: float) -> None:
        """Record an evaluation folder, its metrics and its wall seconds in the manifest."""
        manifest = self.run.manifest()
        manifest.setdefault("evaluations", []).append(
            {"dir": str(output.relative_to(self.run.root)), "metrics": results, "seconds": round(seconds, 2)}
        )
        self.run.write_manifest(manifest)

    def _interrupted(self, how: str) -> RunInterruptedError:
        self.run.update_manifest(status=RunStatus.INTERRUPTED)
        done = len(self.run.manifest()["tiles"])
        return RunInterruptedError(
            f"training {how}; {done} of {self.tiles} tiles are saved in {self.run.root}; "
            f"resume with 'anomalib tiled train --resume {self.run.root}'",
        )
