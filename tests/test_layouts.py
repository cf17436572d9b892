"""Other process layouts give the losses of one process: TPU slices rehearsed on CPU processes
(each mesh position on the process that owns that chip on the slice), resumed on other process
counts, and the diffusion model on two processes."""

import pytest

from conftest import CACHE, REAL_DATA, ROOT, TINY
from test_checkpoint import losses, resumable_copy
from test_multihost import eval_losses, run_launched
from test_trainer import SMOKE

DIFFUSION_SMOKE = str(ROOT / "configs" / "diffusion" / "smoke.yaml")
# A one-level UNet: the processes, not the architecture, are the point, and it compiles in a third less.
DIFFUSION = ["data.source=digits", CACHE, "run.steps=6", "train.log_every=1", "train.eval_every=0", "train.global_batch=8",
             "model.base_channels=8", "model.groups=4", "model.num_heads=2", "model.channel_mults=[1]",
             "model.attention_resolutions=[16]", "diffusion.sample_num=8", "diffusion.sample_steps=2"]


# A TPU slice's layout rehearsed on CPU processes: v5p-64 is 8 hosts x 4 chips, mesh 8 x 4, and each
# host's chips hold two blocks of rows (FACTS: 0-63 and 256-319 of 512).
SLICE_RUN = [*TINY, *REAL_DATA, "data.val_fraction=0.2", CACHE, "run.steps=6", "train.log_every=1", "train.global_batch=64",
             "checkpoint.every=3", "checkpoint.keep=0", "runtime.init_timeout_s=300"]
V5P_64 = [*SLICE_RUN, "mesh.data=8", "mesh.model=4"]


@pytest.fixture(scope="module")
def v5p_64(tmp_path_factory):
    """8 processes x 4 devices, each mesh position on the process that owns that chip on a v5p-64."""
    out = tmp_path_factory.mktemp("v5p") / "run"
    printed = run_launched(8, ["train", SMOKE, *V5P_64, "runtime.fake_topology=v5p-64", f"run.output_dir={out}"], 32)
    return out, printed


def test_a_v5p_64_layout_on_8_processes_gives_the_losses_of_one(v5p_64, tmp_path):
    out, printed = v5p_64
    assert "[0] data: 8 processes read 16 of the 64 rows each (process 0: rows 0-7, 32-39)" in printed
    run_launched(1, ["train", SMOKE, *V5P_64, f"run.output_dir={tmp_path}"], 32)
    assert losses(out) == losses(tmp_path) and len(losses(out)) == 6
    assert eval_losses(out) == eval_losses(tmp_path) and len(eval_losses(out)) == 1


@pytest.mark.parametrize("processes", [2, 1])
def test_a_v5p_64_layout_resumes_on_other_process_counts(v5p_64, tmp_path, processes):
    out = resumable_copy(v5p_64[0], tmp_path, keep_up_to=3)
    assert "resumed from step 3" in run_launched(processes, ["train", SMOKE, *V5P_64, f"run.output_dir={out}"], 32)
    assert losses(out) == losses(v5p_64[0]) and len(losses(out)) == 6


def test_a_v5e_16_layout_on_4_processes_gives_the_losses_of_one(tmp_path):
    """v5e-16: 4 hosts x 4 chips, mesh 16 x 1; host 0 holds three blocks of rows."""
    v5e_16 = [*SLICE_RUN, "mesh.data=16", "mesh.model=1"]
    printed = run_launched(4, ["train", SMOKE, *v5e_16, "runtime.fake_topology=v5e-16", f"run.output_dir={tmp_path / 'four'}"], 16)
    assert "(process 0: rows 0-7, 24-27, 60-63)" in printed
    run_launched(1, ["train", SMOKE, *v5e_16, f"run.output_dir={tmp_path / 'one'}"], 16)
    assert losses(tmp_path / "four") == losses(tmp_path / "one") and len(losses(tmp_path / "one")) == 6


def test_diffusion_on_two_processes_equals_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_launched(1, ["train", DIFFUSION_SMOKE, *DIFFUSION, f"run.output_dir={one}"])
    run_launched(2, ["train", DIFFUSION_SMOKE, *DIFFUSION, f"run.output_dir={two}"])
    assert losses(two) == losses(one) and len(losses(one)) == 6
