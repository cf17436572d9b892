"""The checks every task shares, on the config and the device count, before anything is
compiled or written; a task adds its own (pretrain/tasks/)."""

import re

from pretrain.config import ConfigError, require
from pretrain.config.schema import CONFIGS, Config, RuntimeConfig
from pretrain.tpu import kinds


def mesh_shape(cfg: Config, num_devices: int) -> tuple[int, int]:
    """(data, model) with -1 resolved against the device count."""
    data, model = cfg.mesh.data, cfg.mesh.model
    if (data == -1) + (model == -1) > 1:
        raise ConfigError("only one of mesh.data and mesh.model may be -1")
    for key, v in (("mesh.data", data), ("mesh.model", model)):
        if v == 0 or v < -1:
            raise ConfigError(f"{key}={v} must be a positive size or -1")
    if data == -1 or model == -1:
        known = model if data == -1 else data
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not divide by {known}; change mesh.data/mesh.model")
        data, model = (num_devices // known, model) if data == -1 else (data, num_devices // known)
    if data * model != num_devices:
        raise ConfigError(
            f"mesh.data x mesh.model = {data} x {model} = {data * model}, but there are {num_devices} devices; "
            "make the product equal the device count (or set one of them to -1)"
        )
    return data, model


RESIDUAL_SPLITS = ("none", "length", "embed")  # mesh.residual_split (pretrain/train/sharding.py)
WANDB_MODES = ("disabled", "offline", "online")  # run.wandb.mode


def validate(cfg: Config, num_devices: int, platform: str) -> tuple[int, int]:
    """Check what every task shares (its own model and data: the task's `resolve`) before it can fail
    deep inside a compile. Returns the mesh shape."""
    require(cfg.task in CONFIGS, f"task='{cfg.task}' is not known; use one of {sorted(CONFIGS)}")
    require(cfg.run.steps > 0, f"run.steps={cfg.run.steps} must be positive")
    w = cfg.run.wandb
    require(w.mode in WANDB_MODES, f"run.wandb.mode='{w.mode}' is unknown; use one of {list(WANDB_MODES)}")
    require(w.mode == "disabled" or w.project, f"run.wandb.mode={w.mode} needs run.wandb.project (the W&B project "
                                               "to log to); set it, or run.wandb.mode=disabled")
    require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive")
    require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(cfg.train.log_every > 0, "train.log_every must be positive")
    require(cfg.train.microbatches > 0, "train.microbatches must be positive")
    require(cfg.train.max_skipped_steps > 0, f"train.max_skipped_steps={cfg.train.max_skipped_steps} must be positive "
                                             "(non-finite steps in a row before the run stops)")
    require(0 <= cfg.train.ema_decay < 1, f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1); 0 turns the EMA off")
    p = cfg.train.profile_steps
    require(
        not p or (len(p) == 2 and 1 <= p[0] <= p[1] <= cfg.run.steps),
        f"train.profile_steps={p} must be [start, end] with 1 <= start <= end <= run.steps={cfg.run.steps}, or [] for none",
    )
    data, model = mesh_shape(cfg, num_devices)
    split = cfg.mesh.residual_split
    require(split in RESIDUAL_SPLITS, f"mesh.residual_split='{split}' is unknown; use one of {list(RESIDUAL_SPLITS)}")

    require(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0")
    require(cfg.data.prefetch >= 0, f"data.prefetch={cfg.data.prefetch} must be >= 0 (0: no read-ahead)")
    require(cfg.data.num_epochs >= 0, f"data.num_epochs={cfg.data.num_epochs} must be >= 0 (0: repeat for as long as the run goes)")
    for key in ("every", "every_minutes", "keep", "keep_every", "local_every", "local_every_minutes"):
        require(getattr(cfg.checkpoint, key) >= 0, f"checkpoint.{key}={getattr(cfg.checkpoint, key)} must be >= 0")
    local = cfg.checkpoint.local_dir
    require(not local or "://" not in local,
            f"checkpoint.local_dir={local} must be a path on each host's own disk; run.output_dir takes gs://")
    per_step = data * cfg.train.microbatches
    require(
        cfg.train.global_batch % per_step == 0,
        f"train.global_batch={cfg.train.global_batch} is not divisible by the data axis x microbatches "
        f"({data} x {cfg.train.microbatches} = {per_step}); change train.global_batch",
    )
    for i, g in enumerate(cfg.optim.groups):
        try:
            re.compile(g.pattern)
        except re.error as e:
            raise ConfigError(f"optim.groups[{i}].pattern '{g.pattern}' is not a valid regex: {e}") from None
    return data, model


DISTRIBUTED_MODES = ("auto", "explicit", "off")


def validate_runtime(r: RuntimeConfig):
    """The process-level keys, checked before JAX starts (runtime.setup)."""
    require(r.distributed in DISTRIBUTED_MODES,
             f"runtime.distributed='{r.distributed}' is unknown; use one of {list(DISTRIBUTED_MODES)}")
    if r.distributed == "explicit":
        require(re.fullmatch(r"[^:\s]+:\d+", r.coordinator) is not None,
                 f"runtime.coordinator='{r.coordinator}' must be host:port of process 0 with runtime.distributed=explicit")
        require(r.num_processes > 0, "runtime.num_processes must be positive with runtime.distributed=explicit")
        require(0 <= r.process_id < r.num_processes,
                 f"runtime.process_id={r.process_id} must be in [0, runtime.num_processes={r.num_processes})")
    if r.fake_topology:
        require(r.fake_cpu_devices > 0, f"runtime.fake_topology={r.fake_topology} lays out faked CPU devices; "
                                         "set runtime.fake_cpu_devices to the slice's chips per host")
        try:
            kinds.parse(r.fake_topology)
        except kinds.TpuError as e:
            raise ConfigError(f"runtime.fake_topology: {e}") from None
    for key in ("init_timeout_s", "heartbeat_timeout_s"):
        require(getattr(r, key) > 0, f"runtime.{key}={getattr(r, key)} must be positive")
    require(r.step_timeout_s >= 0, f"runtime.step_timeout_s={r.step_timeout_s} must be >= 0 (0: no watchdog)")
