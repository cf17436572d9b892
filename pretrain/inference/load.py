"""A model to run, from a checkpoint (its parameters only, or their EMA where the family samples
from it) or from a directory an outside format wrote (pretrain/formats/)."""

import dataclasses

import jax
from etils import epath

from data import tokenizer as tokenizer_lib
from pretrain import formats
from pretrain.build import choose_cpu_multiply_dtype
from pretrain.config import ConfigError
from pretrain.config.schema import Config
from pretrain.formats import params
from pretrain.run import checkpoint
from pretrain.tasks import task_class


def task_of(path: str) -> str:
    """The family ("llm", "diffusion", ...) a checkpoint or an exported directory holds."""
    directory = epath.Path(path)
    if formats.is_export(directory):
        return formats.reader(directory, "sample").TASK
    return checkpoint.saved_config(*checkpoint.locate(path)).task


def from_checkpoint(path: str, step: int | None = None, device=None) -> tuple[Config, dict, object]:
    """(config, flat {path: array} of the weights on `device`, tokenizer or None) of a checkpoint: the
    EMA where the family samples from it and the run kept one, else the parameters."""
    directory, step = checkpoint.locate(path, step)
    cfg = checkpoint.saved_config(directory, step)
    task = task_class(cfg.task)
    item = params.ema_or_params(directory, step) if task.samples_from_ema else "params"
    flat = params.restore(directory, step, task.model_class, cfg.model, device, item)
    return cfg, flat, tokenizer_lib.read(checkpoint.run_dir(directory))


def load(path: str, task: str, step: int | None = None, dtype: str | None = None):
    """(model, config, tokenizer or None) of a `task` model from a checkpoint or an exported
    directory, on the default device; computing in `dtype` if given, else in the model's."""
    device, directory = jax.devices()[0], epath.Path(path)
    if formats.is_export(directory):
        cfg, flat, tokenizer = formats.reader(directory, "sample").read(directory)
        flat = jax.device_put(flat, device)
    else:
        cfg, flat, tokenizer = from_checkpoint(path, step, device)
    if cfg.task != task:
        raise ConfigError(f"{path} holds a '{cfg.task}' model; this command handles {task} models here")
    if dtype is not None:
        cfg.model = dataclasses.replace(cfg.model, dtype=dtype)
    if device.platform == "cpu" and cfg.model.dtype == "bfloat16":
        choose_cpu_multiply_dtype(cfg.model.cpu_matmul_dtype, cfg.runtime.init_timeout_s)
    return params.build(task_class(task).model_class, cfg.model, flat), cfg, tokenizer
