import pytest

from pretrain import config as config_lib
from pretrain.config import ConfigError
from pretrain.config import checks
from pretrain.tasks import TASKS

# The large LM presets on the slices their headers plan them for (v5e-16, v5p-64, v5p-64).
PRESETS = {("llm", "smoke"): 8, ("llm", "125m"): 8, ("llm", "1b"): 16, ("llm", "8b"): 32, ("llm", "70b"): 32,
           ("diffusion", "smoke"): 8, ("diffusion", "smoke-text-to-image"): 8, ("diffusion", "64x64"): 64, ("diffusion", "256x256"): 256,
           ("diffusion", "sd2-base"): 32}


def test_overrides_are_typed():
    cfg = config_lib.load(
        config_lib.preset_path("llm", "smoke"),
        ["run.steps=7", "optim.lr=1e-3", "model.scan_layers=false", "run.name=x", "optim.groups=[{pattern: norm, lr_mult: 2}]"],
    )
    assert cfg.run.steps == 7 and isinstance(cfg.run.steps, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.model.scan_layers is False
    assert cfg.optim.groups[0].pattern == "norm" and cfg.optim.groups[0].lr_mult == 2.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_layer=3", "unknown config key 'model.num_layer'; did you mean 'model.num_layers'?"),
        ("optim.weight_deacy=1", "did you mean 'optim.weight_decay'?"),
        ("run.steps=ten", "config key 'run.steps' wants int, got 'ten'"),
        ("run.steps=1.5", "config key 'run.steps' wants int"),
        ("model.scan_layers=maybe", "config key 'model.scan_layers' wants bool"),
        ("optim.lr=fast", "config key 'optim.lr' wants float"),
        ("steps", "override 'steps' is not key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("[", r"\[")):
        config_lib.load(config_lib.preset_path("llm", "smoke"), [override])


@pytest.mark.parametrize("preset, devices", PRESETS.items(), ids=["/".join(p) for p in PRESETS])
def test_presets_load_and_validate(preset, devices):
    cfg = config_lib.load(config_lib.preset_path(*preset))
    assert cfg.task == preset[0] and type(cfg) is config_lib.CONFIGS[preset[0]]
    data, model = checks.validate(cfg, devices, "tpu")
    assert data * model == devices
    assert TASKS[cfg.task].resolve(cfg, (data, model), "tpu").task == cfg.task
    assert config_lib.from_dict(config_lib.to_dict(cfg)) == cfg  # the JSON stored with a checkpoint reads back


def test_each_task_has_its_own_model_section():
    with pytest.raises(ConfigError, match="unknown config key 'model.num_layers'"):
        config_lib.load(config_lib.preset_path("diffusion", "smoke"), ["model.num_layers=2"])
    # Suggestions come from the task's own schema.
    with pytest.raises(ConfigError, match="did you mean 'model.base_channels'"):
        config_lib.load(config_lib.preset_path("diffusion", "smoke"), ["model.base_chanels=8"])
    with pytest.raises(ConfigError, match="did you mean 'diffusion.timesteps'"):
        config_lib.load(config_lib.preset_path("diffusion", "smoke"), ["diffusion.timestep.x=8"])
    with pytest.raises(ConfigError, match="unknown config key 'diffusion'"):
        config_lib.load(config_lib.preset_path("llm", "smoke"), ["diffusion.schedule=cosine"])
    with pytest.raises(ConfigError, match=r"task='gan' is not known; use one of \['diffusion', 'llm'\]"):
        config_lib.load(config_lib.preset_path("llm", "smoke"), ["task=gan"])


def test_8b_preset_has_llama3_8b_shape():
    m = config_lib.load(config_lib.preset_path("llm", "8b")).model
    assert (m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size) == (
        32, 4096, 32, 8, 128, 14336, 128256,
    )
    assert m.rope_theta == 500000.0
    assert abs(m.num_params() - 8.03e9) < 0.01e9


def test_mesh_minus_one_infers(tiny):
    cfg = tiny("mesh.data=-1", "mesh.model=2")
    assert checks.mesh_shape(cfg, 8) == (4, 2)


def test_yaml_round_trip(tiny, tmp_path):
    cfg = tiny("run.steps=11")
    path = tmp_path / "c.yaml"
    path.write_text(config_lib.to_yaml(cfg))
    assert config_lib.load(path) == cfg
