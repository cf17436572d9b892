"""The device mesh and the one table that maps logical axis names to mesh axes."""

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pretrain.config import ConfigError

MESH_AXES = ("data", "model")

# Parameters are sharded FSDP-style along `data` (their `embed` dimension) and
# tensor-parallel along `model`; activations put `batch` on `data`. Activations leave
# their embed dimension unnamed, so `batch` and `embed` never claim `data` together.
LOGICAL_RULES = (
    ("batch", "data"),
    ("length", None),
    ("embed", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("layers", None),
    ("norm", None),
    # UNet: kernels FSDP along `data` on their input channels, tensor-parallel on their output
    # channels; activations keep spatial dimensions whole and channels sharded along `model`.
    ("conv_in", "data"),
    ("conv_out", "model"),
    ("channels", "model"),
    ("height", None),
    ("width", None),
)


def axis_rules(num_kv_heads: int, model_axis: int):
    """LOGICAL_RULES, with K/V heads replicated when there are fewer of them than `model` devices."""
    if num_kv_heads % model_axis == 0:
        return LOGICAL_RULES
    return tuple((name, None if name == "kv_heads" else axis) for name, axis in LOGICAL_RULES)


def make_mesh(shape: tuple[int, int], devices=None) -> jax.sharding.Mesh:
    # Auto axes: the compiler propagates shardings from the annotated parameters and the
    # constraints in the models; shard_map marks the places where we want explicit collectives.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    devices = jax.devices() if devices is None else devices
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # Several TPU slices: `data` spans them (its gradient all-reduce crosses the slower DCN
    # between slices), `model` stays within a slice.
    data, model = shape
    if data % slices:
        raise ConfigError(f"mesh.data={data} must be a multiple of the {slices} slices, which split the data axis")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, model), (slices, 1), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_spec(names, rules) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table[n] if n is not None else None for n in names))


def process_rows(sharding: NamedSharding, global_batch: int) -> range:
    """The rows of a global batch that this process's devices hold under `sharding` (one block,
    since hosts lie along `data`; every row when the batch is not split over `data`)."""
    spans = {(s[0].start or 0, s[0].stop or global_batch) for s in sharding.addressable_devices_indices_map((global_batch,)).values()}
    start, stop = min(a for a, _ in spans), max(b for _, b in spans)
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"this process's rows {sorted(spans)} are not one block; order the mesh's devices by process")
    return range(start, stop)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """Global arrays with the batch sharding from each process's rows (sharding.process_rows)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:])) for k, v in local.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded along its first axis (replicas read once)."""
    shards = {s.index[0].start or 0: s.data for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
