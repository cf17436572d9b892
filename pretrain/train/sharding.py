"""The device mesh and the one table that maps logical axis names to mesh axes."""

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pretrain.config import ConfigError

# `replica` spans TPU slices (one on a single slice or a CPU): the batch is split over it, parameters
# are not, so the only traffic over the slow network between slices (DCN) is the gradient reduction.
# `data` and `model` lie within a slice, on its fast interconnect (ICI).
MESH_AXES = ("replica", "data", "model")

# Parameters are sharded FSDP-style along `data` (their `embed` dimension) and
# tensor-parallel along `model`; activations put `batch` on `replica` x `data`. Activations leave
# their embed dimension unnamed, so `batch` and `embed` never claim `data` together.
LOGICAL_RULES = (
    ("batch", ("replica", "data")),
    # The batch split over slices only: the embedding lookup gathers token ids within a slice.
    ("slice_batch", "replica"),
    ("length", None),
    # The residual stream between the layers' matmuls: its positions or its width split over `model`
    # as mesh.residual_split says (axis_rules).
    ("residual_length", None),
    ("residual_embed", None),
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


def axis_rules(num_kv_heads: int, model_axis: int, residual_split: str = "none"):
    """LOGICAL_RULES for the language model: K/V heads replicated when there are fewer of them than
    `model` devices; the residual stream split over `model` along `residual_split` ("length" or
    "embed"), or not ("none").

    A split residual: each device of `model` keeps and normalises 1/model of the residual stream
    between the matmuls (so also of the layer inputs saved for the backward pass), the sum of the
    output projections' partial products is reduce-scattered instead of all-reduced, and the next
    matmul's input all-gathered: the same bytes as the all-reduce, in two halves. Split along the
    positions (sequence parallelism), XLA:TPU gathers them inside the next matmuls as windowed einsums,
    which leave the SwiGLU's backward product as an HBM pass of its own; split along the width
    (MaxText's choice), it gathers with plain all-gathers. On the 8b, v5p-64, mesh 8 x 4 (libtpu
    0.0.52), the width's HBM-bound work is 1.14 s against 1.30, its forecast step 9.23 s against 9.45."""
    changed = {"kv_heads": None} if num_kv_heads % model_axis else {}
    if residual_split != "none":
        changed[f"residual_{residual_split}"] = "model"
    return tuple((name, changed.get(name, axis)) for name, axis in LOGICAL_RULES)


def within_slice(rules) -> tuple:
    """The rules for one slice's share of a batch, computed apart from the other slices' (vmapped
    over `replica`): the same table with `replica` taken out."""
    def drop(axis):
        rest = tuple(a for a in (axis if isinstance(axis, tuple) else (axis,)) if a not in (None, "replica"))
        return rest if len(rest) > 1 else rest[0] if rest else None

    return tuple((name, drop(axis)) for name, axis in rules)


def make_mesh(shape: tuple[int, int], devices=None) -> jax.sharding.Mesh:
    """The (replica, data, model) mesh for mesh.data x mesh.model = `shape` over `devices` (default:
    all of this run's), laid out for the interconnect: on TPUs, neighbouring mesh positions are
    neighbouring chips (jax.make_mesh's order), and `replica` has one position per slice."""
    # Auto axes: the compiler propagates shardings from the annotated parameters and the
    # constraints in the models; shard_map marks the places where we want explicit collectives.
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    devices = jax.devices() if devices is None else devices
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    data, model = shape
    if data % slices:
        raise ConfigError(f"mesh.data={data} must be a multiple of the {slices} slices, which split the data axis")
    per_slice = (1, data // slices, model)
    where = f"{len(devices) // slices} {devices[0].device_kind} devices"
    where += f" in each of {slices} slices" if slices > 1 else ""
    try:
        grid = _device_grid(per_slice, slices, devices)
    except (NotImplementedError, ValueError, AssertionError) as e:
        raise ConfigError(f"mesh.data x mesh.model = {data} x {model} cannot be laid out on {where} "
                          f"({str(e).splitlines()[0]}); choose a mesh.model that divides a chip row") from None
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


def _device_grid(per_slice: tuple[int, ...], slices: int, devices) -> np.ndarray:
    """Devices in mesh order: jax.make_mesh's physical order where it has one; where a mesh axis must
    split a physical axis of the torus (64 x 4 on a 16 x 16 slice), the order that allows it."""
    if slices > 1:
        return mesh_utils.create_hybrid_device_mesh(per_slice, (slices, 1, 1), devices, allow_split_physical_axes=True)
    try:
        return mesh_utils.create_device_mesh(per_slice, devices)
    except NotImplementedError:
        return mesh_utils.create_device_mesh(per_slice, devices, allow_split_physical_axes=True)


def rehearsal_mesh(shape: tuple[int, int], slice_devices, devices) -> jax.sharding.Mesh:
    """The mesh of a TPU slice (over its topology's `slice_devices`) with each chip replaced by one of
    `devices` (this run's CPU devices) of the same process, at the same place among that process's
    devices: rows, data positions and checkpoints are then laid out across processes exactly as on
    the slice."""
    def by_process(ds):
        out = {}
        for d in sorted(ds, key=lambda d: d.id):
            out.setdefault(d.process_index, []).append(d)
        return out

    hosts, ours = by_process(slice_devices), by_process(devices)
    if [len(ds) for ds in hosts.values()] != [len(ds) for ds in ours.values()]:
        raise ConfigError(f"the slice has {len(hosts)} hosts x {len(hosts[0])} chips, but this run has "
                          f"{len(ours)} processes x {len(ours[0])} devices; launch {len(hosts)} processes "
                          f"(launch/local.sh {len(hosts)}) with runtime.fake_cpu_devices={len(hosts[0])}")
    mesh = make_mesh(shape, slice_devices)
    place = {chip: ours[p][i] for p, chips in hosts.items() for i, chip in enumerate(chips)}
    grid = np.vectorize(place.__getitem__, otypes=[object])(mesh.devices)
    return jax.sharding.Mesh(grid, mesh.axis_names, axis_types=mesh.axis_types)


def describe(shape: dict[str, int]) -> str:
    """A mesh's shape as "data=2 x model=4", with `replica` (the slices) first where there are several."""
    return " x ".join(f"{name}={size}" for name, size in shape.items() if name != "replica" or size > 1)


def logical_spec(names, rules) -> PartitionSpec:
    table = dict(rules)
    return PartitionSpec(*(table[n] if n is not None else None for n in names))


def rows_by_process(sharding: NamedSharding, global_batch: int) -> dict[int, list[int]]:
    """For each process, the rows of a global batch that its devices hold under `sharding`, in
    order. On a TPU slice they are seldom one block: the mesh follows the chips' torus, not the
    hosts. Rows split over both `model` and hosts are held, and so read, by several processes."""
    rows = {}
    for device, index in sharding.devices_indices_map((global_batch,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
    return {p: sorted(r) for p, r in sorted(rows.items())}


def process_rows(sharding: NamedSharding, global_batch: int) -> list[int]:
    """The rows of a global batch that this process reads (rows_by_process)."""
    return rows_by_process(sharding, global_batch)[jax.process_index()]


def blocks(rows: list[int]) -> str:
    """Sorted row indices as "0-63, 256-319"."""
    spans, start = [], None
    for i, r in enumerate(rows):
        if start is None:
            start = r
        if i + 1 == len(rows) or rows[i + 1] != r + 1:
            spans.append(f"{start}-{r}" if r > start else str(start))
            start = None
    return ", ".join(spans)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int) -> dict[str, jax.Array]:
    """Global arrays with the batch sharding from each process's rows (process_rows, in that order:
    JAX maps the devices' row blocks, sorted, onto consecutive rows of the local data)."""
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:])) for k, v in local.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a global array sharded along its first axis, in order (process_rows);
    replicas read once."""
    shards = {s.index[0].start or 0: s.data for s in array.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
