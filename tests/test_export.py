"""Export to the Hugging Face Llama layout, checked by `transformers` itself; import back; sampling."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, LlamaForCausalLM

from flax import nnx

from data import corpus
from models.transformer import Transformer
from pretrain import checkpoint, cli, export

from conftest import REAL_DATA, ROOT, TINY, tiny_config
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


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_transformers_gives_the_same_logits(runs, name):
    run, hf_dir = runs[name]
    sp = sentencepiece(run)
    ids = np.array([[sp.bos_id()] + sp.encode(t)[:31] for t in sample_texts(2)], np.int32)  # [2, 32] real tokens
    model, _ = export.load_model(str(run))
    ours = np.asarray(model.logits(model(ids, np.ones_like(ids), np.broadcast_to(np.arange(32), ids.shape))))
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
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
    original_cfg, original, _ = export.from_checkpoint(str(run))
    cfg, imported, tokenizer = export.from_checkpoint(str(tmp_path / "imported"))
    assert sorted(imported) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(np.asarray(imported[key]), np.asarray(original[key]), err_msg=key)
    assert cfg.model == original_cfg.model
    assert tokenizer == (run / "tokenizer.model").read_bytes()


def test_greedy_generation_matches_transformers(runs, capsys):
    run, hf_dir = runs["untied"]
    sp = sentencepiece(run)
    results = []
    for source in (run, hf_dir):  # the checkpoint and its export
        assert cli.main(["sample", str(source), "--prompt", PROMPT, "--max-new-tokens", "20", "--json"]) == 0
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 1
        results.append(json.loads(lines[0]))
    ours, from_export = results
    assert from_export == ours
    assert ours["prompt_ids"] == [sp.bos_id()] + sp.encode(PROMPT)
    assert len(ours["ids"]) == 20 and len(set(ours["ids"])) > 5  # a varied sequence: a real comparison
    assert ours["text"] == sp.decode(ours["ids"])
    hf_model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    prompt = torch.tensor([ours["prompt_ids"]])
    theirs = hf_model.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, prompt.shape[1]:]
    assert theirs.tolist() == ours["ids"]


def test_bfloat16_export_is_the_rounded_weights(runs, tmp_path):
    import ml_dtypes

    run, _ = runs["tied"]
    assert cli.main(["export", str(run), "--out", str(tmp_path / "bf16")]) == 0  # bfloat16 is the default
    _, params, _ = export.from_checkpoint(str(run))
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="numpy") as f:
        q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
        embed = f.get_tensor("model.embed_tokens.weight")
    assert q.dtype == ml_dtypes.bfloat16
    wq = np.asarray(params["layers/wq"][1])
    np.testing.assert_array_equal(q, wq.reshape(wq.shape[0], -1).T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(embed, np.asarray(params["embed"]).astype(ml_dtypes.bfloat16))
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_to_and_import_from_gcs(runs, gcs, tmp_path):
    run, _ = runs["tied"]
    for args in (["export", str(run), "--out", "gs://test-bucket/tied-hf", "--dtype", "float32"],
                 ["import-hf", "gs://test-bucket/tied-hf", "--out", str(tmp_path / "imported")]):
        proc = subprocess.run([sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=gcs, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    _, original, _ = export.from_checkpoint(str(run))
    _, imported, _ = export.from_checkpoint(str(tmp_path / "imported"))
    for key in original:
        np.testing.assert_array_equal(np.asarray(imported[key]), np.asarray(original[key]), err_msg=key)


# --- bad input: exit 2, one line, nothing written --------------------------------------------


def gpt2_dir(tmp):
    (tmp / "gpt2").mkdir()
    (tmp / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    return tmp / "gpt2"


def nonempty(tmp):
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("mine")
    return tmp / "full"


def indivisible_heads(tmp):
    """A checkpoint whose embed_dim (36) transformers' LlamaConfig cannot split into 8 heads."""
    cfg = tiny_config("model.embed_dim=36", "model.num_heads=8", f"run.output_dir={tmp / 'odd'}")
    checkpoint.save_params(cfg, nnx.state(Transformer(cfg.model, rngs=nnx.Rngs(0))))
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
    "import into a non-empty --out": (lambda r, t: ["import-hf", str(r["tied"][1]), "--out", str(nonempty(t))], "is not empty"),
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
