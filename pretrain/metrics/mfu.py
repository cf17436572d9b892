"""The denominator of MFU: the peak FLOP/s of the run's devices, from a table or measured on CPU."""

import jax

from pretrain.metrics import cpu
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


def total_peak_flops(per_device_override: float = 0.0, multiply_dtype: str = "float32") -> float:
    """Peak FLOP/s of all devices of the run, the denominator of MFU; on CPU, measured in the dtype its
    matmuls multiply in."""
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
        return cpu.matmul_flops(multiply_dtype) * jax.process_count()
    raise ValueError(f"no peak FLOP/s known for device '{kind}'; set runtime.peak_flops_per_device")
