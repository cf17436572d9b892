"""Building blocks shared by the model families: annotated parameters, activation
sharding constraints, matmuls in the compute dtype, RMSNorm and remat policies."""

import functools
import string

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd


def param(rngs: nnx.Rngs, init, shape, names) -> nnx.Param:
    """A float32 parameter tagged with logical axis names.

    Eager sharding is off: the trainer creates parameters inside a jitted init whose
    output shardings come from these names, so a model never needs a mesh to exist.
    """
    assert len(shape) == len(names), (shape, names)
    return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=tuple(names), eager_sharding=False)


def fan_in_init(fan_in_axes=(0,)):
    """Normal with std 1/sqrt(fan_in), fan_in being the product of the given axes."""

    def init(key, shape, dtype):
        fan_in = 1
        for a in fan_in_axes:
            fan_in *= shape[a]
        return jax.random.normal(key, shape, dtype) * fan_in**-0.5

    return init


def constrain(x: jax.Array, names) -> jax.Array:
    """Sharding constraint by logical names, through the active axis rules; a no-op without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = jax.sharding.PartitionSpec(*spmd.from_sharding_rules(names, spmd.get_logical_axis_rules()))
    return jax.lax.with_sharding_constraint(x, spec)


def compile_platform() -> str:
    """The platform being compiled for: the active mesh's devices (a TPU topology's, in `pretrain
    plan` on a CPU host), or the default backend's without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.abstract_device.platform if mesh.abstract_device else jax.default_backend()


# The dtype a CPU multiplies bfloat16 operands in, chosen once per process by what this CPU does
# faster (pretrain/build.py, timed by pretrain/metrics/cpu.py): XLA:CPU reaches bfloat16 dot units
# (amx_bf16) in some releases (jax 0.10: 5x float32) and not in others (0.12: 0.9x), and emulates
# bfloat16 on CPUs without them. float32 until chosen.
_cpu_multiply = {"dtype": jnp.dtype("float32")}


def set_cpu_multiply_dtype(dtype: str):
    """How this process's CPU compiles multiply bfloat16 operands: "bfloat16" or "float32"."""
    _cpu_multiply["dtype"] = jnp.dtype(dtype)


def multiply_dtype(dtype) -> jnp.dtype:
    """The dtype the matmuls of a model computing in `dtype` multiply in, on this process's CPU."""
    return _cpu_multiply["dtype"] if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def einsum(spec: str, *operands, dtype, out=None) -> jax.Array:
    """jnp.einsum of the operands rounded to the compute `dtype`; the result in `out` (default `dtype`).

    On a CPU that multiplies float32 faster, bfloat16 operands are multiplied as float32; on one that
    multiplies bfloat16 faster, the dots and their gradients' dots return float32 sums. The numbers
    are the same up to the order of the sums: a product of two bfloat16 values is exact in float32,
    and the sums accumulate in float32 either way.
    """
    operands = [x.astype(dtype) for x in operands]
    if jnp.dtype(dtype) == jnp.bfloat16 and compile_platform() == "cpu":
        if multiply_dtype(dtype) == jnp.float32:
            return jnp.einsum(spec, *[x.astype(jnp.float32) for x in operands]).astype(out or dtype)
        spec = _spelled_out(spec, *operands)
        if not _batched(spec):  # XLA:CPU (jax 0.10) can fail to run a batched dot with float32 sums
            return _float32_sums(spec, *operands).astype(out or dtype)
    return jnp.einsum(spec, *operands, preferred_element_type=out).astype(out or dtype)


def _spelled_out(spec: str, *operands) -> str:
    """The spec with its ellipses written as unused index letters, aligned on the right as they broadcast."""
    if "..." not in spec:
        return spec
    inputs, result = spec.split("->")
    terms = inputs.split(",")
    ranks = [x.ndim - len(term.replace("...", "")) for term, x in zip(terms, operands)]
    letters = _unused_letters(spec)[:max(ranks)]
    terms = [term.replace("...", letters[len(letters) - rank:]) for term, rank in zip(terms, ranks)]
    return ",".join(terms) + "->" + result.replace("...", letters)


def _unused_letters(spec: str) -> str:
    """The lowercase letters a spec does not use as indices."""
    return "".join(c for c in string.ascii_lowercase if c not in spec)


def _indices(spec: str) -> tuple[str, str, str]:
    """A two-operand einsum's indices: its operands' and its result's."""
    operands, result = spec.split("->")
    a, b = operands.split(",")
    return a, b, result


def _batched(spec: str) -> bool:
    """Whether a two-operand einsum has a batch index: one in both operands and the result."""
    a, b, result = _indices(spec)
    return bool(set(a) & set(b) & set(result))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _float32_sums(spec: str, a, b):
    """A two-operand einsum's float32 sums of bfloat16 products, the only dots XLA:CPU runs on its
    bfloat16 units (a bfloat16 result takes a path 5x slower). Its gradients are dots of the same
    kind: autodiff's would multiply the float32 cotangent by a bfloat16 operand, in float32."""
    a_spec, b_spec, out_spec = _indices(spec)
    summed = "".join(i for i in a_spec if i not in out_spec)
    if not a_spec.endswith(summed):
        # XLA:CPU (jax 0.10) hands a dot to its bfloat16 units only when the left operand's summed
        # indices come last in memory (a weight's gradient sums over the leading tokens): 4x faster
        # than its other path, for the price of a copy. A bare transpose XLA would make free by laying
        # it out column-major; a new unit index makes it a row-major copy, which the barrier keeps
        # XLA from folding back into the dot.
        kept = "".join(i for i in a_spec if i in out_spec)
        unit = _unused_letters(spec)[0]
        moved = jnp.transpose(a, [a_spec.index(i) for i in kept + summed])
        a = jax.lax.optimization_barrier(moved.reshape(moved.shape[:len(kept)] + (1,) + moved.shape[len(kept):]))
        spec, b = f"{kept}{unit}{summed},{unit}{b_spec}->{out_spec}", b[None]
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _float32_sums_fwd(spec, a, b):
    return _float32_sums(spec, a, b), (a, b)


def _float32_sums_bwd(spec, operands, cotangent):
    a, b = operands
    a_spec, b_spec, out_spec = _indices(spec)  # no batch index
    g = cotangent.astype(a.dtype)
    return (_float32_sums(f"{out_spec},{b_spec}->{a_spec}", g, b).astype(a.dtype),
            _float32_sums(f"{a_spec},{out_spec}->{b_spec}", a, g).astype(b.dtype))


_float32_sums.defvjp(_float32_sums_fwd, _float32_sums_bwd)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


# Which intermediate values a rematerialised block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def custom_policy(names: dict[str, str]):
    """Keep the tensors named `device` (jax.ad_checkpoint.checkpoint_name), offload those named
    `offload` to pinned host memory, recompute the rest."""
    chosen = {choice: [name for name, c in names.items() if c == choice] for choice in ("device", "offload")}
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=chosen["device"], names_which_can_be_offloaded=chosen["offload"],
        offload_src="device", offload_dst="pinned_host")


def remat(fn, policy: str, *, in_scan: bool, names: dict[str, str] | None = None):
    """Wrap a block in jax.checkpoint (policy "custom": `names` says what becomes of each named
    tensor); inside lax.scan CSE cannot undo remat, so it may stay on."""
    if policy == "custom":
        return jax.checkpoint(fn, policy=custom_policy(names), prevent_cse=not in_scan)
    if REMAT_POLICIES[policy] is None:
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan)
