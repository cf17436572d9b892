"""Train-step throughput on the present devices, with synthetic batches (no input pipeline).

    python benchmarks/train_throughput.py configs/llm/125m.yaml [key=value ...] [--steps N] [--variants]
    python benchmarks/train_throughput.py configs/diffusion/smoke.yaml runtime.fake_cpu_devices=8

Prints compile time, steady-state step time, tokens/s (or images/s), MFU and the compiled
step's peak memory per device; --variants repeats it for remat none/full (and, for the
language model, scan on/off).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from pretrain import cli, config as config_lib  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402
from pretrain.metrics import total_peak_flops  # noqa: E402


def measure(trainer, steps: int, peak: float) -> dict:
    cfg = trainer.cfg
    compiled, compile_s = trainer.compile()
    memory = compiled.memory_analysis()
    state = trainer.init_state()
    batches = trainer.task.batches("train", trainer.rows)
    batch = trainer.place_batch(next(batches))
    with trainer.context():
        for _ in range(2):  # warm-up
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    peak_bytes = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    return {
        "remat": cfg.model.remat,
        "scan": getattr(cfg.model, "scan_layers", "-"),
        "compile_s": compile_s,
        "step_ms": 1000 * step_s,
        "units_per_sec": trainer.task.units_per_step() / step_s,
        "mfu": trainer.task.flops_per_step() / step_s / peak,
        "peak_mem_mib": peak_bytes / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="remat none/full x scan on/off")
    args = parser.parse_args()
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
        trainers = [cli.build(v) for v in variants]  # validates every variant before compiling any
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    peak = total_peak_flops(cfg.runtime.peak_flops_per_device)
    params = sum(x.size for x in jax.tree.leaves(trainers[0].abstract_state[0]))
    batch = next(iter(trainers[0].task.batch_shapes().values()))[0]
    print(
        f"{Path(args.config).name}: {params / 1e6:.1f}M params, batch {' x '.join(map(str, batch))}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, peak {peak / 1e9:.0f} GFLOP/s"
    )
    unit = f"{trainers[0].task.unit}/s"
    print(f"{'remat':>13} {'scan':>5} {'compile s':>9} {'step ms':>9} {unit:>10} {'MFU %':>6} {'peak MiB/dev':>12}")
    for trainer in trainers:
        r = measure(trainer, args.steps, peak)
        print(
            f"{r['remat']:>13} {str(r['scan']):>5} {r['compile_s']:9.1f} {r['step_ms']:9.1f} "
            f"{r['units_per_sec']:10,.0f} {100 * r['mfu']:6.2f} {r['peak_mem_mib']:12.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
