"""train.profile_steps: a JAX profiler trace of the configured steps (in a bucket: test_checkpoint.py)."""

from pretrain import cli

from conftest import TINY
from test_trainer import SMOKE

RUN = [*TINY, "run.steps=4", "train.log_every=2", "train.profile_steps=[2,3]"]


def test_profile_steps_write_a_trace_of_the_train_step(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", SMOKE, *RUN, f"run.output_dir={out}"]) == 0
    traces = list((out / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1, traces
    assert b"jit_train_step" in traces[0].read_bytes()  # the traced steps ran the compiled train step
