"""train.profile_steps: a JAX profiler trace of the configured steps, locally or in a bucket."""

import subprocess
import sys

from pretrain import cli

from conftest import TINY
from test_checkpoint import gs_get, gs_ls
from test_trainer import ROOT, SMOKE

RUN = [*TINY, "run.steps=4", "train.log_every=2", "train.profile_steps=[2,3]"]


def test_profile_steps_write_a_trace_of_the_train_step(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", SMOKE, *RUN, f"run.output_dir={out}"]) == 0
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    assert b"jit_train_step" in traces[0].read_bytes()  # the traced steps ran the compiled train step


def test_a_trace_goes_to_a_gs_output_dir(gcs):
    command = [sys.executable, "-m", "pretrain", "train", SMOKE, *RUN, "run.output_dir=gs://test-bucket/prof"]
    proc = subprocess.run(command, cwd=ROOT, env=gcs, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    traces = [n for n in gs_ls(gcs, "prof/profile/") if n.endswith(".xplane.pb")]
    assert len(traces) == 1, gs_ls(gcs, "prof/")
    assert b"jit_train_step" in gs_get(gcs, traces[0])
