"""Placement of tile workers: which device and how many threads each worker gets.

Pure functions of the execution settings and the machine's counts (GPUs, cores), so the device
assignment is tested without GPUs: worker ``i`` of a ``processes`` pool runs on
``devices[i % len(devices)]`` (so ``tiles_per_device`` workers share each device, round robin) with
``threads`` torch intra-op threads; a ``ray`` tile job reserves the CPUs and GPU fraction of
:func:`ray_task_resources`, and Ray chooses the device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from anomalib_tiled.errors import ConfigError
from anomalib_tiled.settings import AUTO, ExecutionSettings


@dataclass(frozen=True)
class Slot:
    """One worker of a ``processes`` pool (see :func:`~anomalib_tiled.execution.runners.placement.plan_slots`).

    Attributes:
        index: Worker number.
        device: GPU index the worker is pinned to (``CUDA_VISIBLE_DEVICES``), None on a CPU.
        threads: Torch intra-op threads of the worker.
    """

    index: int
    device: int | None
    threads: int


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plan_slots(execution: ExecutionSettings, *, gpus: int, cores: int) -> list[Slot]:
    """The workers of a ``processes`` pool.

    Args:
        execution: The execution settings.
        gpus: CUDA devices visible to this process (0: the tiles run on the CPU).
        cores: CPU cores available.

    Returns:
        One slot per worker.

    Raises:
        ConfigError: If the settings ask for more workers, threads or devices than the machine has.
    """
    if gpus == 0:
        workers, threads = _cpu_workers(execution, cores)
        return [Slot(index, None, threads) for index in range(workers)]
    devices = gpu_devices(execution, gpus)
    capacity = len(devices) * execution.tiles_per_device
    workers = capacity if execution.workers == AUTO else execution.workers
    if workers > capacity:
        msg = (
            f"execution.workers: {workers} workers need {workers} device slots but devices {devices} x "
            f"tiles_per_device {execution.tiles_per_device} give {capacity}; raise tiles_per_device or lower workers"
        )
        raise ConfigError(msg)
    threads = _threads(execution, workers, cores)
    return [Slot(index, devices[index % len(devices)], threads) for index in range(workers)]


def gpu_devices(execution: ExecutionSettings, gpus: int) -> list[int]:
    """The GPU indices tiles are spread over.

    Raises:
        ConfigError: If an index is not a visible device.
    """
    if execution.devices == AUTO:
        return list(range(gpus))
    missing = [device for device in execution.devices if not 0 <= device < gpus]
    if missing:
        msg = (
            f"execution.devices: {missing} not visible on this machine ({gpus} GPU(s): indices 0 to {gpus - 1}); "
            "list visible GPU indices or use auto"
        )
        raise ConfigError(msg)
    return list(execution.devices)


def _cpu_workers(execution: ExecutionSettings, cores: int) -> tuple[int, int]:
    if execution.workers == AUTO:
        threads = 1 if execution.threads_per_worker == AUTO else execution.threads_per_worker
        _check_cores(1, threads, cores)
        return max(1, cores // threads), threads
    return execution.workers, _threads(execution, execution.workers, cores)


def _threads(execution: ExecutionSettings, workers: int, cores: int) -> int:
    if execution.threads_per_worker == AUTO:
        _check_cores(workers, 1, cores)
        return max(1, cores // workers)
    _check_cores(workers, execution.threads_per_worker, cores)
    return execution.threads_per_worker


def _check_cores(workers: int, threads: int, cores: int) -> None:
    # More threads than cores only makes the workers take turns, slower than fewer workers.
    if workers * threads > cores:
        msg = (
            f"execution.threads_per_worker: {workers} worker(s) x {threads} thread(s) exceed the {cores} CPU cores; "
            "lower execution.workers or execution.threads_per_worker"
        )
        raise ConfigError(msg)


@dataclass(frozen=True)
class RayResources:
    """What one Ray tile task reserves and uses.

    Attributes:
        num_cpus: CPUs reserved by Ray.
        num_gpus: GPU fraction reserved by Ray (Ray sets ``CUDA_VISIBLE_DEVICES`` from it).
        threads: Torch intra-op threads of the task.
        in_flight: Tile tasks submitted at once (None: all; Ray queues them by resources).
    """

    num_cpus: float
    num_gpus: float
    threads: int
    in_flight: int | None


def ray_task_resources(execution: ExecutionSettings, *, gpu: bool) -> RayResources:
    """Resources of one Ray tile task.

    Args:
        execution: The execution settings.
        gpu: Whether the tiles run on GPUs.
    """
    ray = execution.ray
    num_gpus = ray.num_gpus_per_tile
    if num_gpus == AUTO:
        num_gpus = 1 / execution.tiles_per_device if gpu else 0
    threads = execution.threads_per_worker
    if threads == AUTO:
        threads = max(1, int(ray.num_cpus_per_tile))
    in_flight = None if execution.workers == AUTO else execution.workers
    return RayResources(ray.num_cpus_per_tile, float(num_gpus), threads, in_flight)


def worker_environment(slot: Slot, environ: Mapping[str, str]) -> dict[str, str]:
    """Environment of a ``processes`` worker: its threads and, on a GPU, the one device it sees.

    Args:
        slot: The worker's device and threads.
        environ: This process's environment.
    """
    env = dict(environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(slot.threads)
    if slot.device is not None:
        # The tile's model, memory bank included, can then only land on this device (its cuda:0).
        env["CUDA_VISIBLE_DEVICES"] = child_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"), slot.device)
    return env


def child_visible_devices(parent_visible: str | None, device: int) -> str:
    """``CUDA_VISIBLE_DEVICES`` of a worker pinned to ``device``, an index among the parent's visible GPUs.

    Args:
        parent_visible: The parent's ``CUDA_VISIBLE_DEVICES`` (None or empty: every GPU is visible).
        device: Index of the device among those the parent sees.
    """
    if not parent_visible:
        return str(device)
    return [item.strip() for item in parent_visible.split(",")][device]


def visible_gpus(accelerator: str) -> int:
    """CUDA devices the tile models may use on this machine (0 when they run on the CPU or MPS)."""
    import torch  # noqa: PLC0415

    if accelerator not in {"auto", "gpu", "cuda"} or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()
