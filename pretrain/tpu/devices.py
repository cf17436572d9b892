"""A TPU slice's devices as JAX sees them, from libtpu (the `tpu` extra) on any machine, and
libtpu kept quiet where there is no chip."""

import os

from pretrain.tpu.kinds import Slice


def topology_devices(slice_: Slice, num_slices: int = 1) -> list:
    """The devices of `num_slices` slices of this kind as JAX sees them on a TPU VM (ids, hosts,
    coordinates), from libtpu (the `tpu` extra) on any machine: to compile for the slice, or to
    rehearse its layout."""
    from jax.experimental import topologies  # noqa: PLC0415 - the kinds are read without JAX

    quiet_libtpu()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling claims no chip: plans may run side by side
    kind = slice_.kind
    dims = [int(d) for d in slice_.topology.split("x")]
    # A single-host slice is all one host; bigger ones have 2x2x1 chips per host.
    host = (dims + [1] * (3 - len(dims))) if slice_.vms == 1 else [2, 2, 1]
    return topologies.get_topology_desc(
        platform="tpu", topology_name=f"{kind.topology_prefix}:{slice_.topology}",
        chip_config_name="megacore" if kind.cores_per_chip == 2 else "default",
        chips_per_host_bounds=tuple(host), num_slices=num_slices, wrap=slice_.wrap,
    ).devices


def quiet_libtpu():
    """On a machine without TPU chips, tell libtpu (installed with the `tpu` extra, loaded when JAX
    starts its backends) that it runs somewhere plausible: else it prints lines of warnings about
    the TPU it cannot find, before any of our own output. Call before JAX starts its backends."""
    from jax._src import hardware_utils  # noqa: PLC0415 - how JAX itself looks for chips on the PCI bus

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
