"""Export to the Hugging Face Llama layout, checked by `transformers` itself; import back; sampling."""

import json
import re
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from flax import nnx

from data import corpus
from data import tokenizer as tokenizer_lib
from models.configs import RopeScaling
from models.transformer import Transformer, rope_frequencies
from pretrain import cli
from pretrain.formats import hf_llama, params
from pretrain.inference import load
from pretrain.run import checkpoint

from conftest import CACHE, REAL_DATA, ROOT, TINY, tiny_config
from test_trainer import SMOKE

torch.set_num_threads(2)
PROMPT = "class Parser:\n    def"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs on real text: GQA with untied embeddings after one step (close to its random
    start, so greedy decoding stays varied rather than repeating one token), and tied embeddings
    trained for 30 steps."""
    root = tmp_path_factory.mktemp("export")
    settings = {"untied": ["run.steps=1"], "tied": ["run.steps=30", "model.tie_embeddings=true"]}
    out = {}
    for name, extra in settings.items():
        run = root / name
        assert cli.main(["train", SMOKE, *TINY, *REAL_DATA, *extra, "model.max_seq_len=64", "train.eval_every=0",
                         f"run.output_dir={run}"]) == 0
        # The untied export is split into several files with an index; the tied one is a single file.
        shard = ["--max-shard-mb", "0.05"] if name == "untied" else []
        assert cli.main(["export", str(run), "--out", str(root / f"{name}-hf"), "--dtype", "float32", *shard]) == 0
        out[name] = (run, root / f"{name}-hf")
    return out


def sentencepiece(run) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(run / "tokenizer.model"))


def sample_texts(n: int) -> list[str]:
    return [f.read_text()[:2000] for f in corpus.stdlib_files(400_000)[-n:]]


def our_logits(source, ids: np.ndarray) -> np.ndarray:
    """[B, L, V] logits of a checkpoint or an export through the JAX model."""
    model, _, _ = load.load(str(source), "llm")
    return np.asarray(model.logits(model(ids, np.ones_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape))))


def their_logits(hf_dir, ids: np.ndarray, **config) -> np.ndarray:
    """The same through transformers' Llama (config: changes to the directory's config.json)."""
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **config)
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()


def sample_json(source, prompt: str, max_new_tokens: int, capsys) -> dict:
    """`pretrain sample --json` of a checkpoint or an export: its one line, parsed."""
    assert cli.main(["sample", str(source), "--prompt", prompt, "--max-new-tokens", str(max_new_tokens), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    return json.loads(lines[0])


def their_greedy(hf_dir, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    prompt = torch.tensor([prompt_ids])
    out = hf_model.generate(prompt, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_transformers_gives_the_same_logits(runs, name):
    run, hf_dir = runs[name]
    sp = sentencepiece(run)
    ids = np.array([[sp.bos_id()] + sp.encode(t)[:31] for t in sample_texts(2)], np.int32)  # [2, 32] real tokens
    ours = our_logits(run, ids)
    assert np.abs(ours - their_logits(hf_dir, ids)).max() < 1e-4
    assert np.abs(ours).max() > 1.0  # not trivially small logits
    files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if name == "untied":
        assert len(files) > 1 and (hf_dir / "model.safetensors.index.json").exists()
    else:
        assert files == ["model.safetensors"]
        with safe_open(hf_dir / "model.safetensors", framework="numpy") as f:
            assert "lm_head.weight" not in f.keys()
        assert json.loads((hf_dir / "config.json").read_text())["tie_word_embeddings"] is True


def test_transformers_tokenizer_gives_the_same_ids(runs):
    run, hf_dir = runs["untied"]
    sp = sentencepiece(run)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    texts = sample_texts(6) + ["  two leading spaces\tand a tab\n\n\nübung 日本語 😀", " x", PROMPT]
    for text in texts:
        assert tokenizer(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), text[:80]
        assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_import_gives_back_identical_parameters(runs, tmp_path, capsys):
    run, hf_dir = runs["untied"]
    assert cli.main(["import-hf", str(hf_dir), "--out", str(tmp_path / "imported")]) == 0
    assert "checkpoint.resume_from=" in capsys.readouterr().out
    original_cfg, original, _ = load.from_checkpoint(str(run))
    cfg, imported, tokenizer = load.from_checkpoint(str(tmp_path / "imported"))
    assert sorted(imported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(np.asarray(imported[key]), np.asarray(original[key]), err_msg=key)
    assert cfg.model == original_cfg.model
    assert tokenizer.files == {"tokenizer.model": (run / "tokenizer.model").read_bytes()}


def test_greedy_generation_matches_transformers(runs, capsys):
    run, hf_dir = runs["untied"]
    sp = sentencepiece(run)
    ours, from_export = (sample_json(source, PROMPT, 20, capsys) for source in (run, hf_dir))  # checkpoint, export
    assert from_export == ours
    assert ours["prompt_ids"] == [sp.bos_id()] + sp.encode(PROMPT)
    assert len(ours["ids"]) == 20 and len(set(ours["ids"])) > 5  # a varied sequence: a real comparison
    assert ours["text"] == sp.decode(ours["ids"])
    assert their_greedy(hf_dir, ours["prompt_ids"], 20) == ours["ids"]


def test_bfloat16_export_is_the_rounded_weights(runs, tmp_path):
    run, _ = runs["tied"]
    assert cli.main(["export", str(run), "--out", str(tmp_path / "bf16")]) == 0  # bfloat16 is the default
    _, flat, _ = load.from_checkpoint(str(run))
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert q.dtype == ml_dtypes.bfloat16
    wq = np.asarray(flat["layers/wq"][1])
    np.testing.assert_array_equal(q, wq.reshape(wq.shape[0], -1).T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(embed, np.asarray(flat["embed"]).astype(ml_dtypes.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_to_and_import_from_gcs(runs, gcs, tmp_path):
    run, _ = runs["tied"]
    for args in (["export", str(run), "--out", "gs://test-bucket/tied-hf", "--dtype", "float32"],
                 ["import-hf", "gs://test-bucket/tied-hf", "--out", str(tmp_path / "imported")]):
        proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=gcs, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    _, original, _ = load.from_checkpoint(str(run))
    _, imported, _ = load.from_checkpoint(str(tmp_path / "imported"))
    for key in original:
        np.testing.assert_array_equal(np.asarray(imported[key]), np.asarray(original[key]), err_msg=key)


# --- Llama 3: llama3 RoPE scaling, tied embeddings, GQA and a byte-level BPE tokenizer.json ---------


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
# Llama 3.1's scaling with the original context cut to 64 tokens, so that 64-token prompts reach the
# scaled (long-wavelength) and the blended frequencies of a 16-wide head.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def save_llama3_tokenizer(texts: list[str], out) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer.json learnt from `texts`, with Llama 3's special tokens and its BOS
    template, saved as transformers saves one (tokenizer.json + tokenizer_config.json)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=LLAMA3_SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = LLAMA3_SPECIALS[0]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=LLAMA3_SPECIALS[1])
    fast.save_pretrained(out)
    return fast


def save_random_llama3(out, tok: PreTrainedTokenizerFast):
    """A random Llama-3.2-shaped model (llama3 RoPE scaling, tied embeddings, 2 kv heads for 4 query
    heads), its config.json as the Llama 3.x checkpoints on the Hub write it."""
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=0.2)  # well above the default 0.02: varied greedy tokens, not one repeated
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    saved.pop("rope_parameters", None)  # transformers 5's spelling; the Hub's files have these two:
    (out / "config.json").write_text(json.dumps(saved | {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}, indent=2))


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """The continue-pretraining path on a random Llama-3-shaped directory: import-hf, prepare a corpus
    with its tokenizer.json, train 3 steps from the imported weights, export."""
    root = tmp_path_factory.mktemp("llama3")
    texts = [f.read_text() for f in corpus.stdlib_files(150_000)]
    (root / "corpus").mkdir()
    (root / "corpus" / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    paths = {name: root / name for name in ("Llama-3-tiny", "imported", "data", "trained", "export")}
    save_random_llama3(paths["Llama-3-tiny"], save_llama3_tokenizer(texts, paths["Llama-3-tiny"]))
    commands = [
        ["import-hf", paths["Llama-3-tiny"], "--out", paths["imported"]],
        ["prepare", "text", "--input", root / "corpus", "--tokenizer", paths["Llama-3-tiny"] / "tokenizer.json",
         "--out", paths["data"], "--seq-len", "32", "--workers", "1"],
        ["train", paths["imported"] / "config.yaml", f"checkpoint.resume_from={paths['imported']}",
         f"run.output_dir={paths['trained']}", f"data.source={paths['data']}", "data.seq_len=32", "run.steps=3",
         "optim.warmup_steps=0", "train.log_every=1", "train.eval_every=0", "runtime.fake_cpu_devices=8",
         CACHE],
        ["export", paths["trained"], "--out", paths["export"], "--dtype", "float32"],
    ]
    for argv in commands:
        assert cli.main([str(a) for a in argv]) == 0, argv
    return paths


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"type": "linear", "factor": 4.0},  # the older spelling
], ids=["llama3", "linear"])
def test_rope_scaling_gives_the_frequencies_of_transformers(rope_scaling):
    """Llama-3.2-1B's heads: our reading of config.json and our frequencies against transformers' own;
    the export writes back what the import read."""
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
              "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
              "max_position_embeddings": 131072, "rope_theta": 500000.0, "rope_scaling": rope_scaling}
    m = hf_llama.model_config(config, "test")
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[m.rope_scaling.type](LlamaConfig(**config), "cpu")
    ours = rope_frequencies(m.head_dim, m.rope_theta, m.rope_scaling)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert attention_factor == 1.0
    unscaled = rope_frequencies(m.head_dim, m.rope_theta, RopeScaling())
    assert (unscaled / ours).max() == pytest.approx(rope_scaling["factor"])  # the longest wavelengths are stretched
    assert hf_llama.model_config(hf_llama.llama_config(m, "float32", {}), "export") == m


def llama3_prompts(hf_dir) -> np.ndarray:
    """[2, 64]: BOS and the first 63 ids of two texts, through our reading of the directory's tokenizer."""
    tok = tokenizer_lib.read(hf_dir)
    return np.array([[tok.bos_id] + ids[:63] for ids in tok.encode(sample_texts(2))], np.int32)


def test_llama3_imports_with_the_logits_of_transformers(llama3):
    hf_dir, imported = llama3["Llama-3-tiny"], llama3["imported"]
    cfg, _, tokenizer = load.from_checkpoint(str(imported))
    assert cfg.model.rope_scaling == RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                 original_max_position_embeddings=64)
    assert cfg.model.tie_embeddings and (cfg.model.num_heads, cfg.model.num_kv_heads) == (4, 2)
    assert tokenizer.files == {name: (hf_dir / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    ids = llama3_prompts(hf_dir)
    ours, theirs = our_logits(imported, ids), their_logits(hf_dir, ids)
    print(f"llama3 import: max |logit difference| {np.abs(ours - theirs).max():.2e} over {ids.shape} tokens")
    assert np.abs(ours - theirs).max() < 1e-4
    # The scaling is what this compares: unscaled, transformers' own logits move far beyond the tolerance.
    unscaled = their_logits(hf_dir, ids, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    assert np.abs(unscaled - theirs).max() > 1e-2


def test_llama3_export_has_the_same_tokens_and_logits_in_transformers(llama3):
    trained, exported = llama3["trained"], llama3["export"]
    manifest = json.loads((llama3["data"] / "manifest.json").read_text())
    assert manifest["tokenizer_kind"] == "huggingface" and manifest["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert [json.loads(line)["step"] for line in (trained / "metrics.jsonl").read_text().splitlines()][-1] == 3
    for name in ("tokenizer.json", "tokenizer_config.json"):  # carried through as they came
        assert (exported / name).read_bytes() == (llama3["Llama-3-tiny"] / name).read_bytes()
    config = json.loads((exported / "config.json").read_text())
    assert config["rope_scaling"] == LLAMA3_ROPE and config["tie_word_embeddings"] is True
    ours, theirs = tokenizer_lib.read(trained), AutoTokenizer.from_pretrained(exported)
    texts = sample_texts(4) + [PROMPT, "  two leading spaces\tand a tab\n\n\nübung 日本語 😀", " x", "<|eot_id|> in text"]
    for text in texts:
        assert theirs(text)["input_ids"] == [ours.bos_id] + ours.encode([text])[0], text[:80]
    ids = llama3_prompts(exported)
    difference = np.abs(our_logits(trained, ids) - their_logits(exported, ids)).max()
    print(f"llama3 export after training: max |logit difference| {difference:.2e}")
    assert difference < 1e-4


def test_llama3_greedy_generation_matches_transformers(llama3, capsys):
    ours = sample_json(llama3["trained"], PROMPT, 24, capsys)
    assert ours["prompt_ids"] == AutoTokenizer.from_pretrained(llama3["export"])(PROMPT)["input_ids"]
    assert len(ours["ids"]) == 24 and len(set(ours["ids"])) > 5  # a varied sequence: a real comparison
    theirs = their_greedy(llama3["export"], ours["prompt_ids"], 24)
    print(f"llama3 greedy: ours {ours['ids']}, transformers {theirs}")
    assert theirs == ours["ids"]


def test_continued_pretraining_refuses_data_of_another_tokenizer(llama3, tmp_path, capsys):
    """The stdlib corpus has a SentencePiece tokenizer of the same size (512) as the Llama's: only the
    tokenizer itself tells them apart."""
    imported = llama3["imported"]
    argv = ["train", str(imported / "config.yaml"), f"checkpoint.resume_from={imported}", *REAL_DATA, "data.seq_len=16",
            "runtime.fake_cpu_devices=8", CACHE, f"run.output_dir={tmp_path / 'run'}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "data.source=stdlib was tokenised with another tokenizer" in err, err
    assert f"pretrain prepare text --tokenizer {imported}" in err and not (tmp_path / "run").exists()


# --- bad input: exit 2, one line, nothing written --------------------------------------------


def yarn_dir(tmp):
    """A Llama config.json with a RoPE scaling this model does not have."""
    (tmp / "yarn").mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 4096, "rope_theta": 10000.0,
              "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}
    (tmp / "yarn" / "config.json").write_text(json.dumps(config))
    return tmp / "yarn"


def misdescribed_dir(runs, tmp):
    """A Llama directory whose config.json claims a wider MLP than its weights have."""
    shutil.copytree(runs["tied"][1], tmp / "wrong")
    config = json.loads((tmp / "wrong" / "config.json").read_text())
    (tmp / "wrong" / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] * 2}))
    return tmp / "wrong"


def gpt2_dir(tmp):
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return tmp / "gpt2"


def diffusers_vae_dir(tmp):
    """A diffusers AutoencoderKL directory: its config.json names a class no format here reads."""
    (tmp / "vae").mkdir()
    (tmp / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "sample_size": 32}))
    return tmp / "vae"


def nonempty(tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    return tmp / "full"


def indivisible_heads(tmp):
    """A checkpoint whose embed_dim (36) transformers' LlamaConfig cannot split into 8 heads."""
    cfg = tiny_config("model.embed_dim=36", "model.num_heads=8", f"run.output_dir={tmp / 'odd'}")
    checkpoint.save_params(cfg, [(k, lambda v=v: v) for k, v in params.flat(nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0)))).items()])
    return tmp / "odd"


BAD = {
    "no checkpoint": (lambda r, t: ["export", str(t), "--out", str(t / "x")], "holds no checkpoint"),
    "no such step": (lambda r, t: ["export", str(r["tied"][0]), "--step", "7", "--out", str(t / "x")],
                     r"has no checkpoint of step 7; it has steps \[30\]"),
    "non-empty --out": (lambda r, t: ["export", str(r["tied"][0]), "--out", str(nonempty(t))], "is not empty; pass --overwrite"),
    "embed_dim not divisible by heads": (lambda r, t: ["export", str(indivisible_heads(t)), "--out", str(t / "x")],
                                         "model.embed_dim=36 is not divisible by model.num_heads=8"),
    "import of another architecture": (lambda r, t: ["import-hf", str(gpt2_dir(t)), "--out", str(t / "x")],
                                       "holds a GPT2LMHeadModel model; import-hf reads LlamaForCausalLM"),
    "import of another rope scaling": (lambda r, t: ["import-hf", str(yarn_dir(t)), "--out", str(t / "x")],
                                       "rope_type 'yarn' is not supported"),
    "import of weights config.json does not describe": (
        lambda r, t: ["import-hf", str(misdescribed_dir(r, t)), "--out", str(t / "x")],
        r"mlp.gate_proj.weight has shape \[64, 32\] where its config.json implies \[128, 32\]"),
    "import into a non-empty --out": (lambda r, t: ["import-hf", str(r["tied"][1]), "--out", str(nonempty(t))], "is not empty"),
    "sample of a directory no format reads": (lambda r, t: ["sample", str(diffusers_vae_dir(t)), "--prompt", "x"],
                                              "holds a AutoencoderKL model; sample reads LlamaForCausalLM, UNet2DModel, UNet "
                                              "directories"),
    "export to another family's format": (lambda r, t: ["export", str(r["tied"][0]), "--format", "unet", "--out", str(t / "x")],
                                          r"--format=unet does not hold a 'llm' model; use one of \['hf'\]"),
    "prompt too long": (lambda r, t: ["sample", str(r["tied"][0]), "--prompt", "x " * 60, "--max-new-tokens", "20"],
                        "exceed the model's max_seq_len=64"),
    "resume_from another model": (lambda r, t: ["train", SMOKE, *TINY, *REAL_DATA, "model.embed_dim=64",
                                                f"checkpoint.resume_from={r['tied'][0]}", f"run.output_dir={t / 'x'}"],
                                  "holds a model with model.embed_dim=32"),
}


@pytest.mark.parametrize("args, message", BAD.values(), ids=BAD.keys())
def test_bad_input_exits_2_with_one_line(runs, args, message, tmp_path, capsys):
    argv = args(runs, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    if (tmp_path / "full").exists():
        assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# A command's peak resident memory, in KiB: Linux's high-water mark of the process (VmHWM), reset
# when it starts (clear_refs 5), since a process inherits the mark of the one that started it.
PEAK_RSS = ("import re, sys; open('/proc/self/clear_refs', 'w').write('5'); from pretrain import cli; "
            "rc = cli.main(sys.argv[1:]); print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[0]); "
            "sys.exit(rc)")


def peak_rss_of(argv) -> int:
    """In bytes."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, argv)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) * 1024


def test_export_and_import_hold_one_parameter_at_a_time(tmp_path):
    """A Llama-shaped checkpoint of 0.8 GB (float32, made without training) exports, and its export
    imports back, each with a peak host memory above a tiny model's of less than twice its largest
    parameter (0.13 GB) and a fixed 256 MiB: each parameter is read, converted and written on its own."""
    shape = ["model.vocab_size=32000", "model.embed_dim=1024", "model.num_layers=8", "model.num_heads=8",
             "model.num_kv_heads=8", "model.head_dim=128", "model.mlp_dim=4096", "model.max_seq_len=128"]
    sizes = {}
    for name, overrides in (("tiny", []), ("big", shape)):
        cfg = tiny_config(*overrides, f"run.output_dir={tmp_path / name}")
        shapes = params.shapes(Transformer, cfg.model)
        made = {key: (lambda i=i, s=s: np.random.default_rng(i).normal(0, 0.02, s).astype(np.float32))
                for i, (key, s) in enumerate(shapes.items())}
        checkpoint.save_params(cfg, made.items())
        sizes[name] = [int(np.prod(s)) * 4 for s in shapes.values()]
    peaks = {}
    for name in ("tiny", "big"):
        peaks["export", name] = peak_rss_of(["export", tmp_path / name, "--out", tmp_path / f"{name}-hf"])
        peaks["import", name] = peak_rss_of(["import-hf", tmp_path / f"{name}-hf", "--out", tmp_path / f"{name}-imported"])
    # Reading or writing a parameter holds it twice for a moment (TensorStore's buffer and the array).
    # The fixed part: one layer's tensor being converted, and what Orbax and TensorStore keep after
    # their first large write (up to 0.19 GiB measured, on an import beside other tests). Holding the
    # model would take 0.8 GB.
    for command in ("export", "import"):
        grew = peaks[command, "big"] - peaks[command, "tiny"]
        assert grew < 2 * max(sizes["big"]) + 256 * 2**20 < sum(sizes["big"]), (command, grew, sizes["big"])
    config = LlamaConfig.from_pretrained(tmp_path / "big-hf")
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (8, 1024, 32000)
    directory, step = checkpoint.locate(str(tmp_path / "big-imported"))
    for i, (key, s) in enumerate(params.shapes(Transformer, tiny_config(*shape).model).items()):
        back = checkpoint.restore_array(directory / str(step) / "params", tuple(key.split("/")), s, np.float32)
        np.testing.assert_array_equal(back, made[key]().astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)
