"""The TPU kinds, in one table: what launch scripts, GKE manifests, `pretrain plan` and the MFU
peak all read. Accelerator names follow Cloud's: v4 and v5p count TensorCores (two per chip),
v5e and v6e count chips (`v5litepod-16` is also spelt `v5e-16`).
"""

import dataclasses
import difflib
import re


@dataclasses.dataclass(frozen=True)
class TpuKind:
    name: str  # the prefix of Cloud's accelerator type, e.g. "v5p" in v5p-64
    cores_per_chip: int  # what the number in the accelerator type counts: 2 = TensorCores, 1 = chips
    dims: int  # torus dimensions of a slice's topology string (3: 2x4x4, 2: 4x4)
    sizes: tuple[int, ...]  # chip counts Cloud sells as one slice
    max_chips_per_vm: int  # single-host slices up to this many chips; bigger ones have 4 per VM
    hbm_gib: float  # per chip
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes_per_s: float  # per chip
    ici_link_bytes_per_s: float  # one ICI link, both directions together
    dcn_bytes_per_s: float  # per chip, between slices
    host_bytes_per_s: float  # per chip, to and from its host's memory (PCIe)
    device_kinds: tuple[str, ...]  # jax.Device.device_kind prefixes
    gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
    runtime_version: str  # TPU VM software version for gcloud
    topology_prefix: str  # jax.experimental.topologies.get_topology_desc's name prefix


# Peak FLOP/s and HBM bandwidth: Cloud TPU's pages for each kind (docs.cloud.google.com/tpu/docs/v4,
# v5e, v5p, v6e). ICI per link, DCN and PCIe per chip: "How to Scale Your Model", chapter "All About
# TPUs" (jax-ml.github.io/scaling-book/tpus); v4's figures there are for v4p, the slices sold as v4.
KINDS = {
    k.name: k
    for k in (
        TpuKind("v4", 2, 3, (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048), 4, 32.0, 275e12, 1.2e12, 9e10, 6.25e9, 1.6e10,
                ("TPU v4",), "tpu-v4-podslice", "tpu-ubuntu2204-base", "v4"),
        TpuKind("v5p", 2, 3, (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), 4, 95.0, 459e12, 2.765e12, 1.8e11,
                6.25e9, 1.6e10, ("TPU v5p", "TPU v5"), "tpu-v5p-slice", "v2-alpha-tpuv5", "v5"),
        TpuKind("v5e", 1, 2, (1, 4, 8, 16, 32, 64, 128, 256), 8, 15.75, 197e12, 8.19e11, 9e10, 3.125e9, 1.6e10,
                ("TPU v5 lite", "TPU v5e"), "tpu-v5-lite-podslice", "v2-alpha-tpuv5-lite", "v5e"),
        TpuKind("v6e", 1, 2, (1, 4, 8, 16, 32, 64, 128, 256), 8, 31.25, 918e12, 1.638e12, 1.8e11, 1.25e10, 3.2e10,
                ("TPU v6 lite", "TPU v6e"), "tpu-v6e-slice", "v2-alpha-tpuv6e", "v6e"),
    )
}
ALIASES = {"v5litepod": "v5e"}


class TpuError(ValueError):
    """An accelerator type or topology that does not exist; the message suggests the nearest."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """One TPU slice of an accelerator type, e.g. v5p-64: 32 chips in a 2x4x4 torus on 8 VMs."""

    kind: TpuKind
    accelerator_type: str  # as written, e.g. "v5litepod-16"
    chips: int

    @property
    def chips_per_vm(self) -> int:
        return self.chips if self.chips <= self.kind.max_chips_per_vm else 4

    @property
    def vms(self) -> int:
        return self.chips // self.chips_per_vm

    @property
    def cloud_accelerator_type(self) -> str:
        """The spelling gcloud and xpk take, e.g. v5litepod-16 for v5e-16."""
        prefix = next((alias for alias, name in ALIASES.items() if name == self.kind.name), self.kind.name)
        return f"{prefix}-{self.chips * self.kind.cores_per_chip}"

    @property
    def topology(self) -> str:
        """The torus shape, e.g. "2x4x4": doubling the last of the smallest dimensions from 1x..x1,
        which gives Cloud's standard shapes (v5p-8 2x2x1, v5p-64 2x4x4, v5e-8 2x4, v5e-16 4x4)."""
        shape = [1] * self.kind.dims
        while shape[0] * shape[1] * (shape[2] if self.kind.dims == 3 else 1) < self.chips:
            smallest = min(shape)
            i = max(j for j, d in enumerate(shape) if d == smallest)
            shape[i] *= 2
        if self.kind.dims == 3 and self.chips == 4:
            shape = [2, 2, 1]  # Cloud writes the 4-chip 3-D slice this way round
        return "x".join(map(str, shape))

    @property
    def wrap(self) -> tuple[bool, bool, bool]:
        """Which torus dimensions close into rings (wraparound links): all three in 3-D slices of whole
        4x4x4 cubes, and a 2-D slice's sides of 16 (a whole pod's), as Cloud builds them. Compiled
        without them, a v5p-128's program is not the slice's: XLA:TPU turns every FSDP gather into
        an all-reduce of the whole weight."""
        if self.kind.dims == 3:
            return (self.chips >= 64,) * 3
        return (*(int(d) == 16 for d in self.topology.split("x")), False)


def all_accelerator_types() -> list[str]:
    return [f"{k.name}-{n * k.cores_per_chip}" for k in KINDS.values() for n in k.sizes]


def parse(accelerator_type: str) -> Slice:
    """A Slice for Cloud's accelerator type name, or TpuError naming the nearest real one."""
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type.strip().lower())
    kind = KINDS.get(ALIASES.get(m.group(1), m.group(1))) if m else None
    if kind is not None and int(m.group(2)) % kind.cores_per_chip == 0:
        chips = int(m.group(2)) // kind.cores_per_chip
        if chips in kind.sizes:
            return Slice(kind, accelerator_type, chips)
    near = difflib.get_close_matches(accelerator_type.lower(), all_accelerator_types(), n=1, cutoff=0.0)
    raise TpuError(f"accelerator type '{accelerator_type}' does not exist; did you mean '{near[0]}'? "
                   f"(kinds: {', '.join(KINDS)}; v4/v5p count TensorCores, v5e/v6e chips)")


def peak_flops(device_kind: str) -> float | None:
    """bf16 peak FLOP/s of one chip by jax's device_kind, or None if it is not a known TPU."""
    prefixes = [(prefix, k) for k in KINDS.values() for prefix in k.device_kinds]
    for prefix, kind in sorted(prefixes, key=lambda pk: -len(pk[0])):  # "TPU v5 lite" before "TPU v5"
        if device_kind.startswith(prefix):
            return kind.peak_bf16_flops
    return None
