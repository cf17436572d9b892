"""Multi-process runs on this machine (jax.distributed over 127.0.0.1, CPU collectives):
the same losses as one process, saves by the clock, resume across process counts, preemption,
dead and stuck processes, a real Slurm, and the runtime's bad input. TPU slice layouts and the
diffusion model on several processes: test_layouts.py."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from pretrain.run import checkpoint

from conftest import CACHE, REAL_DATA, ROOT, TINY
from test_checkpoint import losses, resumable_copy
from test_trainer import SMOKE

STEPS = 12
LLM = [*TINY, *REAL_DATA, "data.val_fraction=0.2", CACHE, f"run.steps={STEPS}", "train.log_every=1", "train.eval_every=6",
       "checkpoint.every=6", "checkpoint.keep=0"]



def launch(n: int, args, devices: int = 8, **popen):
    """`launch/local.sh n pretrain-args...` with n x (devices / n) faked CPU devices, started."""
    return subprocess.Popen(["bash", str(ROOT / "launch" / "local.sh"), str(n), *args,
                             f"runtime.fake_cpu_devices={devices // n}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_launched(n: int, args, devices: int = 8) -> str:
    proc = launch(n, args, devices)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def eval_losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}


# References run as one process x 8 devices under jax.distributed too: then every run here reduces
# with the same CPU collectives (gloo). JAX's in-process collectives sum in another order, which
# moves the last bit of a loss now and then.
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process x 8 devices, the same mesh (2 x 4) and seed."""
    out = tmp_path_factory.mktemp("one") / "run"
    run_launched(1, ["train", SMOKE, *LLM, f"run.output_dir={out}"])
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Saving by the clock as well (every 0.3 s, by process 0's clock), which changes no loss."""
    out = tmp_path_factory.mktemp("two") / "run"
    printed = run_launched(2, ["train", SMOKE, *LLM, "checkpoint.every_minutes=0.005", f"run.output_dir={out}"])
    return out, printed


def test_two_processes_give_the_losses_of_one_bitwise(reference, two_processes):
    out, printed = two_processes
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS
    assert eval_losses(out) == eval_losses(reference) and len(eval_losses(out)) == 2
    # Only process 0 logs and writes metrics.
    assert "[0] step 12/12" in printed and "[1] step" not in printed


def test_saves_by_the_clock_are_at_the_same_steps_on_every_process(two_processes):
    out, printed = two_processes
    steps = checkpoint.committed_steps(out / "checkpoints")
    assert [s for s in steps if s % 6], f"no save by the clock among {steps}"  # checkpoint.every=6 makes the others
    for s in steps:  # a step is committed once every process wrote its part of it
        assert f"[0] checkpoint {s}: the loop was blocked" in printed
        assert {p.name for p in (out / "checkpoints" / str(s) / "params").glob("ocdbt.process_*")} == {
            "ocdbt.process_0", "ocdbt.process_1"}


@pytest.mark.parametrize("processes", [1, 4])
def test_a_two_process_checkpoint_resumes_on_another_process_count(reference, two_processes, tmp_path, processes):
    out = resumable_copy(two_processes[0], tmp_path, keep_up_to=6)
    assert "resumed from step 6" in run_launched(processes, ["train", SMOKE, *LLM, f"run.output_dir={out}"])
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS


def wait_for(proc, text: str, lines: list) -> None:
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return
    raise AssertionError("".join(lines)[-3000:])


def process_pid(proc, rank: int) -> int:
    """The pid of one rank under launch/local.sh."""
    pids = subprocess.run(["pgrep", "-f", f"runtime.process_id={rank}"], capture_output=True, text=True).stdout.split()
    (pid,) = [int(p) for p in pids if str(proc.pid) in open(f"/proc/{p}/stat").read().split()[3:4]]
    return pid


def test_sigterm_to_one_process_saves_the_same_step_on_all(reference, tmp_path):
    out, lines = tmp_path / "run", []
    proc = launch(2, ["train", SMOKE, *LLM, "checkpoint.every=0", f"run.output_dir={out}"])
    wait_for(proc, "[0] step  3/", lines)
    os.kill(process_pid(proc, 1), signal.SIGTERM)
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    printed = "".join(lines)
    assert proc.returncode == 75, printed[-3000:]
    (saved,) = checkpoint.committed_steps(out / "checkpoints")
    assert 3 <= saved < STEPS and f"preempted: checkpoint {saved} committed" in printed
    assert f"resumed from step {saved}" in run_launched(1, ["train", SMOKE, *LLM, "checkpoint.every=0", f"run.output_dir={out}"])
    assert losses(out) == losses(reference)


def test_the_local_tier_resumes_a_killed_run_and_a_lost_local_directory_falls_back(reference, tmp_path):
    """Local saves every 2 steps between the persistent ones (6, 12), each process into its own
    directory; the run is killed at step 9, after local step 8 and before persistent step 12."""
    out, local, lines = tmp_path / "run", tmp_path / "local", []
    command = ["train", SMOKE, *LLM, f"checkpoint.local_dir={local}", "checkpoint.local_every=2",
               "checkpoint.local_every_minutes=0", "checkpoint.async=false", f"run.output_dir={out}"]
    proc = launch(2, command, start_new_session=True)
    wait_for(proc, "[0] step  9/", lines)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert "[0] local checkpoint 8: the loop was blocked" in "".join(lines)
    assert checkpoint.committed_steps(out / "checkpoints") == [6]
    for name in ("run", "local"):
        shutil.copytree(tmp_path / name, tmp_path / f"killed-{name}")
    assert "resumed from step 8 (local tier)" in run_launched(2, command)
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS
    # The same kill, but one host lost its local directory: the persistent tier resumes.
    for name in ("run", "local"):
        shutil.rmtree(tmp_path / name)
        shutil.copytree(tmp_path / f"killed-{name}", tmp_path / name)
    shutil.rmtree(local / "smoke-llm" / "process_1")
    printed = run_launched(2, command)
    assert "resumed from step 6\n" in printed and "local tier" not in printed
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS


def test_a_killed_process_takes_the_other_down_within_the_heartbeat_timeout(tmp_path):
    lines = []
    proc = launch(2, ["train", SMOKE, *LLM, "run.steps=100000", "runtime.heartbeat_timeout_s=5",
                      f"run.output_dir={tmp_path / 'run'}"])
    wait_for(proc, "[0] step      2/100000", lines)
    os.kill(process_pid(proc, 1), signal.SIGKILL)
    killed = time.monotonic()
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - killed < 5 + 30, "".join(lines)[-3000:]


# The training loop stalls for good before step 4: a hung read, say. The watchdog must end it.
STALL = """
import sys, time
from pretrain import cli; from pretrain.train import step
place = step.TrainStep.place_batch
calls = []
def stalling(self, batch):
    calls.append(1)
    if len(calls) == 4:
        time.sleep(3600)
    return place(self, batch)
step.TrainStep.place_batch = stalling
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_stuck_step_ends_the_run_with_exit_code_3(tmp_path):
    args = ["train", SMOKE, *LLM, "runtime.fake_cpu_devices=8", "runtime.step_timeout_s=3", f"run.output_dir={tmp_path}"]
    proc = subprocess.run([sys.executable, "-c", STALL, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: step 4 did not finish within runtime.step_timeout_s=3 s" in proc.stderr
    # Every thread's stack follows, the stalled main thread's among them.
    stacks = proc.stderr.split("where every thread was:", 1)[1]
    assert stacks.count("(most recent call first)") >= 2 and "line 9 in stalling" in stacks, stacks  # the sleep in STALL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BAD = {
    "no coordinator": (["runtime.distributed=explicit", "runtime.coordinator=127.0.0.1:{port}", "runtime.num_processes=2",
                        "runtime.process_id=1", "runtime.init_timeout_s=2"],
                       "the coordinator 127.0.0.1:{port} was not reached within runtime.init_timeout_s=2"),
    "no cluster": (["runtime.num_processes=2"], "runtime.num_processes=2, but no cluster was detected"),
    "unknown mode": (["runtime.distributed=mpi"], "runtime.distributed='mpi' is unknown"),
    "slice vs processes": (["runtime.fake_topology=v5p-64"],
                           r"the slice has 8 hosts x 4 chips, but this run has 1 processes x 8 devices; launch 8 processes"),
    "topology without faked devices": (["runtime.fake_topology=v5e-16", "runtime.fake_cpu_devices=0"],
                                       "runtime.fake_topology=v5e-16 lays out faked CPU devices"),
    "unknown topology": (["runtime.fake_topology=v5p-63"], "runtime.fake_topology: accelerator type 'v5p-63' does not exist"),
    "rank out of range": (["runtime.distributed=explicit", "runtime.coordinator=h:1", "runtime.num_processes=2",
                           "runtime.process_id=2"], r"runtime.process_id=2 must be in \[0, runtime.num_processes=2\)"),
}


@pytest.mark.parametrize("overrides, message", BAD.values(), ids=BAD.keys())
def test_bad_runtime_input_exits_2_with_one_line_before_writing(tmp_path, overrides, message):
    port = free_port()
    overrides = [o.format(port=port) for o in overrides]
    # A fresh process: jax.distributed must start before JAX's backends, which the test session has up.
    proc = subprocess.run([sys.executable, "-m", "pretrain", "train", SMOKE, *TINY, *overrides,
                           f"run.output_dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and re.search(message.format(port=port), err[0]), proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real single-node Slurm (slurmctld, slurmd, munged) in a temporary directory, installed from
    the system packages if missing; yields the environment that points sbatch at it."""
    if shutil.which("slurmctld") is None:
        subprocess.run("apt-get update -qq && apt-get install -y -qq slurmctld slurmd slurm-client munge", shell=True,
                       check=True, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), capture_output=True)
    tmp = tmp_path_factory.mktemp("slurm")
    (tmp / "spool").mkdir()
    conf = tmp / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=test", "SlurmctldHost=localhost", "SlurmUser=root", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "MpiDefault=none",
        f"StateSaveLocation={tmp}/state", f"SlurmdSpoolDir={tmp}/spool", f"SlurmctldPidFile={tmp}/slurmctld.pid",
        f"SlurmdPidFile={tmp}/slurmd.pid", f"SlurmctldLogFile={tmp}/slurmctld.log", f"SlurmdLogFile={tmp}/slurmd.log",
        "SlurmdParameters=config_overrides",  # 4 task slots on however few cores
        # A requeued job waits cred_expire (default 120 s), then the next scheduling pass (60 s).
        "AuthInfo=cred_expire=5", "SchedulerParameters=sched_interval=1",
        "NodeName=localhost CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=1000",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", "",
    ]))
    started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0
    if started_munge:
        subprocess.run("mkdir -p /run/munge && chown munge /run/munge && runuser -u munge -- munged", shell=True, check=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf), "-N", "localhost"], check=True)
    env = dict(os.environ, SLURM_CONF=str(conf), PYTHON=sys.executable)
    for _ in range(100):
        state = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip()
        if state == "idle":
            break
        time.sleep(0.2)
    yield env
    for daemon in ("slurmd", "slurmctld"):
        os.kill(int((tmp / f"{daemon}.pid").read_text()), signal.SIGTERM)
    if started_munge:
        subprocess.run(["pkill", "-x", "munged"])


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def sbatch(args, env, cwd, timeout_s: float) -> tuple[int, str]:
    """(the job's exit code, its id): `sbatch --wait` without its back-off, which notices a job's end
    at 2, 10, 42 s, ... after submission; scontrol is asked every 0.2 s instead."""
    job = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True).stdout.strip().split(";")[0]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        shown = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
        fields = dict(f.split("=", 1) for f in shown.split() if "=" in f)
        if fields.get("JobState") in ENDED:
            return int(fields["ExitCode"].split(":")[0]), job
        time.sleep(0.2)
    raise TimeoutError(f"slurm job {job} still running after {timeout_s} s")


def test_slurm_sbatch_with_jax_detection_gives_the_losses_of_one_process(slurm, reference, tmp_path):
    out = tmp_path / "run"
    rc, _ = sbatch(["-n", "2", f"--output={tmp_path}/slurm-%j.out", str(ROOT / "launch" / "slurm.sbatch"), "train",
                    SMOKE, *LLM, "runtime.fake_cpu_devices=4", f"run.output_dir={out}"], slurm, tmp_path, 600)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert rc == 0, log[-3000:]
    assert log.count(f"step {STEPS}/{STEPS} | loss") == 1, log[-3000:]  # two processes, one of which logs
    assert losses(out) == losses(reference) and len(losses(out)) == STEPS


STAND_IN_PYTHON = """#!/bin/bash
# python -c (the script's port probe) is the real one; python -m pretrain exits with the next code
[ "$1" = -c ] && exec {python} "$@"
n=$(cat {dir}/started 2>/dev/null | wc -l)
echo "$*" >> {dir}/started
exit $(sed -n "$((n + 1))p" {dir}/codes)
"""


@pytest.mark.parametrize("codes, retries, rc", [
    (["75", "3", "134", "0"], 3, 0),  # preempted, stuck, crashed: requeued each time, then finished
    (["2"], 3, 2),  # bad input: no retry helps
    (["4"], 3, 4),  # steps no longer finite: a retry would diverge again
    (["75", "75"], 1, 75),  # no retries left
])
def test_slurm_sbatch_requeues_on_the_trainers_exit_code(slurm, tmp_path, codes, retries, rc):
    python = tmp_path / "python"
    python.write_text(STAND_IN_PYTHON.format(python=sys.executable, dir=tmp_path))
    python.chmod(0o755)
    (tmp_path / "codes").write_text("\n".join(codes) + "\n")
    env = dict(slurm, PYTHON=str(python), RETRIES=str(retries))
    code, job = sbatch(["-n", "1", f"--output={tmp_path}/slurm-%j.out", str(ROOT / "launch" / "slurm.sbatch"), "train",
                        SMOKE], env, tmp_path, 300)
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert code == rc, log
    started = (tmp_path / "started").read_text().splitlines()
    assert len(started) == min(len(codes), retries + 1), log
    # Every start of the job is the same launch: a retry resumes what overwrite=true began.
    (launch_id,) = {s.split("run.launch_id=")[1] for s in started}
    assert launch_id == f"slurm-{job}"
