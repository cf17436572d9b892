"""`pretrain prepare text` on one machine, the local driver against the Beam driver's DirectRunner.

    python benchmarks/prepare_throughput.py [--mb 32] [--workers 2] [--runs 2]

Prepares the first --mb MB of the Python standard library's sources (the smoke corpus) with a
tokenizer trained once beforehand, both ways, --runs times each, alternated, and prints the CPU,
each run's wall seconds, tokens per second and tokens per second per worker core, and whether the
two outputs are the same bytes (shards and manifest). The Beam figure includes its start-up (the
worker processes, the pipeline's translation), which a Dataflow job pays once per job, not per file.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import idle  # noqa: E402

from data import corpus, tokenizer  # noqa: E402
from data.prepare import beam, local  # noqa: E402
from pretrain.metrics import cpu  # noqa: E402

SEQ_LEN, VOCAB = 512, 8000


def cpu_seconds() -> float:
    """This process's CPU time and its finished workers' (both drivers wait for theirs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def same_output(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32, help="MB of the standard library's sources")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of each driver")
    parser.add_argument("--runs", type=int, default=2)
    idle.add_flag(parser)
    args = parser.parse_args()
    idle.check(args.any_load)
    print(cpu.describe())
    files = [str(f) for f in corpus.stdlib_files(int(args.mb * 2**20))]
    work = Path(tempfile.mkdtemp(prefix="prepare-throughput-"))
    tok = tokenizer.train(local.sample_texts([Path(f) for f in files], 16 << 20, 0.01), VOCAB)
    tok.write(work)
    print(f"{len(files)} files, {sum(Path(f).stat().st_size for f in files) / 2**20:.1f} MB; seq_len {SEQ_LEN}, "
          f"a {VOCAB}-piece tokenizer; {args.workers} workers each")
    drivers = {
        "local": lambda out: local.prepare_text(files, out, tokenizer=str(work), seq_len=SEQ_LEN, workers=args.workers),
        "beam": lambda out: beam.prepare_text(files, out, [], tokenizer=str(work), seq_len=SEQ_LEN, workers=args.workers),
    }
    print(f"{'driver':<7} {'run':>3} {'wall s':>7} {'CPU s':>7} {'tokens/s':>10} {'per worker':>10}  other programs")
    for run in range(args.runs):
        for name, prepare in drivers.items():
            busy, before, start = idle.busy_seconds(), cpu_seconds(), time.perf_counter()
            manifest = prepare(str(work / f"{name}-{run}"))
            wall, own = time.perf_counter() - start, cpu_seconds() - before
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            print(f"{name:<7} {run:>3} {wall:7.1f} {own:7.1f} {tokens / wall:10,.0f} {tokens / wall / args.workers:10,.0f}  "
                  f"{idle.others(busy, own, wall):.2f} cores", flush=True)
    print(f"same shards and manifest: {same_output(work / 'local-0', work / 'beam-0')} ({work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
