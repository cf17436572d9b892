"""`pretrain plan`: the train step compiled for TPU topologies on this CPU (libtpu, no TPU)."""

import dataclasses
import importlib.metadata
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from models.configs import CustomRemat
from pretrain import build, cli, plan
from pretrain.run import runtime
from pretrain.tpu import kinds
from pretrain.tasks import lm
from pretrain.tpu.devices import topology_devices
from pretrain.train import sharding
from pretrain import config as config_lib

from conftest import TINY, make_train_step, tiny_config
from test_trainer import SMOKE

# The tiny model with TPU-friendly rows; no faked CPU devices: the devices are the topology's.
PLAN = [o for o in TINY if not o.startswith("runtime.fake_cpu_devices")]
PLAN += ["data.seq_len=128", "model.max_seq_len=128", "mesh.data=-1", "mesh.model=2"]


def norm_bytes(cfg) -> int:
    """Float32 norm scales with AdamW's two moments: whole on every chip."""
    return 3 * 4 * (2 * cfg.model.num_layers + 1) * cfg.model.embed_dim


def hand_count(cfg) -> int:
    """Bytes per chip of float32 parameters and AdamW's two moments: every matrix split over all
    chips (embed over data, heads/mlp/vocab over model; K/V heads only over data when there are
    fewer of them than the model axis), norm scales whole on every chip."""
    m, data, model = cfg.model, cfg.mesh.data, cfg.mesh.model
    e, h, k, d, f, v = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
    chips = data * model
    kv = 2 * e * k * d / (chips if k % model == 0 else data)
    matrices = m.num_layers * ((2 * e * h * d + 3 * e * f) / chips + kv) + 2 * v * e / chips
    return int(3 * 4 * matrices + norm_bytes(cfg))


def run_plan(capsys, topology, *overrides):
    rc = cli.main(["plan", SMOKE, "--topology", topology, "--json", *PLAN, *overrides])
    out, err = capsys.readouterr()
    return rc, json.loads(out), err


@pytest.mark.parametrize("topology, mesh, chips", [("v5e-4", (2, 2), 4), ("v5p-8", (4, 1), 4)])
def test_state_per_chip_is_the_hand_count_and_flops_the_mfu_count(topology, mesh, chips, capsys):
    overrides = [f"mesh.data={mesh[0]}", f"mesh.model={mesh[1]}"]
    rc, r, _ = run_plan(capsys, topology, *overrides)
    assert rc == 0 and r["fits"] is True
    assert (r["chips"], r["mesh"]) == (chips, {"replica": 1, "data": mesh[0], "model": mesh[1]})
    cfg = config_lib.load(SMOKE, PLAN + overrides)
    scalars = r["params_and_optimizer_gib"] * 2**30 - hand_count(cfg)
    assert 0 <= scalars <= 32, scalars  # the optimizer's step counters
    assert r["flops_per_step"] == cfg.model.flops_per_token(128) * 128 * cfg.train.global_batch
    assert r["hbm_per_chip_gib"] == {"v5e-4": 15.75, "v5p-8": 95.0}[topology]
    # (The tiny step may need no HBM temporaries at all: XLA keeps them in on-chip memory.)
    assert r["temporaries_gib"] >= 0 and r["total_gib"] >= r["params_and_optimizer_gib"] + r["temporaries_gib"]
    # The compute roofline: full remat (the preset's) runs the forward pass twice.
    assert r["flops_per_step"] < r["executed_flops_per_step"] < 4 / 3 * r["flops_per_step"]
    peak = chips * kinds.parse(topology).kind.peak_bf16_flops
    assert r["roofline_step_s"] == pytest.approx(r["executed_flops_per_step"] / peak)
    # The forecast: no faster than the bound; MFU and tokens/s from it.
    f = r["forecast"]
    assert r["est_step_s"] == pytest.approx(max(f["compute_s"], f["ici_s"], f["dcn_s"], f["host_s"]) + f["sync_s"])
    assert r["est_step_s"] > r["roofline_step_s"] and f["dcn_s"] == f["host_s"] == 0
    assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["est_step_s"] / peak)
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
    """plan goes through build.build, as `train` does, over the topology's devices; the shardings are
    those a CPU run of the same config gets. On TPU, `auto` attention is the splash kernel, compiled
    by Mosaic (not interpreted, as on CPU)."""
    original, built = build.build, []
    monkeypatch.setattr(build, "build", lambda *args: built.append(original(*args)) or built[-1])
    rc, r, _ = run_plan(capsys, "v5e-8", "mesh.data=2", "mesh.model=4", "model.attention=auto")
    assert rc == 0 and len(built) == 1 and r["attention"] == "splash"
    train_step = built[0]
    assert {d.platform for d in train_step.mesh.devices.flat} == {"tpu"} and train_step.mesh.devices.size == 8
    with train_step.context():
        lowered = train_step.train_jit.lower(train_step.abstract_state_with_shardings(), train_step.batch_spec)
    assert "tpu_custom_call" in lowered.as_text()
    cpu = make_train_step("data.seq_len=128", "model.max_seq_len=128")
    specs = lambda t: [s.spec for s in nnx.to_flat_state(t.state_shardings).leaves]  # noqa: E731
    assert specs(train_step) == specs(cpu)
    assert train_step.batch_sharding.spec == cpu.batch_sharding.spec


BAD = {
    "unknown accelerator": (["--topology", "v5p-65"], "'v5p-65' does not exist; did you mean 'v5p-64'"),
    "mesh vs chips": (["--topology", "v5e-4", "mesh.model=3"], "mesh: 4 devices do not divide by 3"),
    "mesh vs a 16 x 16 slice": (["--topology", "v6e-256", "mesh.data=-1", "mesh.model=3"], "256 devices do not divide by 3"),
    "splash blocks": (["--topology", "v5e-4", "model.attention=splash", "data.seq_len=96"], "a multiple of 128"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2_with_one_line(args, message, capsys):
    assert cli.main(["plan", SMOKE, *PLAN, *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_jax_that_cannot_read_libtpus_programs_exits_2_before_compiling(monkeypatch, capsys):
    """jax 0.10 with libtpu 0.0.52 fails on some programs (a RET_CHECK reading back their HLO): plan
    refuses it in one line that says what to install, before building anything."""
    monkeypatch.setattr(jax, "__version__", "0.10.2")
    monkeypatch.setattr(build, "build", lambda *a, **k: pytest.fail("built under a jax that cannot read the program"))
    assert cli.main(["plan", SMOKE, *PLAN, "--topology", "v5e-4"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()] and "needs jax 0.12" in err and "make tpu-venv" in err, err


def test_topology_devices_match_the_table():
    """Each kind's topology string gives its chip count of devices, whose kind the table knows."""
    for name, slices, chips in (("v5p-64", 1, 32), ("v5e-16", 1, 16), ("v5e-8", 1, 8), ("v6e-4", 2, 8), ("v4-8", 1, 4)):
        slice_ = kinds.parse(name)
        devices = topology_devices(slice_, slices)
        assert len(devices) == chips == slice_.chips * slices
        assert kinds.peak_flops(devices[0].device_kind) == slice_.kind.peak_bf16_flops, devices[0].device_kind


def test_slices_of_whole_cubes_and_pod_sides_have_wraparound():
    """As Cloud builds them (and MaxText's table has them): v4/v5p slices of whole 4x4x4 cubes close
    all three dimensions into rings, v5e/v6e a side of 16 chips."""
    wraps = {name: kinds.parse(name).wrap for name in ("v5p-64", "v5p-128", "v4-512", "v6e-64", "v6e-128", "v5e-256")}
    assert wraps == {"v5p-64": (False,) * 3, "v5p-128": (True,) * 3, "v4-512": (True,) * 3,
                     "v6e-64": (False,) * 3, "v6e-128": (False, True, False), "v5e-256": (True, True, False)}


def test_fsdp_gathers_on_a_wrapped_torus_are_all_gathers(capsys):
    """On a v5p-128 (4x4x4 with wraparound) FSDP over all 64 chips gathers each layer's weights with
    all-gathers. Compiled without the wraparound links, XLA:TPU turns every gather into an
    all-reduce of the whole weight, twice the bytes on the wire."""
    widths = ["model.embed_dim=128", "model.mlp_dim=256", "model.vocab_size=512", "mesh.model=1",
              "train.global_batch=64"]
    rc, r, _ = run_plan(capsys, "v5p-128", *widths)
    assert rc == 0 and r["mesh"] == {"replica": 1, "data": 64, "model": 1}
    m = config_lib.load(SMOKE, PLAN + widths).model
    layer = m.embed_dim * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 3 * m.embed_dim * m.mlp_dim
    assert r["collective_bytes"]["ici"]["all-gather"] >= m.num_layers * layer * 2  # bf16, at least once


def test_the_embedding_table_is_never_gathered_or_reduced_whole(monkeypatch, capsys):
    """FSDP over 4 chips: each chip looks up its slice of `embed` for all tokens, and all-to-alls move
    the rows (and their gradient back). No collective gathers the [vocab, embed] table or sums its
    gradient whole, which MaxText's program does not do either."""
    texts, matmul_flops = [], plan.hlo.matmul_flops
    monkeypatch.setattr(plan.hlo, "matmul_flops", lambda text: texts.append(text) or matmul_flops(text))
    rc, r, _ = run_plan(capsys, "v5e-4", "mesh.model=1")
    assert rc == 0 and r["mesh"]["data"] == 4 and r["collective_bytes"]["ici"]["all-to-all"] > 0
    m = config_lib.load(SMOKE, PLAN).model
    table = rf"\[{m.vocab_size},{m.embed_dim}\]"
    whole = re.findall(rf"= \(?\w+{table}\S* (?:all-gather|all-reduce|reduce-scatter)(?:-start)?\(", texts[0])
    assert not whole, whole
    shard = rf"\[{m.vocab_size},{m.embed_dim // 4}\]"
    assert re.search(rf"\w+{shard}\S* parameter\(", texts[0])  # shapes written as the patterns expect


def test_several_slices_split_the_data_axis():
    """Over 2 slices, `replica` has one position per slice: `data` and `model` stay within a slice."""
    devices = topology_devices(kinds.parse("v5e-4"), 2)
    mesh = sharding.make_mesh((4, 2), devices)
    assert dict(mesh.shape) == {"replica": 2, "data": 2, "model": 2}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[0] == slice_of[0, 0, 0]).all() and (slice_of[1] != slice_of[0, 0, 0]).all()
    with pytest.raises(config_lib.ConfigError, match="multiple of the 2 slices"):
        sharding.make_mesh((1, 8), devices)


def test_plan_reports_each_hosts_rows(capsys):
    rc, r, _ = run_plan(capsys, "v5e-16", "mesh.model=1", "train.global_batch=64")
    assert rc == 0 and r["hosts"] == 4 and r["rows_per_host"] == [16] * 4
    assert r["host0_rows"] == "0-7, 24-27, 60-63"  # the torus order: 0-63, 192-223, 480-511 of 512 rows
    # A checkpoint: each host writes its 4 chips' shards, and the host of the first chip the
    # replicated norm scales (and step counters) too; in the local tier every host writes those.
    cfg = config_lib.load(SMOKE, PLAN + ["mesh.data=16", "mesh.model=1", "train.global_batch=64"])
    hand = 4 * (hand_count(cfg) - norm_bytes(cfg)) + norm_bytes(cfg)
    assert 0 <= r["checkpoint_gib_per_host"] * 2**30 - hand <= 32
    train_step = build.build(cfg, topology_devices(kinds.parse("v5e-16"), 1))
    persistent, local = (plan.checkpoint_bytes_per_host(train_step, local) for local in (False, True))
    assert persistent[0] > persistent[1] == persistent[2] == persistent[3] and local == [persistent[0]] * 4


def test_plan_never_joins_a_cluster(monkeypatch, capsys):
    """On a TPU VM worker JAX's cluster detection finds the pod; plan must not start jax.distributed."""
    monkeypatch.setattr(runtime, "_detected_cluster", lambda timeout_s: ("10.0.0.1:8476", 2, 1))  # worker 1 of 2
    monkeypatch.setattr(runtime, "_wait_for_coordinator", lambda *a: pytest.fail("plan waited for a coordinator"))
    monkeypatch.setattr("jax.distributed.initialize", lambda *a, **k: pytest.fail("plan started jax.distributed"))
    rc, r, _ = run_plan(capsys, "v5e-4", "mesh.model=4")
    assert rc == 0 and r["fits"]


@pytest.mark.parametrize("microbatches", [1, 4])
def test_two_slices_send_only_the_gradient_reduction_over_dcn(microbatches, capsys):
    """The 8b preset (2 of its layers) on 2 slices of v5p-64: within a slice FSDP and tensor parallelism
    over ICI; between slices only the all-reduce of each chip's gradient shard, once per step however
    many microbatches. Its bytes are the parameters a chip holds (params / 32) in the compute dtype,
    bfloat16: the layers' weights and the embedding come out of the backward pass in it, the loss
    reduces the output layer's gradient in it, and the slices' sums of microbatches cross in it."""
    eight_b = config_lib.preset_path("llm", "8b")
    small = ["model.num_layers=2", "data.seq_len=256", f"train.global_batch={32 * microbatches}",
             f"train.microbatches={microbatches}"]
    rc = cli.main(["plan", str(eight_b), "--topology", "v5p-64", "--slices", "2", "--json", *small])
    r = json.loads(capsys.readouterr().out)
    assert rc == 0 and r["mesh"] == {"replica": 2, "data": 16, "model": 2} and r["hosts"] == 16
    dcn = r["collective_bytes"]["dcn"]
    assert {k for k, b in dcn.items() if b} == {"all-reduce"}  # no parameter is gathered over DCN
    m = config_lib.load(eight_b, small).model
    layer = m.embed_dim * (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim + 3 * m.embed_dim * m.mlp_dim
    vocab = m.vocab_size * m.embed_dim  # the embedding's size, and the output layer's (not tied)
    expected = 2 * (m.num_layers * layer + 2 * vocab) / 32
    assert expected <= dcn["all-reduce"] <= expected + 2**20, (dcn["all-reduce"], expected)  # + norms and metrics
    assert r["ici_bytes_per_step"] > 10 * r["dcn_bytes_per_step"]


def test_the_8b_presets_microbatched_layout_compiles(tmp_path, capsys):
    """The 8b preset's layout (mesh 16 x 2 with the residual split along its width on a v5p-64, microbatches, splash)
    at small widths. The loss reduce-scatters the output layer's gradient in bfloat16 inside the
    microbatch loop: without its optimization barrier, XLA:TPU stops this compile with a RET_CHECK. Its
    header, as if planned under another compiler, gets a note."""
    small = ["model.num_layers=2", "model.embed_dim=256", "model.num_heads=8", "model.num_kv_heads=4", "model.head_dim=32",
             "model.mlp_dim=512", "model.vocab_size=1024", "data.seq_len=512", "train.global_batch=64", "train.microbatches=2"]
    preset = tmp_path / "8b.yaml"
    preset.write_text(config_lib.preset_path("llm", "8b").read_text().replace(
        f"libtpu {importlib.metadata.version('libtpu')}", "libtpu 0.0.1"))
    rc = cli.main(["plan", str(preset), "--topology", "v5p-64", "--json", *small])
    out, err = capsys.readouterr()
    r = json.loads(out)
    assert rc == 0 and r["mesh"] == {"replica": 1, "data": 16, "model": 2} and r["fits"]
    assert err.strip() == plan.compiler_note(str(preset)) and "planned with libtpu 0.0.1" in err


def test_plan_says_when_the_header_was_planned_with_another_compiler(tmp_path, capsys):
    text = config_lib.preset_path("llm", "8b").read_text()
    installed = importlib.metadata.version("libtpu")
    assert f"libtpu {installed}" in text
    other = tmp_path / "8b.yaml"
    other.write_text(text.replace(f"libtpu {installed}", "libtpu 0.0.1"))
    assert plan.planned_with(str(other)) == "0.0.1" and plan.planned_with(SMOKE) is None
    assert plan.compiler_note(str(config_lib.preset_path("llm", "8b"))) is None and plan.compiler_note(SMOKE) is None
    planned = [("llm", "1b"), ("llm", "8b"), ("llm", "70b"), ("diffusion", "64x64"), ("diffusion", "256x256"),
               ("diffusion", "sd2-base")]
    assert {plan.planned_with(str(config_lib.preset_path(*p))) for p in planned} == {installed}  # one compiler
    assert plan.compiler_note(str(other)) == (f"note: {other}'s header was planned with libtpu 0.0.1; this plan compiled "
                                              f"with libtpu {installed}, so its memory and step figures may differ "
                                              "from the header's")


def test_the_compiler_named_is_the_library_jax_loads(monkeypatch):
    """A TPU_LIBRARY_PATH to another libtpu (a parent process's, say) is what JAX loads: the plan
    names it rather than the installed package's version."""
    assert plan.compiler() == f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}"
    monkeypatch.setenv("TPU_LIBRARY_PATH", "/elsewhere/libtpu.so")
    assert plan.compiler() == f"jax {jax.__version__}, libtpu from TPU_LIBRARY_PATH=/elsewhere/libtpu.so"


def built_batch_sharding(topology: str):
    mesh = sharding.make_mesh((16, 1), topology_devices(kinds.parse(topology)))
    return NamedSharding(mesh, sharding.logical_spec(("batch",), sharding.LOGICAL_RULES)), 64


def test_a_row_no_host_would_read_fails_the_plan_with_one_line(monkeypatch, capsys):
    rows_by_process = sharding.rows_by_process
    monkeypatch.setattr(sharding, "rows_by_process", lambda *a: {p: r[1:] for p, r in rows_by_process(*a).items()})
    assert cli.main(["plan", SMOKE, *PLAN, "--topology", "v5e-16", "mesh.model=1", "train.global_batch=64"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    first_rows = sharding.blocks(sorted(r[0] for r in rows_by_process(*built_batch_sharding("v5e-16")).values()))
    assert err == [f"error: a host of v5e-16 would not start: rows {first_rows} of the global batch are held by no host"]


def test_custom_remat_recomputes_attention_and_the_projections_it_does_not_keep():
    m = tiny_config("model.remat=custom").model  # nothing kept: full remat's work
    assert lm.recomputed(m) == lm.RECOMPUTED["full"]
    e, h, k, d, f = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim
    layer = e * (h + 2 * k) * d + h * d * e + 3 * e * f  # multiply-adds per token of the layer's projections
    only_mlp_out = dataclasses.replace(m, remat_custom=CustomRemat(layer_input="offload", qkv="device", out_proj="device",
                                                                  mlp_in="offload"))
    assert lm.recomputed(only_mlp_out) == (pytest.approx(f * e / layer), 1)


def test_a_split_residual_keeps_a_share_of_the_saved_layer_inputs(capsys):
    """On a v5e-8 with mesh 2 x 4 and full remat, the layer inputs saved for the backward pass are most
    of the temporaries: with mesh.residual_split each chip keeps a quarter of them (of their positions,
    or of their width), and the output projections' sums leave the layer scattered, gathered again
    before the next matmul."""
    long = ["data.seq_len=1024", "model.max_seq_len=1024", "model.num_layers=16", "model.embed_dim=512",
            "train.global_batch=16", "mesh.data=2", "mesh.model=4"]
    _, whole, _ = run_plan(capsys, "v5e-8", *long)
    gathered = lambda r: r["collective_bytes"]["ici"]["all-gather"]  # noqa: E731
    for split in ("length", "embed"):
        _, r, _ = run_plan(capsys, "v5e-8", *long, f"mesh.residual_split={split}")
        assert r["temporaries_gib"] < 0.6 * whole["temporaries_gib"], (split, r["temporaries_gib"],
                                                                       whole["temporaries_gib"])
        assert gathered(r) > gathered(whole), split
        assert r["matmul_flops_per_chip"] == whole["matmul_flops_per_chip"], split


def test_mesh_sweep_plans_every_mesh_and_ranks_them_by_the_forecast(capsys):
    """On a v5e-4: every data x model of the 4 chips whose model axis divides the 4 query heads. A
    mesh the config rules out (4 x 1: 4 rows do not split into 2 microbatches over 4 data positions)
    is skipped with its reason, and the sweep goes on; the table puts the fastest forecast first."""
    rc = cli.main(["plan", SMOKE, "--topology", "v5e-4", "--json", "--mesh-sweep", *PLAN, "train.global_batch=4",
                   "train.microbatches=2"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rc == 0
    assert [(r["label"], r["mesh"]["data"], r["mesh"]["model"]) for r in rows] == [("2 x 2", 2, 2), ("1 x 4", 1, 4)]
    assert err.strip() == "skipped 4 x 1: " + err.strip().split(": ", 1)[1] and "train.global_batch=4" in err
    table = plan.report(rows, "mesh").splitlines()
    # The figures move with the compiler: the table names it.
    assert re.search(r"compiled by jax \d+\.\d+\.\d+\S*, libtpu \d+\.\d+\.\d+", table[0]), table[0]
    ranked = sorted(rows, key=lambda r: r["est_step_s"])
    assert [line.split("  ")[0].strip() for line in table[2:]] == [r["label"] for r in ranked]


@pytest.mark.parametrize("text", [[], ["model.num_classes=0", "model.cross_attention_dim=32", "model.context_length=8"]],
                         ids=["pixels", "text"])
def test_a_diffusion_config_plans_and_its_flop_count_matches_the_compiled_program(capsys, text):
    """The UNet under remat=full, class- or text-conditioned: the FLOPs the plan says the chips
    execute (XLA's count of one image's gradient, recomputation included, times the batch) against
    the dots and convolutions of the compiled TPU program, counted in its text. Remat recomputes only
    what the backward pass needs: about half of each block's forward work here, not all of it."""
    assert cli.main(["plan", SMOKE.replace("llm", "diffusion"), "--topology", "v5e-8", "--json", "model.remat=full",
                     *text]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] and r["unit"] == "images" and r["images_per_s"] > 0 and "mfu_causal" not in r
    assert r["matmul_flops_per_chip"] * r["chips"] == pytest.approx(r["executed_flops_per_step"], rel=0.05)
    assert r["flops_per_step"] < r["executed_flops_per_step"] < 4 / 3 * r["flops_per_step"]
