"""The Hugging Face Llama layout, both ways: what vLLM, TGI, SGLang and `transformers` read.

A directory holds `config.json`, the weights as safetensors (`model.safetensors`, or numbered
files plus `model.safetensors.index.json` above a size), `generation_config.json`, and the
tokenizer: `tokenizer.json` + `tokenizer_config.json` (Llama 3), or a SentencePiece
`tokenizer.model` + `tokenizer_config.json`.

The names and layouts of the weights are one table (`_layer_table`): Hugging Face keeps each
projection as a [out, in] matrix per layer, this stack a stacked [layers, in, ...heads] array.
Both rotate split halves in RoPE, so no q/k permutation is needed.
"""

import json

import jax
import numpy as np
from etils import epath

from data import tokenizer as tokenizer_lib
from data.prepare import output
from data.tokenizer import Tokenizer
from models.configs import RopeScaling, TransformerConfig
from models.transformer import Transformer
from pretrain import config as config_lib
from pretrain.config import ConfigError
from pretrain.config.schema import LanguageModelRun, RunConfig
from pretrain.formats import params, weights
from pretrain.run import checkpoint

NAME, TASK = "hf", "llm"  # --format, and the family it holds
ARCHITECTURE = "LlamaForCausalLM"


# --- config ----------------------------------------------------------------------------------


def llama_config(m: TransformerConfig, dtype: str, special: dict[str, int]) -> dict:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.embed_dim,
        "intermediate_size": m.mlp_dim,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # older readers
        "rope_scaling": _rope_scaling_json(m.rope_scaling),  # older readers (transformers 4, vLLM); null unscaled
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta,  # transformers 5
                            **(_rope_scaling_json(m.rope_scaling) or {})},
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": dtype,
        **special,
    }


# The Hugging Face rope_type of each scaling this model has, and the keys it reads.
ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_scaling_json(s: RopeScaling) -> dict | None:
    return None if s.type == "none" else {"rope_type": s.type, **{k: getattr(s, k) for k in ROPE_KEYS[s.type]}}


def _rope_scaling(rope: dict, hf: dict, where) -> RopeScaling:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return RopeScaling()
    if kind not in ROPE_KEYS:
        raise ConfigError(f"{where}: rope_type '{kind}' is not supported; import a Llama whose config.json has "
                          f"rope_type {', '.join(ROPE_KEYS)} or default (the RoPE scalings this model has)")
    values = {"original_max_position_embeddings": hf.get("max_position_embeddings"), **rope}  # transformers' fallback
    missing = [k for k in ROPE_KEYS[kind] if values.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: its {kind} rope scaling lacks {', '.join(missing)}; add them to config.json")
    # Each value as its field's type: a config.json may hold 32 where 32.0 is meant.
    return RopeScaling(type=kind, **{k: type(getattr(RopeScaling, k))(values[k]) for k in ROPE_KEYS[kind]})


def model_config(hf: dict, where) -> TransformerConfig:
    """Our model settings for a Llama config.json; anything this model cannot represent is refused."""
    arch = hf.get("architectures") or [hf.get("model_type")]
    if ARCHITECTURE not in arch:
        raise ConfigError(f"{where} holds a {', '.join(map(str, arch))} model; import-hf reads {ARCHITECTURE} directories only")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers' order of precedence
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        f"hidden_act={hf.get('hidden_act')}": hf.get("hidden_act", "silu") != "silu",
    }
    if any(unsupported.values()):
        raise ConfigError(f"{where}: {', '.join(k for k, v in unsupported.items() if v)} is not supported by this model")
    scaling = _rope_scaling(rope, hf, where)
    heads = hf["num_attention_heads"]
    return TransformerConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        embed_dim=hf["hidden_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_scaling=scaling,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
    )


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """config.json's and generation_config.json's special token ids."""
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id}
    return special | ({"pad_token_id": tok.pad_id} if tok.pad_id >= 0 else {})


def tokenizer_files(tok: Tokenizer, max_len: int) -> dict[str, bytes]:
    """The tokenizer's files in a Hugging Face directory. A tokenizer.json goes as it came, with its
    tokenizer_config.json (special tokens, chat template). A SentencePiece model gets a
    tokenizer_config.json under which `transformers` gives the same ids: a BPE model maps onto
    Llama's tokenizer class, a unigram one onto the generic converter."""
    if not isinstance(tok, tokenizer_lib.SentencePiece):
        return dict(tok.files)
    settings = tok.settings()
    config = {
        "tokenizer_class": "LlamaTokenizer" if settings["model_type"] == "bpe" else "TokenizersBackend",
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": settings["add_dummy_prefix"],
        "legacy": False,
        "bos_token": tok.token(tok.bos_id),
        "eos_token": tok.token(tok.eos_id),
        "unk_token": tok.token(tok.unk_id),
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    if tok.pad_id >= 0:
        config["pad_token"] = tok.token(tok.pad_id)
    return {**tok.files, tokenizer_lib.HF_CONFIG_FILE: json.dumps(config, indent=2).encode()}


# --- weights ---------------------------------------------------------------------------------


SAME = (lambda x: x, lambda w: w)
TRANSPOSE = (lambda x: x.T, lambda w: w.T)


def _layer_table(m: TransformerConfig):
    """Our per-layer parameter -> (Hugging Face name, our array -> theirs, theirs -> ours)."""
    e, h, k, d = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
    return {
        "wq": ("self_attn.q_proj.weight", lambda x: x.reshape(e, h * d).T, lambda w: w.T.reshape(e, h, d)),
        "wk": ("self_attn.k_proj.weight", lambda x: x.reshape(e, k * d).T, lambda w: w.T.reshape(e, k, d)),
        "wv": ("self_attn.v_proj.weight", lambda x: x.reshape(e, k * d).T, lambda w: w.T.reshape(e, k, d)),
        "wo": ("self_attn.o_proj.weight", lambda x: x.reshape(h * d, e).T, lambda w: w.T.reshape(h, d, e)),
        "w_gate": ("mlp.gate_proj.weight", *TRANSPOSE),
        "w_up": ("mlp.up_proj.weight", *TRANSPOSE),
        "w_down": ("mlp.down_proj.weight", *TRANSPOSE),
        "attn_norm/scale": ("input_layernorm.weight", *SAME),
        "mlp_norm/scale": ("post_attention_layernorm.weight", *SAME),
    }


def _top_table(m: TransformerConfig):
    table = {"embed": ("model.embed_tokens.weight", *SAME), "final_norm/scale": ("model.norm.weight", *SAME)}
    if not m.tie_embeddings:
        table["lm_head"] = ("lm_head.weight", *TRANSPOSE)
    return table


def hf_tensors(m: TransformerConfig, shapes: dict, read: params.Reader | None):
    """[(name, shape, thunk)] of every Hugging Face tensor, given our parameters' `shapes`; each thunk
    converts one tensor (one layer's slice of a stacked parameter) from `read`, which holds one of our
    parameters at a time. The tensors go parameter by parameter (every layer's q_proj, then every
    layer's k_proj...), so each of ours is read once: writing holds the largest parameter and one
    converted tensor, never the model."""

    def entry(name, fn, key, layer=None):
        shape = shapes[key] if layer is None else shapes[key][1:]
        out_shape = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, np.float32)).shape
        return name, out_shape, lambda: fn(read(key) if layer is None else read(key)[layer])

    out = [entry(name, fn, key) for key, (name, fn, _) in _top_table(m).items()]
    for key, (name, fn, _) in _layer_table(m).items():
        out += [entry(f"model.layers.{i}.{name}", fn, f"layers/{key}", i) for i in range(m.num_layers)]
    return out


def our_tensors(m: TransformerConfig, shapes: dict, read) -> list:
    """[(path, thunk)] of each of our parameters as float32, converted from `read(name)`, which returns
    one Hugging Face tensor. A stacked layer parameter is filled layer by layer: a thunk holds the
    parameter it makes and one tensor of theirs."""

    def stacked(key, name, fn):
        out = np.empty(shapes[key], np.float32)
        for i in range(m.num_layers):
            out[i] = fn(read(f"model.layers.{i}.{name}"))
        return out

    tensors = [(key, lambda name=name, fn=fn: fn(read(name)).astype(np.float32))
               for key, (name, _, fn) in _top_table(m).items()]
    return tensors + [(f"layers/{key}", lambda key=key, name=name, fn=fn: stacked(f"layers/{key}", name, fn))
                      for key, (name, _, fn) in _layer_table(m).items()]


# --- the directory, both ways ----------------------------------------------------------------


def claims(directory: epath.Path, config: dict) -> bool:
    return ARCHITECTURE in (config.get("architectures") or [config.get("model_type")])


def read(directory: epath.Path) -> tuple[LanguageModelRun, dict, Tokenizer | None]:
    """(a config holding the model's settings, flat {path: float32 array} of parameters, tokenizer
    or None) of a Llama directory."""
    m = _model_config_of(directory)
    with weights.open_weights(directory) as read_tensor:
        flat = {key: thunk() for key, thunk in our_tensors(m, params.shapes(Transformer, m), read_tensor)}
    return LanguageModelRun(model=m), flat, tokenizer_lib.read(directory)


def _model_config_of(directory: epath.Path) -> TransformerConfig:
    if not (directory / "config.json").exists():
        raise ConfigError(f"{directory} has no config.json; point at a Hugging Face model directory")
    return model_config(json.loads((directory / "config.json").read_text()), directory)


def export(cfg: LanguageModelRun, directory: epath.Path, step: int, out: epath.Path, *, dtype: str, overwrite: bool,
           max_shard_bytes: int) -> int:
    """A checkpoint's parameters as a Llama directory in `out`; returns the bytes of weights."""
    m = cfg.model
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}, "
                          "which transformers' LlamaConfig requires")
    output.check_output(out, overwrite)
    run = checkpoint.run_dir(directory)
    tokenizer = tokenizer_lib.read(run)
    if tokenizer is None:
        print(f"note: no tokenizer in {run}; the export has none (and no special token ids)")
    special = special_ids(tokenizer) if tokenizer else {}
    read = params.Reader(directory, step, Transformer, m)
    with output.staged(out, overwrite, last="config.json") as stage:
        size = weights.write_weights(stage, hf_tensors(m, read.shapes, read), dtype, max_shard_bytes)
        (stage / "generation_config.json").write_text(json.dumps(special, indent=2))
        for name, content in (tokenizer_files(tokenizer, m.max_seq_len) if tokenizer else {}).items():
            (stage / name).write_bytes(content)
        (stage / "config.json").write_text(json.dumps(llama_config(m, dtype, special), indent=2))
    return size


def import_(directory: epath.Path, out: str, *, overwrite: bool) -> int:
    """A Llama directory as a checkpoint (step 0, parameters only) in `out`, with the config.yaml and
    tokenizer to train on from there (checkpoint.resume_from=OUT). Returns the parameter count. Each
    parameter is converted and written on its own: host memory holds the largest, not the model."""
    m = _model_config_of(directory)  # other architectures are refused before any weight is read
    output.check_output(epath.Path(out), overwrite)
    tokenizer = tokenizer_lib.read(directory)
    shapes = params.shapes(Transformer, m)
    cfg = LanguageModelRun(run=RunConfig(name=directory.name or "imported", steps=1, output_dir=str(out)), model=m)
    with weights.open_weights(directory) as read_tensor:
        params.save_imported(cfg, hf_tensors(m, shapes, None), our_tensors(m, shapes, read_tensor), read_tensor, overwrite)
    if tokenizer is not None:
        tokenizer.write(out)
    (epath.Path(out) / "config.yaml").write_text(config_lib.to_yaml(cfg))
    return sum(int(np.prod(shape)) for shape in shapes.values())
