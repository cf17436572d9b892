"""`pretrain plan`: the train step compiled for TPU topologies on this CPU (libtpu, no TPU)."""

import json

import numpy as np
import pytest
from flax import nnx

from pretrain import cli, plan, sharding, tpu
from pretrain import config as config_lib

from conftest import TINY, make_trainer
from test_trainer import SMOKE

# The tiny model with TPU-friendly rows; no faked CPU devices: the devices are the topology's.
PLAN = [o for o in TINY if not o.startswith("runtime.fake_cpu_devices")]
PLAN += ["data.seq_len=128", "model.max_seq_len=128", "mesh.data=-1", "mesh.model=2"]


def hand_count(cfg) -> int:
    """Bytes per chip of float32 parameters and AdamW's two moments: every matrix split over all
    chips (embed over data, heads/mlp/vocab over model; K/V heads only over data when there are
    fewer of them than the model axis), norm scales whole on every chip."""
    m, data, model = cfg.model, cfg.mesh.data, cfg.mesh.model
    e, h, k, d, f, v = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
    chips = data * model
    kv = 2 * e * k * d / (chips if k % model == 0 else data)
    matrices = m.num_layers * ((2 * e * h * d + 3 * e * f) / chips + kv) + 2 * v * e / chips
    norms = (2 * m.num_layers + 1) * e
    return int(3 * 4 * (matrices + norms))


def run_plan(capsys, topology, *overrides):
    rc = cli.main(["plan", SMOKE, "--topology", topology, "--json", *PLAN, *overrides])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


@pytest.mark.parametrize("topology, mesh, chips", [("v5e-4", (2, 2), 4), ("v5p-8", (4, 1), 4)])
def test_state_per_chip_is_the_hand_count_and_flops_the_mfu_count(topology, mesh, chips, capsys):
    overrides = [f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}"]
    rc, r, _ = run_plan(capsys, topology, *overrides)
    assert rc == 0 and r["fits"] is True
    assert (r["chips"], r["mesh"]) == (chips, {"data": mesh[0], "model": mesh[1]})
    cfg = config_lib.load(SMOKE, PLAN + overrides)
    scalars = r["params_and_optimizer_gib"] * 2**30 - hand_count(cfg)
    assert 0 <= scalars <= 32, scalars  # the optimizer's step counters
    assert r["flops_per_step"] == cfg.model.flops_per_token(128) * 128 * cfg.train.global_batch
    assert r["hbm_per_chip_gib"] == {"v5e-4": 15.75, "v5p-8": 95.0}[topology]
    assert r["temporaries_gib"] > 0 and r["total_gib"] >= r["params_and_optimizer_gib"] + r["temporaries_gib"]
    # The compute roofline: full remat (the preset's) runs the forward pass twice.
    assert r["flops_per_step"] < r["executed_flops_per_step"] < 4 / 3 * r["flops_per_step"]
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["executed_flops_per_step"])
    assert r["tokens_per_s"] == pytest.approx(128 * cfg.train.global_batch / r["est_step_s"])


def test_a_config_that_does_not_fit_reports_it_and_exits_1(capsys):
    """Rows of 8192 tokens, einsum attention, no remat: the scores kept for the backward pass
    outgrow a v5e chip's 16 GiB."""
    long_rows = ["data.seq_len=8192", "model.max_seq_len=8192", "train.global_batch=64", "model.remat=none"]
    rc, r, err = run_plan(capsys, "v5e-4", *long_rows)
    assert rc == 1
    assert r["fits"] is False and r["temporaries_gib"] is None
    assert len(err.strip().splitlines()) == 1, err
    assert "does not fit on v5e-4" in err and "exceeds" in err and "HBM" in err


def test_plan_builds_the_trainer_with_the_train_command_code(monkeypatch, capsys):
    """plan goes through cli.build, as `train` does, over the topology's devices; the shardings are
    those a CPU run of the same config gets. On TPU, `auto` attention is the splash kernel, compiled
    by Mosaic (not interpreted, as on CPU)."""
    build, built = cli.build, []
    monkeypatch.setattr(cli, "build", lambda *args: built.append(build(*args)) or built[-1])
    rc, r, _ = run_plan(capsys, "v5e-8", "mesh.data=2", "mesh.model=4", "model.attention=auto")
    assert rc == 0 and len(built) == 1 and r["attention"] == "splash"
    trainer = built[0]
    assert {d.platform for d in trainer.mesh.devices.flat} == {"tpu"} and trainer.mesh.devices.size == 8
    with trainer.context():
        lowered = trainer._train_step.lower(trainer.abstract_state_with_shardings(), trainer.batch_spec)
    assert "tpu_custom_call" in lowered.as_text()
    cpu = make_trainer("data.seq_len=128", "model.max_seq_len=128")
    specs = lambda t: [s.spec for s in nnx.to_flat_state(t.state_shardings).leaves]  # noqa: E731
    assert specs(trainer) == specs(cpu)
    assert trainer.batch_sharding.spec == cpu.batch_sharding.spec


BAD = {
    "unknown accelerator": (["--topology", "v5p-65"], "'v5p-65' does not exist; did you mean 'v5p-64'"),
    "mesh vs chips": (["--topology", "v5e-4", "mesh.model=3"], "mesh: 4 devices do not divide by 3"),
    "splash blocks": (["--topology", "v5e-4", "model.attention=splash", "data.seq_len=96"], "a multiple of 128"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert cli.main(["plan", SMOKE, *PLAN, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_topology_devices_match_the_table():
    """Each kind's topology string gives its chip count of devices, whose kind the table knows."""
    for name, slices, chips in (("v5p-64", 1, 32), ("v5e-16", 1, 16), ("v5e-8", 1, 8), ("v6e-4", 2, 8), ("v4-8", 1, 4)):
        slice_ = tpu.parse(name)
        devices = plan.topology_devices(slice_, slices)
        assert len(devices) == chips == slice_.chips * slices
        assert tpu.peak_flops(devices[0].device_kind) == slice_.kind.peak_bf16_flops, devices[0].device_kind


def test_several_slices_split_the_data_axis():
    """Over 2 slices, each slice holds whole rows of the model axis: only `data` crosses slices."""
    devices = plan.topology_devices(tpu.parse("v5e-4"), 2)
    mesh = sharding.make_mesh((4, 2), devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[:2] == slice_of[0, 0]).all() and (slice_of[2:] != slice_of[0, 0]).all()
    with pytest.raises(config_lib.ConfigError, match="multiple of the 2 slices"):
        sharding.make_mesh((1, 8), devices)
