"""The denominator of MFU: the peak FLOP/s of the run's devices, from a table or measured on CPU."""

import functools
import time

import jax
import jax.numpy as jnp

from pretrain.tpu import kinds

# Dense bfloat16 peak FLOP/s per chip of the accelerators outside pretrain/tpu/kinds.py's table, by
# device_kind prefix.
PEAK_FLOPS = {
    "TPU7x": 2307e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
    "NVIDIA B200": 2250e12,
}


@functools.cache  # the host's peak: measured once per process
def measure_cpu_flops(n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a jitted float32 matmul on one CPU device (which uses every host core), from
    its fastest repetition: a peak, and steady from run to run where a mean follows the load."""
    x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("cpu")[0])
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest


def total_peak_flops(per_device_override: float = 0.0) -> float:
    """Peak FLOP/s of all devices of the run, the denominator of MFU."""
    devices = jax.devices()
    if per_device_override > 0:
        return per_device_override * len(devices)
    kind = devices[0].device_kind
    if kinds.peak_flops(kind):
        return kinds.peak_flops(kind) * len(devices)
    for prefix, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return peak * len(devices)
    if devices[0].platform == "cpu":
        # Faked CPU devices share the host's cores: the host is the unit of peak.
        return measure_cpu_flops() * jax.process_count()
    raise ValueError(f"no peak FLOP/s known for device '{kind}'; set runtime.peak_flops_per_device")
