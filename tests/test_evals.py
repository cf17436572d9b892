"""lm-evaluation-harness tasks scored by the JAX model: `pretrain eval` against the harness's own
Hugging Face backend on our export, and eval.harness_* during training (on 2 processes, resumed)."""

import json
import random
import shutil
import sysconfig
from pathlib import Path

import lm_eval
import numpy as np
import pytest

from pretrain import cli
from pretrain.evals import harness
from pretrain.inference import load

from conftest import REAL_DATA, TINY
from test_checkpoint import resumable_copy
from test_multihost import LLM, launch
from test_trainer import SMOKE


def stdlib_lines(n: int) -> list[str]:
    """Lines of Python's own source, the text the tiny model trained on, shuffled the same way every time."""
    lines = [s.strip() for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
             for s in f.read_text(errors="ignore").splitlines() if 30 < len(s.strip()) < 80 and " " in s.strip()]
    random.Random(0).shuffle(lines)
    return lines[:n]


def task_files(root: Path) -> list[str]:
    """Three task YAMLs over JSONL files: multiple choice (a line's true end among three others'),
    perplexity of whole passages (rolling windows longer than the model's context), generation."""
    lines = stdlib_lines(400)
    rng, mc = random.Random(1), []
    for i in range(12):
        cut = lines[i].rindex(" ", 0, len(lines[i]) // 2 + 1) if " " in lines[i][1:len(lines[i]) // 2 + 1] else len(lines[i]) // 2
        choices = [lines[i][cut:]] + [other[len(other) // 2:] for other in lines[100 + 3 * i: 103 + 3 * i]]
        rng.shuffle(choices)
        mc.append({"question": lines[i][:cut], "choices": choices, "answer": choices.index(lines[i][cut:])})
    data = {"mc": mc, "ppl": [{"text": "\n".join(lines[200 + 10 * i: 210 + 10 * i])} for i in range(6)],
            "gen": [{"prompt": line[:20], "target": line[20:]} for line in lines[300:304]]}
    kinds = {
        "mc": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{answer}}", "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                                              for m in ("acc", "acc_norm")]},
        "ppl": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": False} for m, a in (
                    ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
                    ("bits_per_byte", "bits_per_byte"))]},
        "gen": {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 12, "do_sample": False},
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]},
    }
    paths = []
    for kind, docs in data.items():
        (root / f"{kind}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        task = {"task": f"tiny_{kind}", "dataset_path": "json", "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(root / f"{kind}.jsonl")}}, **kinds[kind]}
        (root / f"{kind}.yaml").write_text(json.dumps(task))  # JSON is YAML
        paths.append(str(root / f"{kind}.yaml"))
    return paths


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model trained 20 steps on Python's source (max_seq_len 64, so the passages roll over
    several windows), its float32 export, and the tasks."""
    root = tmp_path_factory.mktemp("evals")
    assert cli.main(["train", SMOKE, *TINY, *REAL_DATA, "run.steps=20", "model.max_seq_len=64", "train.eval_every=0",
                     f"run.output_dir={root / 'run'}"]) == 0
    assert cli.main(["export", str(root / "run"), "--out", str(root / "hf"), "--dtype", "float32"]) == 0
    return root, task_files(root)


def value(response):
    """A sample's score: a log-likelihood (multiple choice, rolling) or the generated text."""
    inner = response[0]
    return inner[0] if isinstance(inner, list | tuple) else inner


def test_our_scores_equal_the_harness_hugging_face_backend_on_our_export(exported):
    root, tasks = exported
    model, _, tokenizer = load.load(str(root / "run"), "llm")
    loaded = harness.load_tasks(tasks)
    ours = harness.evaluate(harness.make_lm(model, tokenizer, 8), loaded, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(root / "hf"), "dtype": "float32",
                                                             "device": "cpu"},
                                     tasks=loaded[0], task_manager=loaded[1], bootstrap_iters=0, log_samples=True)
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert ours["results"]["tiny_mc"]["acc_norm,none"] == theirs["results"]["tiny_mc"]["acc_norm,none"]
    for task in ("tiny_mc", "tiny_ppl"):
        for a, b in zip(ours["samples"][task], theirs["samples"][task], strict=True):
            for x, y in zip(a["resps"], b["resps"], strict=True):
                # 1e-4, or a few float32 steps of a passage's sum (it adds hundreds of log-probabilities)
                tolerance = max(1e-4, 4 * float(np.spacing(np.float32(abs(value(y))))))
                assert abs(value(x) - value(y)) <= tolerance, (task, value(x), value(y))
    assert [value(s["resps"][0]) for s in ours["samples"]["tiny_gen"]] == [
        value(s["resps"][0]) for s in theirs["samples"]["tiny_gen"]]
    assert ours["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["tiny_ppl"]["bits_per_byte,none"], rel=1e-6)


def test_pretrain_eval_prints_the_table_and_json(exported, capsys):
    root, tasks = exported
    assert cli.main(["eval", str(root / "hf"), "--tasks", tasks[0], "--limit", "4", "--bootstrap-iters", "0"]) == 0
    assert "|tiny_mc |" in capsys.readouterr().out.replace("tiny_mc|", "tiny_mc |")
    assert cli.main(["eval", str(root / "run"), "--tasks", tasks[0], "--limit", "4", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["tiny_mc"]["sample_len"] == 4 and 0 <= scores["tiny_mc"]["acc,none"] <= 1


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task_xyz"], "unknown lm-eval task no_such_task_xyz"),
    (["--tasks", "missing.yaml"], "no task YAML at missing.yaml"),
    (["--tasks", "hellaswag", "--batch-size", "0"], "--batch-size=0 must be at least 1"),
    (["--tasks", "hellaswag", "--limit", "0"], "--limit=0 must be at least 1"),
    (["--tasks", "hellaswag", "--num-fewshot", "-2"], "--num-fewshot=-2 must be >= 0"),
], ids=["unknown task", "missing YAML", "batch size", "limit", "few-shot"])
def test_a_task_that_cannot_load_is_one_line_exit_2(exported, args, message, capsys):
    root, _ = exported
    assert cli.main(["eval", str(root / "run"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def harness_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if any(k.startswith("harness/") for k in r)}


def test_harness_evals_during_training_on_two_processes_and_after_a_resume(exported, tmp_path):
    """Every 6 steps and at the end, on 2 processes; a run resumed from step 6 scores step 12 only,
    with the scores of the run that never stopped."""
    _, tasks = exported
    out = tmp_path / "run"
    command = ["train", SMOKE, *LLM, f"eval.harness_tasks=[{tasks[0]},{tasks[1]}]", "eval.harness_every=6",
               "eval.harness_limit=6", f"run.output_dir={out}"]
    proc = launch(2, command)
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, printed[-3000:]
    rows = harness_rows(out)
    assert sorted(rows) == [6, 12] and "[0] step  6/12 | harness tiny_mc/acc" in printed
    assert set(rows[12]) == {"step", "harness/tiny_mc/acc", "harness/tiny_mc/acc_norm", "harness/tiny_ppl/word_perplexity",
                             "harness/tiny_ppl/byte_perplexity", "harness/tiny_ppl/bits_per_byte"}
    resumed = resumable_copy(out, tmp_path / "again", keep_up_to=6)
    proc = launch(2, [*command[:-1], f"run.output_dir={resumed}"])
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, printed[-3000:]
    assert "resumed from step 6" in printed and "step  6/12 | harness" not in printed and "step 12/12 | harness" in printed
    assert harness_rows(resumed) == rows
