"""Timings on an idle machine only. On these 2 cores a 1-minute load above 0.5 means other programs
share the cores, and a timing (or a ratio of two) then measures the load, not the programs.

`check` refuses to start on a busy machine; `others` measures, over one timed turn, the cores that
programs other than the timed one used (the whole machine's CPU time from /proc/stat minus the
timed process's own), so that a benchmark can take a turn again that something else disturbed.
"""

import os
import sys

IDLE_LOAD = 0.5  # cores


def add_flag(parser):
    parser.add_argument("--any-load", action="store_true", help="time even on a busy machine (the figures then measure the load)")


def check(any_load: bool) -> float:
    """The 1-minute load, printed; exits 2 above IDLE_LOAD unless `any_load`."""
    load = os.getloadavg()[0]
    print(f"1-minute load before: {load:.2f}", flush=True)
    if load > IDLE_LOAD and not any_load:
        print(f"error: the machine is busy (1-minute load {load:.2f} > {IDLE_LOAD}); a timing now measures the load. "
              "Wait, or pass --any-load", file=sys.stderr)
        sys.exit(2)
    return load


def busy_seconds() -> float:
    """CPU seconds every program on the machine has spent since boot (all but idle and iowait)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def others(busy_before: float, own_cpu_s: float, wall_s: float) -> float:
    """Cores used by other programs during a turn of `wall_s` seconds in which the timed process
    spent `own_cpu_s` CPU seconds, from busy_seconds() taken at the turn's start."""
    return max(0.0, busy_seconds() - busy_before - own_cpu_s) / max(wall_s, 1e-9)
