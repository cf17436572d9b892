"""What both TPU launchers check before anything is created or started: the slice, from the one
table in pretrain/tpu/kinds.py, and the pretrain command, loaded by pretrain's own config code so that a
typo fails here on the laptop and not on 64 VMs. Bad input: one line on stderr, exit code 2.

As a program it prints shell assignments for launch/tpu_vm.sh:

    tpu_args.py ACCELERATOR_TYPE [-- train CONFIG key=value ...]
"""

import secrets
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository; workers run from its copy's root
sys.path.insert(0, str(ROOT))

from pretrain.tpu import kinds as tpu  # noqa: E402


class LaunchError(ValueError):
    """Bad launcher input. Like pretrain's ConfigError and TpuError, a ValueError: the launchers
    report every ValueError as bad input (one line, exit code 2)."""


def new_launch_id() -> str:
    """Names one launch: every retry of it (tpu_vm.sh --retries, a JobSet restart) passes the same."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def pretrain_command(args: list[str], launch_id: str) -> list[str]:
    """`train CONFIG key=value ...` checked, with runtime.distributed=auto and run.launch_id."""
    if len(args) < 2 or args[0] != "train":
        raise LaunchError("the pretrain arguments after -- must be `train CONFIG [key=value ...]`, "
                          "e.g. -- train configs/llm/8b.yaml run.output_dir=gs://BUCKET/runs/8b")
    path = Path(args[1])
    if path.is_absolute() or not (ROOT / path).is_file():
        raise LaunchError(f"config '{args[1]}' is not a file of this repository (give it relative to the "
                          f"repository's root, e.g. configs/llm/8b.yaml): the workers read it from their copy")
    from pretrain import config as config_lib  # imports JAX (a second or two): only when there is a config

    cfg = config_lib.load(ROOT / path, args[2:])
    if not cfg.run.output_dir.startswith("gs://"):
        raise LaunchError(f"run.output_dir={cfg.run.output_dir} would be on each VM's own disk, which every process "
                          "must share and which a preemption deletes; set run.output_dir=gs://BUCKET/PREFIX")
    # Before the overrides, which may change them.
    return [*args[:2], "runtime.distributed=auto", f"run.launch_id={launch_id}", *args[2:]]


def main(argv: list[str]) -> int:
    accelerator_type, *rest = argv or [""]
    try:
        s = tpu.parse(accelerator_type)
        command = pretrain_command(rest[1:], new_launch_id()) if rest[:1] == ["--"] else []
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    facts = dict(chips=s.chips, vms=s.vms, chips_per_vm=s.chips_per_vm, topology=s.topology,
                 runtime_version=s.kind.runtime_version, cloud_type=s.cloud_accelerator_type,
                 pretrain_command=shlex.join(command))
    print("\n".join(f"{k}={shlex.quote(str(v))}" for k, v in facts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
