"""The ``ray`` runner: one Ray task per tile, on this machine or on a Ray cluster.

Ray places each task by the resources it reserves (CPUs, a GPU or a fraction of one: Ray sets
``CUDA_VISIBLE_DEVICES`` for the task), retries a task whose worker or node died
(``execution.max_retries``), and runs on every node of a cluster. With ``execution.ray.storage:
shared`` the run directory must be on storage every node sees; with ``object_store`` each task gets
its tiles and files through Ray's object store and sends the files it wrote back
(:mod:`anomalib_tiled.execution.transport`). A head that stops answering fails the stage within
:data:`HEAD_GRACE_SECONDS` (see ``docs/distributed.md``). Ray is an optional dependency:
``pip install "anomalib-tiled[ray]"``.
"""

from __future__ import annotations

import importlib
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from anomalib_tiled.errors import ClusterError, ConfigError, RunDirectoryError
from anomalib_tiled.execution.jobs import TileResult
from anomalib_tiled.execution.runners.placement import RayResources
from anomalib_tiled.execution.runners.serial import TileJob, drive
from anomalib_tiled.execution.runners.worker import Outcome, WorkerSetup, ray_execute
from anomalib_tiled.execution.transport import deliver, pack
from anomalib_tiled.progress import Task
from anomalib_tiled.run.directory import RunDirectory, file_digest
from anomalib_tiled.settings import RaySettings

logger = logging.getLogger(__name__)

HEAD_GRACE_SECONDS = 10.0
"""How long the cluster's head may refuse connections before the stage fails: well within the 60 s Ray's
own reconnection waits for a lost GCS (``RAY_gcs_rpc_server_reconnect_timeout_s``) before giving up on it."""
PROBE_SECONDS = 1.0
"""How often, at most, the head is probed."""


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
        """Tasks in flight at once: ``execution.workers``, or None (every job at once) when ``auto``.

        None with ``object_store`` storage: each job then predicts one tile, so that what travels to
        a task is one tile's share of a split (a batched group job would need all its tiles at once).
        """
        return None if self.settings.storage == "object_store" else self.resources.in_flight

    def run(self, jobs: Sequence[TileJob], task: Task) -> list[TileResult]:
        """Run every job as a Ray task; see :func:`~anomalib_tiled.execution.runners.serial.drive`."""
        if not jobs:
            return []
        with ray_session(self.settings) as ray:
            backend = RayTasks(ray, self.resources, self.max_retries, len(jobs), storage=self.settings.storage)
            try:
                return drive(backend, [job.pinned() for job in jobs], task, self.max_retries)
            finally:
                backend.report()


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


class HeadWatch:
    """Notices a lost cluster head: its GCS port refusing connections for ``grace`` seconds.

    Args:
        address: The GCS's ``host:port``; None watches nothing (Ray Client keeps its own connection).
        grace: Seconds the head may be unreachable (a restarting head comes back within them).
    """

    def __init__(self, address: str | None, grace: float = HEAD_GRACE_SECONDS) -> None:
        self.address = address
        self.grace = grace
        self.silent_since: float | None = None
        self.probed = -math.inf
        self.error = ""

    @classmethod
    def of(cls, ray: ModuleType) -> HeadWatch:
        """The watch of the cluster ``ray`` is connected to."""
        if importlib.import_module("ray.util.client").ray.is_connected():
            return cls(None)
        return cls(ray.get_runtime_context().gcs_address)

    def answering(self) -> bool:
        """Whether the head accepted the last connection (probed at most every :data:`PROBE_SECONDS`)."""
        now = time.monotonic()
        if self.address is not None and now - self.probed >= PROBE_SECONDS:
            self.probed = now
            host, _, port = self.address.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
            except OSError as error:
                self.error = type(error).__name__
                self.silent_since = now if self.silent_since is None else self.silent_since
            else:
                self.silent_since = None
        return self.silent_since is None

    def check(self, run: Path | None) -> None:
        """Fail once the head has not answered for ``grace`` seconds.

        Args:
            run: The run directory the jobs belong to, for the message.

        Raises:
            ClusterError: Naming the head and what to do.
        """
        if self.answering() or self.silent_since is None or time.monotonic() - self.silent_since < self.grace:
            return
        msg = (
            f"execution.ray.address: the Ray cluster's head ({self.address}) has not answered for "
            f"{self.grace:.0f} s ({self.error}); the tiles finished so far are kept: start the cluster again "
            f"(or choose another execution.runner) and run the command again (train: --resume {run or 'RUN_DIR'})"
        )
        raise ClusterError(msg)


class RayTasks:
    """Backend submitting each job as a Ray task.

    With ``storage: object_store`` each task gets its job's :class:`~anomalib_tiled.execution.transport.Parcel`
    through the object store, held only while the tile runs, and the files the job wrote come back
    with its outcome; they are written into the run directory before the job is recorded. Then
    ``workers: auto`` submits as many tasks as the cluster runs at once, so the object store holds
    that many tiles' inputs, never the whole image cache.

    Args:
        ray: The connected ``ray`` module.
        resources: What a task reserves and how many are submitted at once.
        max_retries: Ray's retries of a task whose worker died.
        jobs: Number of jobs (the limit when ``execution.workers`` is ``auto``).
        storage: ``shared`` or ``object_store`` (``execution.ray.storage``).
    """

    def __init__(
        self, ray: ModuleType, resources: RayResources, max_retries: int, jobs: int, storage: str = "shared"
    ) -> None:
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
        self.detached = storage == "object_store"
        # Task -> its parcel in the object store, referenced until the task is done.
        self.parcels: dict[Any, Any] = {}
        self.sent = self.received = 0
        self.present: dict[str, dict[str, Any]] = {}
        self.run: Path | None = None
        self.head = HeadWatch.of(ray)
        slots = min(jobs, cluster_slots(ray, resources)) if self.detached else jobs
        self.limit = resources.in_flight or slots

    @property
    def capacity(self) -> int:
        """Tasks submitted at once (Ray queues those its nodes cannot start yet); none more while the head is silent."""
        return self.limit if self.head.answering() else len(self.pending)

    def submit(self, job: TileJob) -> None:
        """Submit ``job`` as a task (with its parcel in ``object_store`` storage)."""
        self.run = job.context.run.root  # type: ignore[attr-defined] - the runners' jobs are TileJobBase
        if not self.detached:
            self.pending[self.remote.remote(job, self.resources.threads, self.setup)] = job
            return
        parcel = pack(job, self._present(job.context.run))  # type: ignore[arg-type,attr-defined]
        self.sent += parcel.nbytes
        stored = self.ray.put(parcel)
        reference = self.remote.remote(job, self.resources.threads, self.setup, stored)
        self.pending[reference], self.parcels[reference] = job, stored

    def wait(self, timeout: float) -> list[tuple[TileJob, Outcome]]:
        """The job whose task ended first within ``timeout`` seconds, if any.

        Raises:
            ClusterError: When the cluster's head has not answered for :data:`HEAD_GRACE_SECONDS`.
        """
        self.head.check(self.run)
        if not self.pending:
            time.sleep(timeout)
            return []
        ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        return [self._finished(reference) for reference in ready]

    def cancel(self) -> None:
        """Cancel every pending task, killing the workers running them."""
        for reference in self.pending:
            self.ray.cancel(reference, force=True)
        self.pending.clear()
        self.parcels.clear()

    def report(self) -> None:
        """Log what went through the object store (``object_store`` storage)."""
        if self.detached:
            logger.info(
                "Ray object store: %.1f MB of tiles and run files sent to tile jobs, %.1f MB of their files received.",
                self.sent / 1e6,
                self.received / 1e6,
            )

    def _present(self, run: RunDirectory) -> dict[str, dict[str, Any]]:
        """Shared weights files the recorded tiles reference that are intact here, each hashed once a stage."""
        for entry in run.manifest()["tiles"].values():
            for recorded in entry.get("shared", []):
                path = run.shared_path(recorded["sha256"])
                name = path.relative_to(run.root).as_posix()
                if name not in self.present and path.is_file() and file_digest(path) == recorded:
                    self.present[name] = recorded
        return self.present

    def _finished(self, reference: Any) -> tuple[TileJob, Outcome]:
        job, outcome = self.pending.pop(reference), self._outcome(reference)
        # Done or lost for good: the tile's inputs leave the object store with the last reference.
        self.parcels.pop(reference, None)
        if outcome.files:
            try:
                self.received += deliver(job.context.run.root, outcome.files)  # type: ignore[attr-defined]
            except RunDirectoryError as error:
                return job, Outcome(error=error, records=outcome.records)
            outcome.files = []
        return job, outcome

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


def cluster_slots(ray: ModuleType, resources: RayResources) -> int:
    """Tile tasks the cluster can run at once now: its CPUs (and GPUs) over what one task reserves."""
    total = ray.cluster_resources()
    slots = [int(total.get("CPU", 0) // resources.num_cpus)] if resources.num_cpus > 0 else []
    if resources.num_gpus > 0:
        slots.append(int(total.get("GPU", 0) // resources.num_gpus))
    return max(1, min(slots, default=1))
