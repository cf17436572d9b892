"""A TPU slice's real layout, from its topology description (libtpu, no TPU): which rows of the
global batch each host reads, meshes of every shape that divides the chips, several slices."""

import os
import subprocess
import sys

import numpy as np
import pytest

from jax.sharding import NamedSharding

from pretrain import cli
from pretrain import config as config_lib
from pretrain.config.checks import mesh_shape
from pretrain.tpu import kinds
from pretrain.tpu.devices import topology_devices
from pretrain.train import sharding

from conftest import ROOT
from test_trainer import SMOKE

GLOBAL_BATCH = 512


def expected_rows(mesh, batch: int) -> dict[int, list[int]]:
    """Each host's rows worked out from the mesh's grid alone: row r lies in data block
    r // (batch / blocks) of the replica x data positions, held by every device of that block."""
    grid = mesh.devices.reshape(-1, mesh.shape["model"])  # (replica x data) blocks, model devices each
    per_block = batch // grid.shape[0]
    rows = {}
    for block, devices in enumerate(grid):
        for d in devices:
            rows.setdefault(d.process_index, set()).update(range(block * per_block, (block + 1) * per_block))
    return {p: sorted(r) for p, r in sorted(rows.items())}


def host_rows(mesh, batch: int = GLOBAL_BATCH) -> dict[int, list[int]]:
    batch_sharding = NamedSharding(mesh, sharding.logical_spec(("batch",), sharding.LOGICAL_RULES))
    return sharding.rows_by_process(batch_sharding, batch)


SLICES = [f"{kind}-{chips * kinds.KINDS[kind].cores_per_chip}" for kind in kinds.KINDS for chips in (16, 64, 256)]


@pytest.mark.parametrize("accelerator", SLICES)
def test_every_host_reads_the_rows_its_devices_hold(accelerator):
    slice_ = kinds.parse(accelerator)
    devices = topology_devices(slice_)
    for shape in ((slice_.chips, 1), (slice_.chips // 4, 4)):
        rows = host_rows(sharding.make_mesh(shape, devices))
        assert rows == expected_rows(sharding.make_mesh(shape, devices), GLOBAL_BATCH), (accelerator, shape)
        assert len(rows) == slice_.vms
        assert sorted(set().union(*rows.values())) == list(range(GLOBAL_BATCH))
        # Every row is read by exactly the hosts whose chips hold it: once, if `model` stays within a host.
        readers = np.zeros(GLOBAL_BATCH, int)
        for r in rows.values():
            readers[r] += 1
        assert readers.min() >= 1 and (shape[1] > 1 or readers.max() == 1), (accelerator, shape)


def test_the_slices_the_presets_were_planned_for():
    """The layouts that stopped `pretrain train` before step 1: hosts hold several blocks of rows."""
    split = {}
    for preset, accelerator in (("1b", "v5e-16"), ("8b", "v5p-64"), ("70b", "v5p-64")):
        cfg = config_lib.load(config_lib.preset_path("llm", preset))
        slice_ = kinds.parse(accelerator)
        mesh = sharding.make_mesh(mesh_shape(cfg, slice_.chips), topology_devices(slice_))
        rows = host_rows(mesh, cfg.train.global_batch)
        assert rows == expected_rows(mesh, cfg.train.global_batch) and len(rows) == slice_.vms
        split[preset] = sum(len(sharding.blocks(r).split(", ")) > 1 for r in rows.values())
    assert split["8b"] == 8 and split["1b"] == 2
    v5p = sharding.make_mesh((8, 4), topology_devices(kinds.parse("v5p-64")))
    assert sharding.blocks(host_rows(v5p)[0]) == "0-63, 256-319"


@pytest.mark.parametrize("shape", [(64, 4), (32, 8), (128, 2), (8, 32), (256, 1)])
def test_meshes_that_split_a_physical_axis_are_built(shape):
    """On a 16 x 16 slice a `model` axis of 4 or 8 is not a product of whole torus axes; such meshes
    are laid out all the same, each chip once, neighbours along `model` on the same host row."""
    devices = topology_devices(kinds.parse("v6e-256"))
    mesh = sharding.make_mesh(shape, devices)
    assert dict(mesh.shape) == {"replica": 1, "data": shape[0], "model": shape[1]}
    assert len(set(mesh.devices.flat)) == 256
    rows = host_rows(mesh)
    assert rows == expected_rows(mesh, GLOBAL_BATCH) and len(rows) == 64


def test_no_libtpu_noise_before_a_one_line_error():
    """With libtpu installed and no TPU here, bad input still prints its one line and nothing else (the
    session's JAX_PLATFORMS=cpu, which would hide libtpu, is not passed on)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "XLA_"))}
    proc = subprocess.run([sys.executable, "-m", "pretrain", "smoke", "llm", "runtime.fake_cpu_devices=0", "mesh.data=64"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "there are 1 devices" in proc.stderr, proc.stderr
