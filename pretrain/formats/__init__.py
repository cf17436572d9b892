"""Outside formats of weights, each a module with the same parts: NAME (`pretrain export --format`),
TASK (the family it holds), claims(directory, config_json) -> bool, read(directory) -> (config,
flat float32 parameters, tokenizer or None), export(cfg, checkpoints_dir, step, out, ...) -> bytes
written, and import_(directory, out, ...) where a checkpoint can start from it.

A new format is a module here plus one entry in FORMATS; the first format of a task is what
`pretrain export` writes for it by default.
"""

import json
import time

from etils import epath

from pretrain.config import ConfigError
from pretrain.formats import diffusers, hf_llama, unet
from pretrain.run import checkpoint

FORMATS = (hf_llama, diffusers, unet)
DESCRIPTIONS = ("config.json", "model_index.json")  # what an outside directory has at its top: a model, a pipeline


def reader(directory: epath.Path, command: str, formats=FORMATS):
    """The one of `formats` that reads an exported directory, or ConfigError naming what the
    directory holds and what `command` reads."""
    config = json.loads(next(directory / name for name in DESCRIPTIONS if (directory / name).exists()).read_text())
    for fmt in formats:
        if fmt.claims(directory, config):
            return fmt
    held = config.get("architectures") or [config.get("architecture") or config.get("_class_name") or config.get("model_type")]
    raise ConfigError(f"{directory} holds a {', '.join(map(str, held))} model; {command} reads "
                      f"{', '.join(f.ARCHITECTURE for f in formats)} directories only")


def is_export(directory: epath.Path) -> bool:
    """Whether a directory is an outside format's (a config.json or model_index.json at its top)
    rather than a checkpoint's."""
    return any((directory / name).exists() for name in DESCRIPTIONS)


def writer(task: str, name: str | None = None):
    """The format `pretrain export --format name` writes for a task (default: the task's first)."""
    fits = [f for f in FORMATS if f.TASK == task]
    chosen = next((f for f in fits if name in (None, f.NAME)), None)
    if chosen is None:
        raise ConfigError(f"--format={name} does not hold a '{task}' model; use one of {[f.NAME for f in fits]}")
    return chosen


def export(path: str, out: str | None = None, *, step: int | None = None, format: str | None = None,
           dtype: str = "bfloat16", overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write a checkpoint's weights in an outside format (default: <run dir>/export)."""
    start = time.perf_counter()
    directory, step = checkpoint.locate(path, step)
    cfg = checkpoint.saved_config(directory, step)
    out = epath.Path(out) if out else checkpoint.run_dir(directory) / "export"
    size = writer(cfg.task, format).export(cfg, directory, step, out, dtype=dtype, overwrite=overwrite,
                                           max_shard_bytes=max_shard_bytes)
    return {"out": str(out), "step": step, "bytes": size, "seconds": time.perf_counter() - start}


def import_(path: str, out: str, *, overwrite: bool = False) -> dict:
    """A directory of an outside format (one with import_) as a checkpoint training can start from."""
    start = time.perf_counter()
    src = epath.Path(path)
    if not is_export(src):
        raise ConfigError(f"{src} has no config.json or model_index.json; point at a Hugging Face model or a "
                          "diffusers pipeline directory")
    params = reader(src, "import-hf", [f for f in FORMATS if hasattr(f, "import_")]).import_(src, out, overwrite=overwrite)
    return {"out": out, "params": params, "seconds": time.perf_counter() - start}
