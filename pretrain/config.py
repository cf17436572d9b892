"""The run's configuration: typed schema, YAML presets, key=value overrides, validation.

Every check that can fail on user input lives here and raises ConfigError, which the
CLI turns into one line on stderr and exit code 2 before anything is compiled or written.
"""

import dataclasses
import difflib
import keyword
import re
import types
import typing
from pathlib import Path

import yaml

from pretrain import tpu
from pretrain.schema import CONFIGS, Config, RuntimeConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """Bad user input; the message names the key and the fix."""


# --- building a config from YAML and overrides --------------------------------------------


def _key(field_name: str) -> str:
    """The config key of a field: a Python keyword (`async`) is spelt with a trailing _ in code."""
    return field_name[:-1] if keyword.iskeyword(field_name[:-1]) else field_name


def _field(key: str) -> str:
    return key + "_" if keyword.iskeyword(key) else key


def _all_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _all_keys(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{_key(f.name)}"


def _unknown(key: str, cls: type[Config]) -> ConfigError:
    """An unknown key, with the nearest key of the task's own schema `cls` suggested."""
    near = difflib.get_close_matches(key, list(_all_keys(cls)), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _convert(key: str, hint, value, root):
    """Coerce a YAML value or a command-line string to the field's type, or say why not."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        return _convert(key, next(a for a in args if a is not type(None)), value, root)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, str) and hasattr(args[0], "from_string"):  # the command line's shorthand
            try:
                value = [args[0].from_string(v.strip()) for v in value.split(",")]
            except ValueError as e:
                raise ConfigError(f"config key '{key}': {e}") from None
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' wants a list, got {value!r}")
        return [_convert(f"{key}[{i}]", args[0], v, root) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' wants a mapping, got {value!r}")
        return _build(hint, value, f"{key}.", root)
    try:
        if hint is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except ValueError:
        raise ConfigError(f"config key '{key}' wants {hint.__name__}, got {value!r}") from None
    raise TypeError(f"unsupported config type {hint} for {key}")


def _build(cls, values: dict, prefix: str = "", root=Config):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        name = _field(key)
        if name not in hints:
            raise _unknown(prefix + key, root)
        kwargs[name] = _convert(prefix + key, hints[name], value, root)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"config section '{prefix.rstrip('.') or 'root'}': {e}") from None


def _set(tree: dict, dotted: str, value, root: type[Config]):
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise _unknown(dotted, root)
        tree = node
    tree[leaf] = value


def preset_path(family: str, name: str) -> Path:
    return CONFIG_DIR / family / f"{name}.yaml"


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML preset, apply key=value overrides, type-check everything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass a YAML file such as {preset_path('llm', 'smoke')}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value, e.g. run.steps=100")
        _set(tree, key.strip(), value, CONFIGS.get(tree.get("task", "llm"), Config))
    return from_dict(tree)


def from_dict(tree: dict) -> Config:
    """A typed Config from plain data (YAML or a checkpoint's JSON), every value checked; its
    `task` picks the schema (CONFIGS)."""
    task = tree.get("task", "llm")
    if task not in CONFIGS:
        raise ConfigError(f"task='{task}' is not known; use one of {sorted(CONFIGS)}")
    return _build(CONFIGS[task], tree, root=CONFIGS[task])


def to_dict(cfg) -> dict:
    """The config as plain data under its key names (the inverse of loading it)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, list):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
        out[_key(f.name)] = value
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# --- validation ----------------------------------------------------------------------------


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


def require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


RESIDUAL_SPLITS = ("none", "length", "embed")  # mesh.residual_split (pretrain/sharding.py)


def validate(cfg: Config, num_devices: int, platform: str) -> tuple[int, int]:
    """Check what every task shares (its own model and data: the task's `resolve`) before it can fail
    deep inside a compile. Returns the mesh shape."""
    require(cfg.task in CONFIGS, f"task='{cfg.task}' is not known; use one of {sorted(CONFIGS)}")
    require(cfg.run.steps > 0, f"run.steps={cfg.run.steps} must be positive")
    require(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be positive")
    require(cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(cfg.train.log_every > 0, "train.log_every must be positive")
    require(cfg.train.microbatches > 0, "train.microbatches must be positive")
    require(0 <= cfg.train.ema_decay < 1, f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1); 0 turns the EMA off")
    p = cfg.train.profile_steps
    require(
        not p or (len(p) == 2 and 1 <= p[0] <= p[1] <= cfg.run.steps),
        f"train.profile_steps={p} must be [start, end] with 1 <= start <= end <= run.steps={cfg.run.steps}, or [] for none",
    )
    data, model = mesh_shape(cfg, num_devices)
    split = cfg.mesh.residual_split
    require(split in RESIDUAL_SPLITS, f"mesh.residual_split='{split}' is unknown; use one of {list(RESIDUAL_SPLITS)}")
    require(split == "none" or cfg.task == "llm",
            f"mesh.residual_split splits a language model's residual stream; task {cfg.task} has none: set it to none")

    require(cfg.data.workers >= 0, f"data.workers={cfg.data.workers} must be >= 0")
    require(cfg.data.prefetch >= 0, f"data.prefetch={cfg.data.prefetch} must be >= 0 (0: no read-ahead)")
    require(cfg.data.num_epochs >= 0, f"data.num_epochs={cfg.data.num_epochs} must be >= 0 (0: repeat for as long as the run goes)")
    for key in ("every", "every_minutes", "keep", "keep_every"):
        require(getattr(cfg.checkpoint, key) >= 0, f"checkpoint.{key}={getattr(cfg.checkpoint, key)} must be >= 0")
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
            tpu.parse(r.fake_topology)
        except tpu.TpuError as e:
            raise ConfigError(f"runtime.fake_topology: {e}") from None
    for key in ("init_timeout_s", "heartbeat_timeout_s"):
        require(getattr(r, key) > 0, f"runtime.{key}={getattr(r, key)} must be positive")
    require(r.step_timeout_s >= 0, f"runtime.step_timeout_s={r.step_timeout_s} must be >= 0 (0: no watchdog)")
