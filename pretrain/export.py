"""Weights for serving and back: `pretrain export` (a language model's checkpoint -> a Hugging
Face Llama directory; a UNet's -> model.safetensors of its EMA weights plus a config.json),
`pretrain import-hf` (a Llama directory -> a checkpoint training can start from), and loading
a model from a checkpoint or an export for sampling.

Only parameters are read (no optimizer state, no data), onto one host device: export needs
neither the training data nor the training mesh.
"""

import json
import time

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from data import prepare
from data import tokenizer as tokenizer_lib
from models.transformer import Transformer, TransformerConfig
from models.unet import UNet, UNetConfig
from pretrain import checkpoint, hf
from pretrain import config as config_lib
from pretrain.config import ConfigError
from pretrain.schema import Config, DiffusionConfig, LanguageModelRun, RunConfig

UNET = "UNet"  # config.json's "architecture" of an exported UNet


def _abstract_state(m: TransformerConfig | UNetConfig):
    cls = UNet if isinstance(m, UNetConfig) else Transformer
    return nnx.split(nnx.eval_shape(lambda: cls(m, rngs=nnx.Rngs(0))))


def _flat(state) -> dict:
    """{"a/b/0/c": array}: list indices (the UNet's blocks) become path parts like any name."""
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}


def _model(m: TransformerConfig | UNetConfig, flat: dict):
    graphdef, state = _abstract_state(m)
    keys = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: flat["/".join(map(str, k))] for k in keys}))
    return nnx.merge(graphdef, state)


def run_dir(directory: epath.Path) -> epath.Path:
    """The run directory of a checkpoints directory."""
    return directory.parent if directory.name == "checkpoints" else directory


def _llm_config(directory: epath.Path, step: int) -> Config:
    cfg = checkpoint.saved_config(directory, step)
    if cfg.task != "llm":
        raise ConfigError(f"{directory} holds a '{cfg.task}' model; this command handles language models (task llm)")
    return cfg


def _restore(directory: epath.Path, step: int, m, device, item: str = "params") -> dict:
    """Flat {path: array} of a checkpoint's parameters (or their EMA), on `device` (default: the first
    CPU device)."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices("cpu")[0])
    _, state = _abstract_state(m)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
    restored = checkpoint.restore_params(str(directory), abstract, step, item)
    return _flat(jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored)))  # may come back as dicts


def from_checkpoint(path: str, step: int | None = None, device=None):
    """(config, flat {path: array} of parameters on `device`, tokenizer or None) of a checkpoint."""
    directory, step = checkpoint.locate(path, step)
    cfg = _llm_config(directory, step)
    return cfg, _restore(directory, step, cfg.model, device), tokenizer_lib.read(run_dir(directory))


def hf_model_config(src: epath.Path) -> TransformerConfig:
    if not (src / "config.json").exists():
        raise ConfigError(f"{src} has no config.json; point at a Hugging Face model directory")
    return hf.model_config(json.loads((src / "config.json").read_text()), src)


def from_hf(path: str):
    """(model config, flat {path: float32 array} of parameters, tokenizer or None) of a Hugging Face
    Llama directory."""
    src = epath.Path(path)
    m = hf_model_config(src)
    with hf.open_weights(src) as read:
        flat = hf.params_from_hf(m, read)
    return m, flat, tokenizer_lib.read(src)


def task_of(path: str) -> str:
    """"llm" or "diffusion": what a checkpoint or an exported directory holds."""
    config_json = epath.Path(path) / "config.json"
    if config_json.exists():
        return "diffusion" if json.loads(config_json.read_text()).get("architecture") == UNET else "llm"
    return checkpoint.saved_config(*checkpoint.locate(path)).task


def load_model(path: str, step: int | None = None):
    """(model, tokenizer or None) from a checkpoint or an exported directory, on the default device."""
    device = jax.devices()[0]
    if (epath.Path(path) / "config.json").exists():
        m, flat, tokenizer = from_hf(path)
        flat = jax.device_put(flat, device)
    else:
        cfg, flat, tokenizer = from_checkpoint(path, step, device)
        m = cfg.model
    return _model(m, flat), tokenizer


def export(path: str, out: str | None = None, *, step: int | None = None, dtype: str = "bfloat16",
           overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> dict:
    """Write a checkpoint's parameters as a Hugging Face Llama directory (default: <run dir>/export)."""
    start = time.perf_counter()
    directory, step = checkpoint.locate(path, step)
    cfg = checkpoint.saved_config(directory, step)
    out = epath.Path(out) if out else run_dir(directory) / "export"
    if cfg.task == "diffusion":
        return _export_unet(cfg, directory, step, out, dtype=dtype, overwrite=overwrite, start=start)
    m = cfg.model
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}, "
                          "which transformers' LlamaConfig requires")
    prepare.check_output(out, overwrite)
    tokenizer = tokenizer_lib.read(run_dir(directory))
    if tokenizer is None:
        print(f"note: no tokenizer in {run_dir(directory)}; the export has none (and no special token ids)")
    special = hf.special_ids(tokenizer) if tokenizer else {}
    flat = _restore(directory, step, m, None)
    with prepare.staged(out, overwrite, last="config.json") as stage:
        size = hf.write_weights(stage, hf.hf_tensors(m, flat), dtype, max_shard_bytes)
        (stage / "generation_config.json").write_text(json.dumps(special, indent=2))
        for name, content in (hf.tokenizer_files(tokenizer, m.max_seq_len) if tokenizer else {}).items():
            (stage / name).write_bytes(content)
        (stage / "config.json").write_text(json.dumps(hf.llama_config(m, dtype, special), indent=2))
    return {"out": str(out), "step": step, "bytes": size, "seconds": time.perf_counter() - start}


def import_hf(path: str, out: str, *, overwrite: bool = False) -> dict:
    """Turn a Hugging Face Llama directory into a checkpoint (step 0, parameters only) in `out`, with
    the config.yaml and tokenizer to train on from there (checkpoint.resume_from=OUT)."""
    start = time.perf_counter()
    src = epath.Path(path)
    hf_model_config(src)  # other architectures are refused before any weight is read
    prepare.check_output(epath.Path(out), overwrite)
    m, flat, tokenizer = from_hf(path)
    cfg = LanguageModelRun(run=RunConfig(name=src.name or "imported", steps=1, output_dir=str(out)), model=m)
    if overwrite:
        checkpoint.clear_output_dir(cfg)
    checkpoint.save_params(cfg, nnx.state(_model(m, flat)))
    if tokenizer is not None:
        tokenizer.write(out)
    (epath.Path(out) / "config.yaml").write_text(config_lib.to_yaml(cfg))
    params = sum(int(np.prod(v.shape)) for v in flat.values())
    return {"out": out, "params": params, "seconds": time.perf_counter() - start}


# --- the UNet: its EMA weights (the ones that sample well) and its config --------------------


def _weights_item(directory: epath.Path, step: int) -> str:
    """The EMA of the parameters if the run kept one, else the parameters."""
    return "ema" if (directory / str(step) / "ema").exists() else "params"


def _export_unet(cfg, directory: epath.Path, step: int, out: epath.Path, *, dtype: str, overwrite: bool,
                 start: float) -> dict:
    prepare.check_output(out, overwrite)
    item = _weights_item(directory, step)
    flat = _restore(directory, step, cfg.model, None, item)
    tensors = [(key.replace("/", "."), v.shape, lambda v=v: np.asarray(v)) for key, v in sorted(flat.items())]
    description = {"architecture": UNET, "step": step, "weights": item, "dtype": dtype,
                   "model": config_lib.to_dict(cfg.model), "diffusion": config_lib.to_dict(cfg.diffusion)}
    with prepare.staged(out, overwrite, last="config.json") as stage:
        size = hf.write_weights(stage, tensors, dtype, max_shard_bytes=2**62)  # one model.safetensors
        (stage / "config.json").write_text(json.dumps(description, indent=2))
    return {"out": str(out), "step": step, "bytes": size, "seconds": time.perf_counter() - start}


def load_unet(path: str, step: int | None = None) -> tuple[UNet, DiffusionConfig]:
    """(UNet with the EMA weights if there are any, its diffusion settings) from a checkpoint or an
    exported directory, on the default device."""
    device = jax.devices()[0]
    src = epath.Path(path)
    if (src / "config.json").exists():
        description = json.loads((src / "config.json").read_text())
        cfg = config_lib.from_dict({"task": "diffusion", "model": description["model"], "diffusion": description["diffusion"]})
        _, state = _abstract_state(cfg.model)
        with hf.open_weights(src) as read:
            flat = {key: jax.device_put(read(key.replace("/", ".")).astype(np.float32), device) for key in _flat(state)}
    else:
        directory, step = checkpoint.locate(path, step)
        cfg = checkpoint.saved_config(directory, step)
        flat = _restore(directory, step, cfg.model, device, _weights_item(directory, step))
    return _model(cfg.model, flat), cfg.diffusion
