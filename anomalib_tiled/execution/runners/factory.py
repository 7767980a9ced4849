"""The runner an ``execution`` setting names, checked against this machine and built for it."""

from __future__ import annotations

from anomalib_tiled.errors import ConfigError
from anomalib_tiled.execution.runners.placement import available_cores, plan_slots, ray_task_resources, visible_gpus
from anomalib_tiled.execution.runners.processes import ProcessRunner
from anomalib_tiled.execution.runners.ray import RayRunner, import_ray
from anomalib_tiled.execution.runners.serial import Runner, SerialRunner
from anomalib_tiled.settings import AUTO, RuntimeSettings


def check_execution(runtime: RuntimeSettings) -> None:
    """Fail if the runner cannot run here: Ray missing, more workers, threads or devices than the machine has.

    Raises:
        ConfigError: Naming the ``execution`` key and the fix.
    """
    execution = runtime.execution
    if execution.runner == "processes":
        plan_slots(execution, gpus=visible_gpus(runtime.accelerator), cores=available_cores())
    elif execution.runner == "ray":
        import_ray()
        if execution.devices != AUTO:
            msg = (
                f"execution.devices: {execution.devices} cannot be used with runner ray, which assigns GPUs itself; "
                "use devices: auto and start Ray with the GPUs to use (CUDA_VISIBLE_DEVICES or ray start --num-gpus)"
            )
            raise ConfigError(msg)


def runner_for(runtime: RuntimeSettings) -> Runner:
    """The runner ``runtime.execution`` asks for, placed on this machine's devices and cores.

    Raises:
        ConfigError: If the execution settings do not fit this machine.
    """
    execution = runtime.execution
    if execution.runner == "serial":
        return SerialRunner()
    gpus = visible_gpus(runtime.accelerator)
    if execution.runner == "processes":
        return ProcessRunner(plan_slots(execution, gpus=gpus, cores=available_cores()), execution.max_retries)
    # A cluster's GPUs may be on other nodes than this one.
    gpu = runtime.accelerator in {"gpu", "cuda"} or gpus > 0
    return RayRunner(execution.ray, ray_task_resources(execution, gpu=gpu), execution.max_retries)
