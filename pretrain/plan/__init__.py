"""`pretrain plan`: compile a config's train step for a TPU slice on this machine, and say whether
it fits and how fast it could go, before renting the slice.

libtpu (the `tpu` extra) lets JAX compile for a TPU topology without the hardware. The train step is
built by the same code as `pretrain train` (build.build) over the topology's devices; only the
compile's figures are read, nothing runs. The step time is forecast from the compiled program
(pretrain/plan/forecast.py); the compute roofline beside it is a bound that real steps do not beat.
"""

import concurrent.futures
import dataclasses
import importlib.metadata
import itertools
import math
import multiprocessing
import os
import re
import time

import jax
from etils import epath

from models.layers import REMAT_POLICIES
from pretrain import build
from pretrain.config import ConfigError
from pretrain.config.schema import Config
from pretrain.plan import forecast, hlo
from pretrain.tpu import kinds
from pretrain.tpu.devices import topology_devices
from pretrain.train import sharding

GIB = 2**30


def _state_bytes_per_chip(train_step) -> int:
    """Parameters and optimizer state (and EMA) held by one chip, from their shardings."""
    total = 0
    for leaf in jax.tree.leaves(train_step.abstract_state_with_shardings()):
        total += leaf.dtype.itemsize * math.prod(leaf.sharding.shard_shape(leaf.shape))
    return total


def checkpoint_bytes_per_host(train_step, local: bool = False) -> list[int]:
    """Bytes of the train state each host writes per checkpoint. Persistent: every distinct shard once,
    by the host of its first replica in the mesh's device order (Orbax's replica 0). Local
    (checkpoint.local_dir): every distinct shard a host holds, whoever else holds it too."""
    written = {}
    for leaf in jax.tree.leaves(train_step.abstract_state_with_shardings()):
        indices = leaf.sharding.devices_indices_map(leaf.shape)
        shard_bytes = leaf.dtype.itemsize * math.prod(leaf.sharding.shard_shape(leaf.shape))
        owners = {}
        for device in train_step.mesh.devices.flat:
            shard = tuple((i.start, i.stop) for i in indices[device])
            owners.setdefault((device.process_index, shard) if local else shard, device.process_index)
        for host in owners.values():
            written[host] = written.get(host, 0) + shard_bytes
    return [written.get(host, 0) for host in sorted({d.process_index for d in train_step.mesh.devices.flat})]


def _checkpoint_figures(train_step, kind) -> dict:
    """What each tier writes per host per save and when, and how long a save blocks the loop."""
    c = train_step.cfg.checkpoint
    return {
        "checkpoint_gib_per_host": max(checkpoint_bytes_per_host(train_step)) / GIB,
        "checkpoint_every": {"steps": c.every, "minutes": c.every_minutes},
        "local_checkpoint_gib_per_host": max(checkpoint_bytes_per_host(train_step, local=True)) / GIB,
        "local_checkpoint_every": {"steps": c.local_every, "minutes": c.local_every_minutes} if c.local_dir else None,
        # While each chip copies its state to its host's memory (all at once); the writing goes on behind.
        "save_blocks_s": _state_bytes_per_chip(train_step) / kind.host_bytes_per_s,
    }


class StartupError(Exception):
    """Something that would stop a host of the slice before its first step."""


def host_rows(train_step) -> dict[int, list[int]]:
    """Each host's rows of the global batch on the slice (what its data pipeline reads and where its
    data position lives in a checkpoint), checked as every host's start-up checks them."""
    batch = train_step.cfg.train.global_batch
    rows = sharding.rows_by_process(train_step.batch_sharding, batch)
    missing = sorted(set(range(batch)).difference(*rows.values()))
    if missing:
        raise StartupError(f"rows {sharding.blocks(missing)} of the global batch are held by no host")
    return rows


def _out_of_memory(error: Exception) -> str | None:
    """XLA's one-line out-of-memory figure from a compile error, or None for any other error."""
    lines = str(error).splitlines()
    if not any("RESOURCE_EXHAUSTED" in line for line in lines):
        return None
    return next((line for line in lines if "exceeds" in line), lines[0]).strip()


def planned_with(config_path: str) -> str | None:
    """The libtpu a config's header says its figures were planned with ("... libtpu 0.0.42.1 ..."), if any."""
    header = itertools.takewhile(lambda line: line.startswith("#"), epath.Path(config_path).read_text().splitlines())
    match = re.search(r"libtpu (\d+(?:\.\d+)+)", " ".join(line.lstrip("# ") for line in header))
    return match.group(1) if match else None


def compiler_note(config_path: str) -> str | None:
    """One line when this plan's compiler is not the one the config's header was planned with."""
    planned, current = planned_with(config_path), importlib.metadata.version("libtpu")
    if planned is None or planned == current:
        return None
    return (f"note: {config_path}'s header was planned with libtpu {planned}; this plan compiled with libtpu {current}, "
            "so its memory and step figures may differ from the header's")


def compiler() -> str:
    """The jax and libtpu that compile here: the libtpu package's version, or the library that
    TPU_LIBRARY_PATH names in its place (JAX loads that one, whatever package is installed)."""
    import libtpu

    override = os.environ.get("TPU_LIBRARY_PATH")
    if override and os.path.realpath(override) != os.path.realpath(libtpu.get_library_path()):
        return f"jax {jax.__version__}, libtpu from TPU_LIBRARY_PATH={override}"
    return f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}"


def check_compiler():
    """libtpu 0.0.52 (the `tpu` extra) returns programs whose HLO only jax 0.12's XLA reads back
    (jax 0.10 fails on some collectives with a RET_CHECK), so plan runs under that pair or not at all."""
    if tuple(int(part) for part in jax.__version__.split(".")[:2]) < (0, 12):
        raise ConfigError(f"pretrain plan needs jax 0.12 with libtpu 0.0.52, the `tpu` extra on Python 3.12 (this is "
                          f"jax {jax.__version__}, which cannot read all that libtpu compiles): make tpu-venv, then "
                          ".venv-tpu/bin/pretrain plan ...")


def plan(cfg: Config, accelerator_type: str, num_slices: int = 1) -> dict:
    """Compile cfg's train step for `num_slices` slices of `accelerator_type`; the figures per chip."""
    try:
        slice_ = kinds.parse(accelerator_type)
    except kinds.TpuError as e:
        raise ConfigError(str(e)) from None
    if num_slices < 1:
        raise ConfigError(f"--slices={num_slices} must be at least 1")
    # Built alone (build has no side effects): plan reads no data, and joins no cluster even on a
    # TPU VM worker; it compiles for the topology's devices, not for a slice rehearsed on CPUs.
    cfg = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, fake_topology=""))
    devices = topology_devices(slice_, num_slices)
    train_step = build.build(cfg, devices)
    chips, kind = len(devices), slice_.kind
    rows = host_rows(train_step)
    out = {
        "topology": accelerator_type + (f" x {num_slices}" if num_slices > 1 else ""),
        "chips": chips,
        "mesh": dict(train_step.mesh.shape),
        "hosts": len(rows),
        "rows_per_host": [len(r) for r in rows.values()],
        "host0_rows": sharding.blocks(rows[0]),
        "remat": train_step.cfg.model.remat,
        "attention": getattr(train_step.cfg.model, "attention", None),  # a UNet has one kind
        "unit": train_step.task.unit,
        "hbm_per_chip_gib": kind.hbm_gib,
        "params_and_optimizer_gib": _state_bytes_per_chip(train_step) / GIB,
        **_checkpoint_figures(train_step, kind),
        "flops_per_step": train_step.task.flops_per_step(),
        # XLA's memory and collectives move between releases: a figure is only worth its compiler's name.
        "compiler": compiler(),
    }
    start = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a compile-only client cannot load what it caches
    try:
        compiled, _ = train_step.compile()
    except Exception as e:  # XLA's out-of-memory is a compile error like any other
        oom = _out_of_memory(e)
        if oom is None:
            raise
        return out | {"arguments_gib": None, "temporaries_gib": None, "total_gib": None, "fits": False, "oom": oom,
                      "matmul_flops_per_chip": None, "est_step_s": None, "forecast": None,
                      "compile_s": time.perf_counter() - start}
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    out["compile_s"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
             + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    text = compiled.as_text()
    out |= {"arguments_gib": memory.argument_size_in_bytes / GIB, "temporaries_gib": memory.temp_size_in_bytes / GIB,
            "total_gib": total / GIB, "fits": total <= kind.hbm_gib * GIB,
            # What the chip's matrix units execute, recomputation included (splash's kernel not seen).
            "matmul_flops_per_chip": hlo.matmul_flops(text)}
    out |= traffic(text, train_step.mesh)
    out |= estimate(train_step, text, chips, kind)
    return out


def plan_apart(cfg: Config, accelerator_type: str, num_slices: int = 1) -> dict:
    """plan() in a process of its own. XLA keeps much of a compile's memory (GBs for a big slice)
    from the system after it ends, so a sweep in one process grows by every compile (the 64x64
    preset's mesh sweep reached 23 GB): apart, a sweep never holds more than one compile's."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_plan_on_cpu, cfg, accelerator_type, num_slices).result()


def _plan_on_cpu(cfg: Config, accelerator_type: str, num_slices: int) -> dict:
    jax.config.update("jax_platforms", "cpu")  # as `pretrain plan`: the compile needs no local accelerator
    return plan(cfg, accelerator_type, num_slices)


def traffic(hlo_text: str, mesh) -> dict:
    """Bytes per chip per step that the step's collectives carry within a slice (ICI) and between
    slices (DCN), by kind, from the compiled program's text (loops counted as often as they run)."""
    slices = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]  # by the program's device ids
    counted = hlo.collective_bytes(hlo_text, slices)
    return {"ici_bytes_per_step": sum(counted["ici"].values()), "dcn_bytes_per_step": sum(counted["dcn"].values()),
            "collective_bytes": {"ici": counted["ici"], "dcn": counted["dcn"]}}


def estimate(train_step, hlo_text: str, chips: int, kind: kinds.TpuKind) -> dict:
    """The forecast step time (pretrain/plan/forecast.py), the compute roofline (the step's executed
    FLOPs at the chips' peak: a bound no step beats), and the throughput and MFU the forecast implies,
    from the FLOPs the task counts (its `planned_flops`: the MFU count, what the chips execute with
    recomputation, and what runs inside custom calls the program's text does not show). XLA's cost
    analysis cannot stand in: it counts the bodies of the loops over layers and microbatches once,
    and cannot see into Pallas kernels."""
    task = train_step.task
    counts, peak = task.planned_flops(), chips * kind.peak_bf16_flops
    slices = [getattr(d, "slice_index", 0) or 0 for d in train_step.mesh.devices.flat]
    f = forecast.forecast(hlo_text, slices, kind, counts["hidden"] / chips)
    out = {"executed_flops_per_step": counts["executed"], "roofline_step_s": counts["executed"] / peak,
           "est_step_s": f.step_s, "forecast": dataclasses.asdict(f) | {"bound_by": f.bound_by},
           f"{task.unit}_per_s": task.units_per_step() / f.step_s, "mfu": counts["model"] / f.step_s / peak}
    if "causal" in counts:
        out["mfu_causal"] = counts["causal"] / f.step_s / peak
    return out


# --- what the command prints ---------------------------------------------------------------


def _title(r: dict, with_mesh: bool = True) -> str:
    mesh = f", mesh {sharding.describe(r['mesh'])}" if with_mesh else ""
    return f"{r['topology']} ({r['chips']} chips{mesh})" + (f", attention {r['attention']}" if r["attention"] else "")


def describe(r: dict) -> str:
    """A few lines for one plan."""
    state = f"params+optimizer {r['params_and_optimizer_gib']:.2f} GiB"
    if r["total_gib"] is None:
        memory = f"{state}; does not fit: {r['oom']}"
    else:
        memory = (f"{state} + temporaries {r['temporaries_gib']:.2f} GiB -> {r['total_gib']:.2f} of "
                  f"{r['hbm_per_chip_gib']:.2f} GiB HBM: {'fits' if r['fits'] else 'does NOT fit'}")
    counts = sorted(set(r["rows_per_host"]))
    lines = [f"{_title(r)}, remat {r['remat']}", f"  per chip: {memory}",
             f"  hosts: {r['hosts']}, each reading {' to '.join(map(str, counts))} rows of the global batch "
             f"(host 0: rows {r['host0_rows']})",
             f"  checkpoints: each host writes at most {r['checkpoint_gib_per_host']:.2f} GiB per save to run.output_dir, "
             f"{_cadence(r['checkpoint_every'])}; the local tier {r['local_checkpoint_gib_per_host']:.2f} GiB to its own "
             f"disk, " + (_cadence(r["local_checkpoint_every"]) if r["local_checkpoint_every"] else "off (checkpoint.local_dir)")
             + f"; a save blocks the loop about {r['save_blocks_s']:.2f} s (each chip's state to host memory)",
             f"  FLOPs per step: {r['flops_per_step']:.3e} (the MFU count)"]
    if r["est_step_s"] is not None:
        f = r["forecast"]
        mfu = (f" (6N + attention over the whole sequence, as MaxText counts), {100 * r['mfu_causal']:.1f}% with causal "
               "attention") if "mfu_causal" in r else ""
        lines += [f"  forecast: step {r['est_step_s']:.3f} s, {r[r['unit'] + '_per_s']:,.0f} {r['unit']}/s, "
                  f"MFU {100 * r['mfu']:.1f}%{mfu}",
                  f"    bound by {f['bound_by']}: compute {f['compute_s']:.3f} s (matmul-bound ops {f['matmul_s']:.3f}, "
                  f"HBM-bound {f['memory_s']:.3f}); beside it ICI {f['ici_s']:.3f} s, DCN {f['dcn_s']:.3f} s, "
                  f"host transfers {f['host_s']:.3f} s; synchronous collectives {f['sync_s']:.3f} s",
                  f"  roofline: step {r['roofline_step_s']:.3f} s (the executed FLOPs at peak: a bound)"]
    if r["total_gib"] is not None:
        for link in ("ici", "dcn"):
            kinds = ", ".join(f"{k} {b / 1e9:.2f}" for k, b in r["collective_bytes"][link].items() if b)
            lines.append(f"  {link.upper()} per chip per step: {r[f'{link}_bytes_per_step'] / 1e9:.2f} GB"
                         + (f" ({kinds})" if kinds else ""))
    lines.append(f"  compiled in {r['compile_s']:.1f} s by {r['compiler']}")
    return "\n".join(lines)


def _cadence(every: dict) -> str:
    when = [f"every {every['steps']} steps"] * bool(every["steps"]) + [f"every {every['minutes']:g} minutes"] * bool(every["minutes"])
    return " and ".join(when) or "at the end and on preemption only"


def variants(cfg: Config, accelerator_type: str, num_slices: int, sweep: str | None) -> list[tuple[str, Config]]:
    """(label, config) of each plan to make: cfg alone (sweep None); cfg with each remat policy
    ("remat"); or with each mesh.data x mesh.model of the slices' chips whose `model` divides a
    slice's chips and the query heads ("mesh")."""
    if sweep is None:
        return [(cfg.model.remat, cfg)]
    if sweep == "remat":
        return [(p, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=p))) for p in REMAT_POLICIES]
    try:
        chips = kinds.parse(accelerator_type).chips
    except kinds.TpuError as e:
        raise ConfigError(str(e)) from None
    models = [m for m in range(1, chips + 1) if chips % m == 0 and cfg.model.num_heads % m == 0]
    return [(f"{chips * num_slices // m} x {m}", dataclasses.replace(
        cfg, mesh=dataclasses.replace(cfg.mesh, data=chips * num_slices // m, model=m))) for m in models]


def report(rows: list[dict], swept: str) -> str:
    """One table row per plan (a sweep over `swept`: "remat" or "mesh"), the fastest forecast first."""
    rows = sorted(rows, key=lambda r: (not r["fits"], r["est_step_s"] or 0))
    table = [(swept, "params+opt GiB", "temp GiB", "total GiB", "fits", "step s", "bound by", f"{rows[0]['unit']}/s",
              "MFU", "compile s")]
    for r in rows:
        done = r["total_gib"] is not None
        figures = (f"{r['temporaries_gib']:.2f}", f"{r['total_gib']:.2f}", "yes" if r["fits"] else "no",
                   f"{r['est_step_s']:.3f}", r["forecast"]["bound_by"], f"{r[r['unit'] + '_per_s']:,.0f}",
                   f"{100 * r['mfu']:.1f}%") if done else ("-", "-", "no", "-", "-", "-", "-")
        table.append((r["label"], f"{r['params_and_optimizer_gib']:.2f}", *figures, f"{r['compile_s']:.1f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    title = (f"{_title(rows[0], swept != 'mesh')}, {rows[0]['hbm_per_chip_gib']:.2f} GiB HBM per chip; "
             f"step: the forecast; compiled by {rows[0]['compiler']}")
    return "\n".join([title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table])


def why_not(r: dict) -> str:
    """The one line that says a plan does not fit."""
    if r["total_gib"] is None:
        return f"does not fit on {r['topology']}: {r['oom']}"
    return (f"does not fit on {r['topology']}: {r['total_gib']:.2f} GiB per chip exceeds its "
            f"{r['hbm_per_chip_gib']:.2f} GiB of HBM")
