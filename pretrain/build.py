"""One place that wires a run: config and devices in, the train step out (mesh, logical-axis
rules, task, step). Nothing is started, read or written; on CPU, the dtype the process multiplies
a bfloat16 model's matmuls in is chosen (models/layers.py). `pretrain train` starts the runtime and
opens the data around it; `pretrain plan` builds it over a TPU topology's devices; the benchmarks
and tests build it alone."""

import jax

from models import layers
from pretrain.config import checks
from pretrain.config.schema import Config
from pretrain.metrics import cpu
from pretrain.run import runtime
from pretrain.tasks import task_class
from pretrain.tpu import devices as tpu_devices
from pretrain.tpu import kinds
from pretrain.train import sharding
from pretrain.train.step import TrainStep


def build(cfg: Config, devices) -> TrainStep:
    """Validation, mesh, task and train step, over `devices`: this run's (jax.devices()), or another
    machine's, such as a TPU topology's for `pretrain plan`. The step holds the resolved config
    (`train_step.cfg`: `auto` values decided), which the run goes on with."""
    shape = checks.validate(cfg, len(devices), devices[0].platform)
    task = task_class(cfg.task)
    cfg = task.resolve(cfg, shape, devices[0].platform)
    if devices[0].platform == "cpu" and cfg.model.dtype == "bfloat16":
        choose_cpu_multiply_dtype(cfg.model.cpu_matmul_dtype, cfg.runtime.init_timeout_s)
    if cfg.runtime.fake_topology:  # this run's CPU devices, laid out as the slice's chips
        mesh = sharding.rehearsal_mesh(shape, tpu_devices.topology_devices(kinds.parse(cfg.runtime.fake_topology)), devices)
    else:
        mesh = sharding.make_mesh(shape, devices)
    return TrainStep(cfg, task(cfg), mesh, task.axis_rules(cfg, shape[1]))


def choose_cpu_multiply_dtype(setting: str, timeout_s: int) -> str:
    """Set the dtype this process's CPU compiles multiply bfloat16 operands in (model.cpu_matmul_dtype;
    `auto`: what process 0 measures faster, the same on every process) and return it."""
    if setting == "auto":
        faster = jax.process_index() == 0 and cpu.faster_multiply_dtype() == "bfloat16"
        setting = "bfloat16" if runtime.agreed("cpu_matmul_dtype", faster, timeout_s) else "float32"
    layers.set_cpu_multiply_dtype(setting)
    return setting
