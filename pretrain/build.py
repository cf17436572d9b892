"""One place that wires a run: config and devices in, the train step out (mesh, logical-axis
rules, task, step), with no side effects: nothing is started, read or written. `pretrain train`
starts the runtime and opens the data around it; `pretrain plan` builds it over a TPU topology's
devices; the benchmarks and tests build it alone."""

from pretrain import config as config_lib
from pretrain import sharding, tpu
from pretrain.step import TrainStep
from pretrain.tasks import TASKS


def build(cfg: config_lib.Config, devices) -> TrainStep:
    """Validation, mesh, task and train step, over `devices`: this run's (jax.devices()), or another
    machine's, such as a TPU topology's for `pretrain plan`. The step holds the resolved config
    (`step.cfg`: `auto` values decided), which the run goes on with."""
    shape = config_lib.validate(cfg, len(devices), devices[0].platform)
    task = TASKS[cfg.task]
    cfg = task.resolve(cfg, shape, devices[0].platform)
    if cfg.runtime.fake_topology:  # this run's CPU devices, laid out as the slice's chips
        mesh = sharding.rehearsal_mesh(shape, tpu.topology_devices(tpu.parse(cfg.runtime.fake_topology)), devices)
    else:
        mesh = sharding.make_mesh(shape, devices)
    rules = sharding.axis_rules(cfg.model.num_kv_heads, shape[1], cfg.mesh.residual_split) \
        if cfg.task == "llm" else sharding.LOGICAL_RULES
    return TrainStep(cfg, task(cfg), mesh, rules)
