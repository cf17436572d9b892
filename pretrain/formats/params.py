"""A model's parameters as a flat {"a/b/0/c": array} dict: read from a checkpoint (parameters only,
onto one device: no optimizer state, no data, no training mesh) and put into a model; or read one
at a time (Reader), as exports do, so that host memory holds the largest parameter, not the model."""

import jax
import numpy as np
from etils import epath
from flax import nnx, traverse_util

from pretrain.config import ConfigError
from pretrain.run import checkpoint


def abstract_state(model_class: type, m):
    """(graphdef, abstract state) of model_class(m) without allocating it."""
    return nnx.split(nnx.eval_shape(lambda: model_class(m, rngs=nnx.Rngs(0))))


def shapes(model_class: type, m) -> dict:
    """{path: shape} of every parameter of model_class(m), known without allocating any."""
    return {key: a.shape for key, a in flat(abstract_state(model_class, m)[1]).items()}


def flat(state) -> dict:
    """{"a/b/0/c": array}: list indices (the UNet's blocks) become path parts like any name."""
    return {"/".join(map(str, k)): v for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()}


def build(model_class: type, m, params: dict):
    """model_class(m) holding the flat `params`."""
    graphdef, state = abstract_state(model_class, m)
    keys = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict({k: params["/".join(map(str, k))] for k in keys}))
    return nnx.merge(graphdef, state)


def restore(directory: epath.Path, step: int, model_class: type, m, device=None, item: str = "params") -> dict:
    """Flat {path: array} of a checkpoint's parameters (or their EMA), on `device` (default: the first
    CPU device)."""
    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices("cpu")[0])
    _, state = abstract_state(model_class, m)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
    restored = checkpoint.restore_params(str(directory), abstract, step, item)
    return flat(jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored)))  # may come back as dicts


class Reader:
    """reader(path) -> one parameter of a checkpoint as a float32 NumPy array; only the one last read
    is kept. `shapes`: every parameter's shape, by path, known without reading any."""

    def __init__(self, directory: epath.Path, step: int, model_class: type, m, item: str = "params"):
        self.shapes = shapes(model_class, m)
        self.directory, self.kept = directory / str(step) / item, (None, None)

    def __call__(self, key: str) -> np.ndarray:
        if self.kept[0] != key:
            self.kept = (None, None)  # let the last one go before the next is read
            self.kept = (key, checkpoint.restore_array(self.directory, tuple(key.split("/")), self.shapes[key], np.float32))
        return self.kept[1]


def ema_or_params(directory: epath.Path, step: int) -> str:
    """The checkpoint item that samples best: the EMA of the parameters if the run kept one."""
    return "ema" if (directory / str(step) / "ema").exists() else "params"


def save_imported(cfg, expected, tensors, read_tensor, overwrite: bool):
    """An outside model's weights as a step-0 checkpoint under cfg.run.output_dir: every tensor's
    shape checked against `expected` [(their name, shape, _)] before anything is written, then
    `tensors` [(our path, thunk)] written a few at a time (checkpoint.save_params)."""
    for name, shape, _ in expected:
        if read_tensor.shape(name) != tuple(shape):
            raise ConfigError(f"{read_tensor.directory}: {name} has shape {list(read_tensor.shape(name))} where its "
                              f"config.json implies {list(shape)}; is config.json the one these weights came with?")
    if overwrite:
        checkpoint.clear_output_dir(cfg)
    checkpoint.save_params(cfg, tensors)
