"""The run's configuration: YAML presets and key=value overrides into the typed schema
(`schema.py`), and back to plain data. The checks every task shares are in `checks.py`; a task
checks its own model and data (pretrain/tasks/). Every check raises ConfigError, which the CLI
turns into one line on stderr and exit code 2 before anything is compiled or written.
"""

import dataclasses
import difflib
import keyword
import types
import typing
from pathlib import Path

import yaml

from pretrain.config.schema import CONFIGS, Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """Bad user input; the message names the key and the fix."""


def require(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


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


def runtime_only(overrides: typing.Sequence[str]) -> Config:
    """A Config of defaults but for runtime.* key=value overrides: for commands that start devices
    (faked ones, jax.distributed) but train nothing."""
    tree = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("runtime."):
            raise ConfigError(f"'{item}' is not a runtime.KEY=VALUE setting, e.g. runtime.fake_cpu_devices=4")
        _set(tree, key.strip(), value, Config)
    return _build(Config, tree, root=Config)


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
