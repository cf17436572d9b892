"""One place that wires a run: config and devices in, the train step out (mesh, logical-axis
rules, task, step), with no side effects: nothing is started, read or written. `pretrain train`
starts the runtime and opens the data around it; `pretrain plan` builds it over a TPU topology's
devices; the benchmarks and tests build it alone."""

from pretrain.config import checks
from pretrain.config.schema import Config
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
    if cfg.runtime.fake_topology:  # this run's CPU devices, laid out as the slice's chips
        mesh = sharding.rehearsal_mesh(shape, tpu_devices.topology_devices(kinds.parse(cfg.runtime.fake_topology)), devices)
    else:
        mesh = sharding.make_mesh(shape, devices)
    return TrainStep(cfg, task(cfg), mesh, task.axis_rules(cfg, shape[1]))
