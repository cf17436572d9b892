"""Train-step throughput on the present devices, with synthetic batches (no input pipeline).

    python benchmarks/train_throughput.py configs/llm/125m.yaml [key=value ...] [--steps N] [--variants]
    python benchmarks/train_throughput.py configs/llm/smoke.yaml runtime.fake_cpu_devices=8 --depths 2,32
    python benchmarks/train_throughput.py configs/diffusion/smoke.yaml runtime.fake_cpu_devices=8

Prints the CPU it ran on (model and bfloat16 units), compile time, steady-state step time and the
process's CPU seconds per step, tokens/s (or images/s), MFU and the compiled step's peak memory per
device; --variants repeats it for remat none/full (and, for the
language model, scan on/off); --depths for each number of layers, then how compile time grows
with depth (with scanned layers it should hardly grow). "host ms" is the host's work per step
on the next batch (take it from the input, place it on the devices), which pretrain.train.loop.fit does
while the step runs: it costs nothing as long as it stays below the step time.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import idle  # noqa: E402
import jax  # noqa: E402

from pretrain import cli, config as config_lib  # noqa: E402
from models import layers  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402
from pretrain.metrics import cpu  # noqa: E402
from pretrain.metrics.mfu import total_peak_flops  # noqa: E402


def measure(train_step, steps: int, peak: float) -> dict:
    cfg = train_step.cfg
    compiled, compile_s = train_step.compile()
    memory = compiled.memory_analysis()
    state = train_step.init_state()
    batches = train_step.task.batches("train", train_step.rows)
    batch = train_step.place_batch(next(batches))
    cpu_s = 0.0

    def run() -> tuple[float, float]:
        """Seconds per step, and of it the host's work on the next batch, over `steps` steps
        dispatched back to back as in pretrain.train.loop.fit, synced only at the end."""
        nonlocal state, batch, cpu_s
        start, cpu_start, host = time.perf_counter(), time.process_time(), 0.0
        for _ in range(steps):
            state, metrics = compiled(state, batch)
            host_start = time.perf_counter()
            batch = train_step.place_batch(next(batches))
            host += time.perf_counter() - host_start
        jax.block_until_ready(metrics)
        cpu_s = (time.process_time() - cpu_start) / steps
        return (time.perf_counter() - start) / steps, host / steps

    with train_step.context():
        run()  # warm-up
        step_s, host_s = run()
    peak_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {
        "remat": cfg.model.remat,
        "scan": getattr(cfg.model, "scan_layers", "-"),
        "compile_s": compile_s,
        "step_ms": 1000 * step_s,
        "host_ms": 1000 * host_s,
        "cpu_s": cpu_s,
        "units_per_sec": train_step.task.units_per_step() / step_s,
        "mfu": train_step.task.flops_per_step() / step_s / peak,
        "peak_mem_mib": peak_bytes / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="remat none/full x scan on/off")
    parser.add_argument("--depths", help="comma-separated numbers of layers (language model), e.g. 2,32")
    idle.add_flag(parser)
    args = parser.parse_args()
    idle.check(args.any_load)
    try:
        # Synthetic batches measure the step alone; no persistent cache, so compile times are real.
        cfg = config_lib.load(args.config, [*args.overrides, "data.source=synthetic", "runtime.compilation_cache_dir="])
        variants = [cfg]
        if args.variants:
            scans = [{"scan_layers": s} for s in (True, False)] if cfg.task == "llm" else [{}]
            variants = [
                dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=r, **scan))
                for r in ("none", "full") for scan in scans
            ]
        if args.depths:
            variants = [
                dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=int(d)))
                for d in args.depths.split(",")
            ]
        train_steps = [cli.start(v) for v in variants]  # validates every variant before compiling any
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    multiply = layers.multiply_dtype(cfg.model.dtype).name  # what the steps multiply in, chosen by cli.start
    peak = total_peak_flops(cfg.runtime.peak_flops_per_device, multiply)
    print(f"CPU: {cpu.describe()}; {cfg.model.dtype} model, matmuls multiplied in {multiply}")
    params = sum(x.size for x in jax.tree.leaves(train_steps[0].abstract_state["params"]))
    batch = next(iter(train_steps[0].task.batch_shapes().values()))[0]
    print(
        f"{Path(args.config).name}: {params / 1e6:.1f}M params, batch {' x '.join(map(str, batch))}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, peak {peak / 1e9:.0f} GFLOP/s ({multiply})"
    )
    unit = f"{train_steps[0].task.unit}/s"
    # The process's first compile also pays one-time set-up: keep it out of the table.
    jax.jit(lambda x: x + 1).lower(1.0).compile()
    print(
        f"{'layers':>6} {'remat':>13} {'scan':>5} {'compile s':>9} {'step ms':>9} {'CPU s':>6} {'host ms':>7} {unit:>10} "
        f"{'MFU %':>6} {'peak MiB/dev':>12}"
    )
    results = []
    for train_step in train_steps:
        r = measure(train_step, args.steps, peak)
        results.append(r)
        print(
            f"{getattr(train_step.cfg.model, 'num_layers', '-'):>6} {r['remat']:>13} {str(r['scan']):>5} "
            f"{r['compile_s']:9.1f} {r['step_ms']:9.1f} {r['cpu_s']:6.2f} {r['host_ms']:7.1f} {r['units_per_sec']:10,.0f} "
            f"{100 * r['mfu']:6.2f} {r['peak_mem_mib']:12.1f}"
        )
    if args.depths:
        d = [t.cfg.model.num_layers for t in train_steps]
        ratio = results[-1]["compile_s"] / results[0]["compile_s"]
        print(f"compile time, {d[-1]} layers / {d[0]} layers: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
