"""This host's CPU: its name and bfloat16 units (which the benchmarks print beside every figure), its
matmul FLOP/s in float32 and in bfloat16 (the peak behind a CPU run's MFU), and which of the two it
multiplies faster."""

import functools
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# The flags that give a CPU bfloat16 dot instructions: x86's AVX-512 and AMX ones, aarch64's FEAT_BF16.
BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")

# bfloat16 is chosen only where it is clearly the faster, so that timing noise cannot flip the choice
# between a run and its resume. Measured: an AMX Xeon 5x faster in it under jax 0.10.2, 0.9x under
# 0.12.1 (whose YNNPACK picks dot kernels by cost tables chosen from the reported CPU model, and the
# table for that virtual machine's model costs no AMX kernel); CPUs without the units 0.67x.
MARGIN = 1.25


@functools.cache
def describe(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model and its bfloat16 units, e.g. 'AMD EPYC 9B14 (family 25 model 17), 2 cores, bfloat16
    units: avx512_bf16'. The x86 family and model numbers are what libraries pick kernels by, and
    often all a virtual machine's name leaves ('Intel(R) Xeon(R) Processor')."""
    fields = {}
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    units = [f for f in BFLOAT16_FLAGS if f in flags]
    return f"{name}, {os.cpu_count()} cores, bfloat16 units: {', '.join(units) or 'none'}"


@functools.cache  # measured once per process and dtype
def matmul_flops(dtype: str = "float32", n: int = 2048, reps: int = 8) -> float:
    """FLOP/s of a jitted n x n matmul in `dtype` (accumulating in float32) on one CPU device, which
    uses every host core, from its fastest repetition: a peak, steady from run to run where a mean
    follows the load."""
    x = jax.device_put(jnp.ones((n, n), dtype), jax.devices("cpu")[0])
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
    matmul(x).block_until_ready()
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n**3 / fastest


def faster_multiply_dtype() -> str:
    """"bfloat16" where this CPU multiplies it clearly faster than float32 (by MARGIN), else "float32"."""
    return "bfloat16" if matmul_flops("bfloat16") >= MARGIN * matmul_flops("float32") else "float32"
