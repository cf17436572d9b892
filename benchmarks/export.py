"""Export and import cost: time and size of the Hugging Face directory for a config's model.

    python benchmarks/export.py [CONFIG] [key=value ...] [--dtype bfloat16|float32]

Creates the config's parameters (random init, sharded as in training), saves them as a
checkpoint, then times `pretrain export` from it and `pretrain import-hf` back.
"""

import argparse
import resource
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/llm/125m.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="export-bench-"))

    from pretrain import cli, config as config_lib, formats
    from pretrain.formats import params
    from pretrain.run import checkpoint

    overrides = ["runtime.fake_cpu_devices=8", "data.source=synthetic", f"run.output_dir={root / 'run'}", *args.overrides]
    cfg = config_lib.load(args.config, overrides)
    train_step = cli.start(cfg)
    checkpoint.save_params(cfg, [(k, lambda v=v: v) for k, v in params.flat(train_step.init_state()["params"]).items()])
    print(f"{args.config}: {cfg.model.num_params() / 1e6:,.1f}M parameters")

    r = formats.export(str(root / "run"), str(root / "hf"), dtype=args.dtype)
    files = sorted((root / "hf").iterdir())
    on_disk = sum(f.stat().st_size for f in files)
    print(f"export ({args.dtype}): {r['seconds']:.2f} s, {r['bytes'] / 2**20:,.1f} MiB of weights, "
          f"{on_disk / 2**20:,.1f} MiB on disk in {len(files)} files, {r['bytes'] / 2**20 / r['seconds']:,.0f} MiB/s")
    r = formats.import_(str(root / "hf"), str(root / "imported"))
    print(f"import-hf: {r['seconds']:.2f} s")
    print(f"peak resident memory of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:,.2f} GiB")
    shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
