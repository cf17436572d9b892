"""The step time of a compiled train step on a TPU slice, forecast from its optimized program.

Each operation the chip runs takes the longer of its matmul FLOPs at the chip's peak and its HBM
traffic at the chip's HBM bandwidth (a per-op roofline, pretrain/hlo.op_costs), both derated by one
sustained fraction; splash attention's kernels, invisible in the program, add their FLOPs. The
collectives XLA scheduled asynchronously (split into -start/-done, or windowed einsums) run beside
that work on the interconnect, as do transfers to host memory (offloaded activations); collectives
it left synchronous add their time. So:

    step = max(compute, ICI, DCN, host transfers) + synchronous collectives

ICI time is the collectives' data over the slice's links: an all-reduce moves its data twice (a
reduce-scatter, then an all-gather), the rest once, and a collective over the whole slice uses one
link along each torus dimension (both directions). DCN and host time divide by the per-chip bandwidths
of the TPU table.

SUSTAINED is the one calibrated figure: the share of peak that the chips sustain on both FLOPs and
HBM bandwidth. It was fitted on MaxText's published Llama-3.1-8B runs on v6e-8 to v6e-256, compiled
by the tpu extra's libtpu 0.0.52 (benchmarks/forecast_check.py prints the forecast against them and
against the runs kept for checking).
"""

import dataclasses

from pretrain.plan import hlo
from pretrain.tpu.kinds import TpuKind

SUSTAINED = 0.62

# How often a collective's data crosses the links (ring algorithms).
_WIRE = {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 1, "collective-permute": 1}


@dataclasses.dataclass(frozen=True)
class Forecast:
    step_s: float
    compute_s: float  # the per-op roofline plus splash attention, derated
    matmul_s: float  # the part of compute_s that is matmul-bound
    memory_s: float  # the part that is HBM-bound
    ici_s: float
    dcn_s: float
    host_s: float
    sync_s: float  # synchronous collectives, not overlapped

    @property
    def bound_by(self) -> str:
        parts = {"compute": self.compute_s, "ICI": self.ici_s, "DCN": self.dcn_s, "host transfers": self.host_s}
        return max(parts, key=parts.get)


def forecast(hlo_text: str, device_slices: list[int], kind: TpuKind, attention_flops: float,
             sustained: float = SUSTAINED) -> Forecast:
    """Forecast one step of the compiled program `hlo_text` (per chip; device_slices as in
    hlo.collective_bytes), with `attention_flops` per chip executed inside custom calls."""
    flops_per_s, hbm_per_s = kind.peak_bf16_flops * sustained, kind.hbm_bytes_per_s * sustained
    matmul_s = memory_s = host = 0.0
    for op in hlo.op_costs(hlo_text).values():
        t_flops, t_bytes = op.flops / flops_per_s, op.hbm_bytes / hbm_per_s
        matmul_s += t_flops if t_flops >= t_bytes else 0.0
        memory_s += t_bytes if t_bytes > t_flops else 0.0
        host += op.host_bytes
    matmul_s += attention_flops / flops_per_s
    counted = hlo.collective_bytes(hlo_text, device_slices)

    def wire(link: str, sync: bool) -> float:
        return sum(_WIRE[k] * (counted["sync"][link][k] if sync else b - counted["sync"][link][k])
                   for k, b in counted[link].items())

    ici_per_s = kind.ici_link_bytes_per_s * kind.dims
    compute_s = matmul_s + memory_s
    ici_s, dcn_s = wire("ici", False) / ici_per_s, wire("dcn", False) / kind.dcn_bytes_per_s
    sync_s = wire("ici", True) / ici_per_s + wire("dcn", True) / kind.dcn_bytes_per_s
    host_s = host / kind.host_bytes_per_s
    return Forecast(max(compute_s, ici_s, dcn_s, host_s) + sync_s, compute_s, matmul_s, memory_s, ici_s, dcn_s,
                    host_s, sync_s)
