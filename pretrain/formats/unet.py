"""This stack's own UNet format: model.safetensors of the EMA weights (our parameter names, dotted)
and a config.json holding the model and diffusion settings, which `pretrain sample` reads back."""

import json

import numpy as np
from etils import epath

from data.prepare import output
from models.unet import UNet
from pretrain import config as config_lib
from pretrain.config.schema import DiffusionRun
from pretrain.formats import params, weights

NAME, TASK = "unet", "diffusion"  # --format, and the family it holds
ARCHITECTURE = "UNet"  # config.json's "architecture"


def claims(directory: epath.Path, config: dict) -> bool:
    return config.get("architecture") == ARCHITECTURE


def read(directory: epath.Path) -> tuple[DiffusionRun, dict, None]:
    """(a config holding the model and diffusion settings, flat {path: float32 array}, no tokenizer)."""
    description = json.loads((directory / "config.json").read_text())
    cfg = config_lib.from_dict({"task": "diffusion", "model": description["model"], "diffusion": description["diffusion"]})
    _, state = params.abstract_state(UNet, cfg.model)
    with weights.open_weights(directory) as read_tensor:
        flat = {key: read_tensor(key.replace("/", ".")).astype(np.float32) for key in params.flat(state)}
    return cfg, flat, None


def export(cfg: DiffusionRun, directory: epath.Path, step: int, out: epath.Path, *, dtype: str, overwrite: bool,
           max_shard_bytes: int) -> int:
    """The checkpoint's EMA weights (its parameters without an EMA) in one model.safetensors, and
    the config.json; returns the bytes of weights. `max_shard_bytes` does not apply: one file."""
    output.check_output(out, overwrite)
    item = params.ema_or_params(directory, step)
    read = params.Reader(directory, step, UNet, cfg.model, item)
    tensors = [(key.replace("/", "."), shape, lambda key=key: read(key)) for key, shape in sorted(read.shapes.items())]
    description = {"architecture": ARCHITECTURE, "step": step, "weights": item, "dtype": dtype,
                   "model": config_lib.to_dict(cfg.model), "diffusion": config_lib.to_dict(cfg.diffusion)}
    with output.staged(out, overwrite, last="config.json") as stage:
        size = weights.write_weights(stage, tensors, dtype, max_shard_bytes=2**62)
        (stage / "config.json").write_text(json.dumps(description, indent=2))
    return size
