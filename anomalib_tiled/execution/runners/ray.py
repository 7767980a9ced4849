"""The ``ray`` runner: one Ray task per tile, on this machine or on a Ray cluster.

Ray places each task by the resources it reserves (CPUs, a GPU or a fraction of one: Ray sets
``CUDA_VISIBLE_DEVICES`` for the task), retries a task whose worker or node died
(``execution.max_retries``), and runs on every node of a cluster. The run directory and the data
must be on storage every node sees (see ``docs/distributed.md``). Ray is an optional dependency:
``pip install "anomalib-tiled[ray]"``.
"""

from __future__ import annotations

import importlib
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from anomalib_tiled.errors import ConfigError
from anomalib_tiled.execution.jobs import TileResult
from anomalib_tiled.execution.runners.placement import RayResources
from anomalib_tiled.execution.runners.serial import TileJob, drive
from anomalib_tiled.execution.runners.worker import Outcome, WorkerSetup, ray_execute
from anomalib_tiled.progress import Task
from anomalib_tiled.settings import RaySettings


def import_ray() -> ModuleType:
    """The ``ray`` module.

    Raises:
        ConfigError: If Ray is not installed.
    """
    try:
        return importlib.import_module("ray")
    except ImportError:
        msg = "execution.runner: 'ray' needs Ray, which is not installed; pip install \"anomalib-tiled[ray]\""
        raise ConfigError(msg) from None


class RayRunner:
    """Runs tile jobs as Ray tasks.

    Args:
        settings: Where the cluster is and the tasks' environment.
        resources: What one tile task reserves, its threads and how many run at once.
        max_retries: Times Ray runs a task again after its worker or node died.
    """

    def __init__(self, settings: RaySettings, resources: RayResources, max_retries: int) -> None:
        self.settings = settings
        self.resources = resources
        self.max_retries = max_retries

    @property
    def parallelism(self) -> int | None:
        """Tasks in flight at once: ``execution.workers``, or None (every job at once) when ``auto``."""
        return self.resources.in_flight

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job as a Ray task; see :func:`~anomalib_tiled.execution.runners.serial.drive`."""
        if not jobs:
            return []
        with ray_session(self.settings) as ray:
            backend = RayTasks(ray, self.resources, self.max_retries, len(jobs))
            return drive(backend, [job.pinned() for job in jobs], task, self.max_retries)


@contextmanager
def ray_session(settings: RaySettings) -> Iterator[ModuleType]:
    """Ray, connected: the running one, else one started (or joined) for these jobs and shut down after."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    local = {"include_dashboard": False} if settings.address is None else {}
    with _keeping_sigterm_handler():
        # Logging and the console stay the application's: workers' output stays in Ray's session logs.
        ray.init(
            address=settings.address,
            runtime_env=settings.runtime_env,
            configure_logging=False,
            log_to_driver=False,
            **local,
        )
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the SIGTERM handler; the application's one is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class RayTasks:
    """Backend submitting each job as a Ray task.

    Args:
        ray: The connected ``ray`` module.
        resources: What a task reserves and how many are submitted at once.
        max_retries: Ray's retries of a task whose worker died.
        jobs: Number of jobs (the limit when ``execution.workers`` is ``auto``).
    """

    def __init__(self, ray: ModuleType, resources: RayResources, max_retries: int, jobs: int) -> None:
        self.ray = ray
        self.resources = resources
        self.max_retries = max_retries
        self.setup = WorkerSetup.of_this_process()
        self.remote = ray.remote(ray_execute).options(
            num_cpus=resources.num_cpus,
            num_gpus=resources.num_gpus,
            max_retries=max_retries,
            # A tile that raises fails the run; only lost workers are retried.
            retry_exceptions=False,
        )
        self.pending: dict[Any, TileJob] = {}
        self.limit = resources.in_flight or jobs

    @property
    def capacity(self) -> int:
        """Tasks submitted at once (Ray queues those its nodes cannot start yet)."""
        return self.limit

    def submit(self, job: TileJob) -> None:
        """Submit ``job`` as a task."""
        self.pending[self.remote.remote(job, self.resources.threads, self.setup)] = job

    def wait(self, timeout: float) -> list[tuple[TileJob, Outcome]]:
        """The job whose task ended first within ``timeout`` seconds, if any."""
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        return [(self.pending.pop(reference), self._outcome(reference)) for reference in ready]

    def cancel(self) -> None:
        """Cancel every pending task, killing the workers running them."""
        for reference in self.pending:
            self.ray.cancel(reference, force=True)
        self.pending.clear()

    def _outcome(self, reference: Any) -> Outcome:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(reference)
        except exceptions.RayTaskError as error:
            # Raised outside the job (e.g. unpickling it on the worker): a failure, not a lost worker.
            return Outcome(error=error.cause if isinstance(error.cause, Exception) else error)
        except exceptions.RayError as error:
            # Ray reports a lost task only after its own retries: every attempt is used up.
            lost = f"its Ray worker or node was lost ({type(error).__name__})"
            return Outcome(lost=lost, attempts=self.max_retries + 1)
