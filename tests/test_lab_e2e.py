"""The inheritance lab end to end: pretraining cache, and `--quick` producing the table, JSON and plots."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_pretraining_is_cached_and_keyed_by_the_world(tmp_path):
    from lab.model import ModelConfig
    from lab.pretrain import PretrainConfig, pretrain, pretrained_path
    from lab.world import WorldConfig

    world = WorldConfig(seed=0, noise=0.3, n_pretrain=300)
    model = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    cfg = PretrainConfig(max_steps=3, batch_size=4, block_size=32)
    path = pretrain(world, model, cfg, cache_dir=str(tmp_path), log=lambda *_: None)
    meta = json.loads((Path(path) / "meta.json").read_text())
    assert meta["steps"] == 3 and meta["world"]["noise"] == 0.3
    assert abs(meta["corpus"]["wrong_rate"] - 0.3) < 0.08
    assert 0 <= meta["clean_probe_accuracy"]["all"] <= 1 and "planted_probe" in meta
    stamp = os.path.getmtime(Path(path) / "meta.json")
    again = pretrain(world, model, cfg, cache_dir=str(tmp_path), log=lambda *_: None)
    assert again == path and os.path.getmtime(Path(path) / "meta.json") == stamp  # reused, not retrained
    # any dial that shapes the corpus gives another checkpoint; the tokenizer is shared
    assert pretrained_path(world.replace(noise=0.1), model, cfg, str(tmp_path)) != path
    assert len(list(tmp_path.glob("tokenizer-*"))) == 1


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "quick"
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "inheritance_lab.py"), "--quick", "--out_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    elapsed = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    cfg = results["config"]
    methods = cfg["methods"]
    assert set(methods) == {"full_ft", "lora", "pissa", "ba_lora", "ba_lora_cr", "ba_lora_dr", "ba_lora_svdr"}
    # lab v4: every arm starts from the shared format warm-up of its noise level's pretrained model
    assert set(results["warmup"]) == {str(n) for n in cfg["noise_levels"]} and cfg["warmup"]["steps"] > 0
    # every method x noise x seed ran, at the learning rate its sweep chose
    cells = {(r["method"], r["noise"], r["seed"]) for r in results["runs"]}
    assert cells == {(m, n, s) for m in methods for n in cfg["noise_levels"] for s in cfg["seeds"]}
    for r in results["runs"]:
        assert r["lr"] == results["chosen_lr"][r["method"]]
        assert r["lr"] in cfg["lr_grid"][r["method"]]
        m = r["metrics"]
        for key in ("accuracy", "ood_accuracy", "distinct_2", "kl_to_pretrained"):
            assert 0 <= m[key] < float("inf"), (key, m[key])
        assert 0 <= m["retention"]["all"] <= 1
        # at noise 0: the control keys of the largest noise level; "unseen": held-out keys no fine-tuning problem uses
        assert m["inheritance"]["n"] > 0 and m["inheritance_unseen"]["n"] > 0
    # BA-LoRA's three terms were logged by BALoraSFTTrainer; single-term arms log only their own term
    ba = next(r for r in results["runs"] if r["method"] == "ba_lora")
    assert {"ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio"} <= set(ba["curves"])
    cr = next(r for r in results["runs"] if r["method"] == "ba_lora_cr")
    assert "ba_lora/kl" in cr["curves"] and "ba_lora/svd_ratio" not in cr["curves"]
    assert not any(k.startswith("ba_lora/") for k in next(
        r for r in results["runs"] if r["method"] == "pissa")["curves"])
    # paired differences to PiSSA over the seeds
    agg = results["aggregate"]
    assert agg["0.3"]["lora"]["accuracy"]["vs_pissa"]["n"] == len(cfg["seeds"])
    assert agg["0.3"]["pissa"]["accuracy"]["vs_pissa"]["mean"] == 0
    # the table and the plots
    table = (out / "results.md").read_text()
    for label in ("Full FT", "LoRA", "PiSSA", "BA-LoRA", "BA-LoRA (CR only)", "BA-LoRA (DR only)",
                  "BA-LoRA (SVDR only)", "Downstream acc. %", "Inherited, seen keys %", "Inherited, unseen keys %",
                  "Clean-probe acc."):
        assert label in table
    assert (out / "vs_noise.png").stat().st_size > 10_000
    assert (out / "balora_terms.png").stat().st_size > 10_000
    print(f"--quick took {elapsed:.0f}s")
    # a second run reuses every cached job and the pretrained models
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "inheritance_lab.py"), "--quick", "--out_dir", str(out),
         "--no_plots"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 0 and "reused" in again.stdout


@pytest.mark.slow
def test_quick_frontier_smoke(tmp_path):
    """The frontier's machinery end to end on the quick world: the release's options reach the trainer, the KL
    budget is set from PiSSA's validation KL, tied arms take PiSSA's rate, every arm starts from the warm-up."""
    out = tmp_path / "frontier"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "inheritance_lab.py"), "--quick", "--sweep", "frontier",
         "--out_dir", str(out), "--workers", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["methods"] == ["pissa", "ba_release", "kl_budget0.5"]
    assert len({r["lr"] for r in results["runs"]}) == 1 and [r["method"] for r in results["sweep"]] == ["pissa"] * 2
    pissa = next(r for r in results["sweep"] if r["lr"] == results["chosen_lr"]["pissa"])
    target = results["arms"]["kl_budget0.5"]["balora"]["kl_target"]
    assert target == pytest.approx(0.5 * pissa["metrics"]["val_kl_to_pretrained"], abs=1e-4)
    assert results["arms"]["ba_release"]["balora"]["lambda_focus_schedule"] == "two_phase"
    release = next(r for r in results["runs"] if r["method"] == "ba_release")
    # two_phase: λ2, λ3 are off for the first 20 % of the steps, so the entropy / SVD terms are logged (at λ = 0
    # they would not be computed at all)
    assert "ba_lora/entropy" in release["curves"] and "ba_lora/svd_ratio" in release["curves"]
    assert results["warmup"]["0.3"]["steps"] > 0
    assert (out / "frontier.png").stat().st_size > 10_000 and "**Primary**" in (out / "results.md").read_text()
