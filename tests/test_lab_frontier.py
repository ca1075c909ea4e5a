"""The inheritance lab's frontier sweep (issue 19): arms as data, the pre-registered setting rule, the format
warm-up's problems, the frontier figure against the table, and the NLU benchmark's λ scales."""

import importlib.util
import json
import math
import random
import statistics
from pathlib import Path

import pytest

from lab.finetune import (FRONTIER_ARMS, FRONTIER_LAMBDA1, METHODS, PAPER_ARMS, RELEASE_RATIO, method_from_dict,
                          resolve_kl_target)
from lab.stats import mean_ci

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path, method, **extra):
    from balora_trl import BALoraConfig

    l1, l2, l3 = method.lambdas
    return BALoraConfig(str(tmp_path), lambda_consistency=l1, lambda_diversity=l2, lambda_svd=l3, use_cpu=True,
                        report_to="none", **method.balora_kwargs, **extra)


def test_every_frontier_arm_is_a_valid_balora_config(tmp_path):
    for name in FRONTIER_ARMS:
        method = resolve_kl_target(METHODS[name], pissa_val_kl=4.0)
        assert method_from_dict(name, method.to_dict()) == method  # what a job spec carries rebuilds the arm
        if method.is_balora:
            _config(tmp_path, method)  # every field name and value is one BALoraConfig accepts
    for l1 in FRONTIER_LAMBDA1:
        ba, cr, lc = METHODS[f"ba_l{l1:g}"], METHODS[f"cr_l{l1:g}"], METHODS[f"lc_l{l1:g}"]
        assert ba.lambdas == pytest.approx((l1, 0.2 * l1, 0.2 * l1))  # release: λ2 / λ1 = λ3 / λ1 = 0.005 / 0.025
        assert cr.lambdas == (l1, 0.0, 0.0) and cr.consistency_positions == "all"
        assert lc.lambdas == ba.lambdas and lc.consistency_positions == "label_consistent"
    assert RELEASE_RATIO == pytest.approx(0.2)
    release = _config(tmp_path, METHODS["ba_release"]).balora_hyperparameters
    assert release["lambda_consistency"] == 0.025 and release["lambda_diversity"] == release["lambda_svd"] == 0.005
    assert release["lambda_consistency_end"] == pytest.approx(0.0025)  # cosine to 0.1 · λ1
    assert (release["lambda_focus_schedule"], release["focus_warmup_ratio"], release["focus_ramp_ratio"]) == (
        "two_phase", 0.2, 0.05)
    assert (release["entropy_top_k"], release["svd_normalizer"], release["kl_temperature"],
            release["kl_t2_scaling"]) == (20, "frobenius", 2.0, True)
    # the paper's arms stay the default; PiSSA, LoRA and Full FT are in the frontier as context and baseline
    assert {"pissa", "lora", "full_ft", "ba_lora"} <= set(FRONTIER_ARMS) and "ba_lora_dr" not in FRONTIER_ARMS
    assert PAPER_ARMS == ("full_ft", "lora", "pissa", "ba_lora", "ba_lora_cr", "ba_lora_dr", "ba_lora_svdr")


def test_kl_budget_is_a_fraction_of_pissas_validation_kl(tmp_path):
    arm = METHODS["kl_budget0.5"]
    assert arm.kl_fraction == 0.5 and arm.lambdas == (0.1, 0.0, 0.0)
    resolved = resolve_kl_target(arm, 6.3)
    assert resolved.balora_kwargs["kl_target"] == pytest.approx(3.15)
    assert _config(tmp_path, resolved).balora_hyperparameters["kl_target"] == pytest.approx(3.15)
    assert resolve_kl_target(METHODS["pissa"], 6.3) is METHODS["pissa"]
    with pytest.raises(ValueError, match="kl_budget0.5.*PiSSA's validation KL"):
        resolve_kl_target(arm, 0.0)
    from lab.finetune import FinetuneConfig, finetune

    with pytest.raises(ValueError, match="kl_budget0.5: a KL-budget arm needs its kl_target resolved"):
        finetune(None, None, [{"prompt": "a", "completion": "b"}], arm, 1e-3, 0, FinetuneConfig(), str(tmp_path))


def _args(*argv):
    from lab import run

    return run.build_config(run.build_parser().parse_args(list(argv)))


def test_sweep_frontier_selects_the_preregistered_design(capsys):
    from lab.run import WARMUP_STEPS

    cfg = _args("--sweep", "frontier")
    assert cfg.methods == FRONTIER_ARMS and cfg.noise_levels == (0.0, 0.3) and cfg.seeds == tuple(range(10))
    assert cfg.sweep_noise == 0.3 and cfg.warmup.steps == WARMUP_STEPS > 0
    swept = [m for m in cfg.methods if m not in cfg.lr_tie]
    assert sorted(swept) == ["full_ft", "lora", "pissa"]  # every other (PiSSA-family) arm uses PiSSA's rate
    assert set(cfg.lr_tie.values()) == {"pissa"}
    # the budgeted design: every tested arm on seeds 0-9 at noise 0.3; context arms and the noise-0 control on 0-4
    for m in cfg.methods:
        assert cfg.cell_seeds(m, 0.3) == (tuple(range(5)) if m in ("lora", "full_ft") else tuple(range(10)))
    assert cfg.noise_methods == {0.0: ("pissa", "ba_l0.01", "ba_l0.1")}
    assert cfg.cell_seeds("pissa", 0.0) == tuple(range(5))
    cells = sum(len(cfg.cell_seeds(m, nz)) for nz in cfg.noise_levels for m in cfg.noise_methods.get(nz, cfg.methods))
    assert cells == 145
    only30 = _args("--sweep", "frontier", "--noise", "0.3")
    assert only30.noise_levels == (0.3,) and only30.noise_methods == {}
    default = _args()
    assert default.methods == PAPER_ARMS and default.lr_tie == {}
    assert _args("--format_warmup", "0").warmup.steps == 0
    from lab import run

    with pytest.raises(SystemExit) as e:
        run.main(["--format_warmup", "-3"])
    assert e.value.code == 2 and "--format_warmup must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a KL budget needs PiSSA's validation KL: refused before anything runs
        run.main(["--methods", "ba_l0.1", "kl_budget0.5", "--cache_dir", "/nonexistent/never-created"])
    assert e.value.code == 2 and "add pissa to --methods" in capsys.readouterr().err


def test_format_warmup_problems_touch_no_planted_key_and_no_evaluation_problem():
    from lab.run import LabConfig
    from lab.world import World

    world = World(LabConfig().world.replace(noise=0.3))
    sets = world.downstream_sets(300, 50, 50, 40)
    taken = {p.question for part in sets.values() for p in part}
    planted = set(world.planted_at(0.3))
    problems = world.format_warmup_problems(200, planted, taken)
    assert len(problems) == 200 and len({p.question for p in problems}) == 200
    assert not taken & {p.question for p in problems}
    assert not any(k in planted for p in problems for k in world.chain_keys(p.chain))
    assert {p.start for p in problems} >= {"has", "fact1"}  # the downstream format's problem kinds, not one
    assert [p.question for p in world.format_warmup_problems(200, planted, taken)] == [p.question for p in problems]


def test_mean_ci_matches_an_independent_t_interval():
    from scipy import stats

    xs = [3.0, 7.5, 1.0, 4.0, 9.0]
    c = mean_ci(xs)
    n, m = len(xs), sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    assert c["mean"] == pytest.approx(m) and c["lo"] == pytest.approx(m - half) and c["hi"] == pytest.approx(m + half)
    assert math.isnan(mean_ci([2.0])["lo"]) and mean_ci([])["n"] == 0


def _synthetic_results(arms: dict, seeds=range(10)):
    """A results.json-shaped dict: arm -> (accuracy, unseen inheritance, KL, val loss, val KL) centres."""
    rng = random.Random(0)
    runs = []
    for m, (acc, inh, kl, vloss, vkl) in arms.items():
        for s in seeds:
            metrics = {"accuracy": acc + rng.uniform(-0.05, 0.05), "ood_accuracy": 0.02,
                       "retention": {"all": 0.7}, "inheritance": {"inherited": 0.02, "n": 80},
                       "inheritance_unseen": {"inherited": inh + rng.uniform(-0.03, 0.03), "n": 80},
                       "planted_probe": {"inherited": 0.25}, "distinct_2": 0.3,
                       "kl_to_pretrained": kl + rng.uniform(-0.3, 0.3), "val_loss": vloss + rng.uniform(-0.01, 0.01),
                       "val_accuracy": acc, "val_kl_to_pretrained": vkl + rng.uniform(-0.1, 0.1)}
            runs.append({"method": m, "noise": 0.3, "seed": s, "lr": 0.003, "metrics": metrics, "curves": {}})
    meta = {"parameters": 400_000, "steps": 3588, "train_seconds": 450, "corpus": {"wrong_rate": 0.3},
            "clean_probe_accuracy": {"all": 1.0, "add": 1.0, "sub": 1.0, "mul": 1.0, "fact": 1.0},
            "planted_probe": {"inherited": 1.0}}
    return {
        "config": {"methods": list(arms), "seeds": list(seeds), "sweep_noise": 0.3, "noise_levels": [0.3],
                   "eval": {"n_val": 200, "n_val_acc": 100}, "finetune": {"lambda_scale": 1.0},
                   "warmup": {"steps": 200}, "lr_tie": {m: "pissa" for m in arms if m not in ("pissa", "lora")}},
        "chosen_lr": {m: 0.003 for m in arms}, "sweep": [], "runs": runs, "pretrained": {"0.3": meta},
        "pretrained_eval": {}, "wall_seconds": 60.0, "workers": 2, "threads": 1, "warmup": {"0.3": {}},
        "arms": {m: dict(METHODS[m].to_dict(), label=METHODS[m].label, family=METHODS[m].family) for m in arms},
    }


def test_frontier_figure_points_are_the_tables_means(tmp_path):
    from lab.report import LC_HYPOTHESIS, choose_settings, frontier_points, write_report

    arms = {  # accuracy, unseen inheritance, KL, validation loss, validation KL
        "pissa": (0.6, 0.17, 7.0, 0.20, 6.0), "lora": (0.65, 0.20, 8.0, 0.19, 7.0),
        "ba_l0.01": (0.6, 0.12, 4.5, 0.205, 4.0),
        "ba_l1": (0.3, 0.05, 1.0, 0.30, 0.8),  # the least drift, but 30 points of validation accuracy: not admissible
        "ba_l0.1": (0.575, 0.08, 2.0, 0.21, 1.9),  # 2.5 points below PiSSA: just outside the 2-point tolerance
        "ba_release": (0.6, 0.15, 5.0, 0.202, 4.8), "lc_l0.01": (0.6, 0.10, 4.7, 0.204, 4.2),
    }
    results = _synthetic_results(arms)
    agg = write_report(results, str(tmp_path), plots=True)
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
    points = frontier_points(results, agg)
    table = (tmp_path / "results.md").read_text()
    for m in arms:
        per_seed = [r["metrics"] for r in results["runs"] if r["method"] == m]
        acc = [100 * x["accuracy"] for x in per_seed]
        inh = [100 * x["inheritance_unseen"]["inherited"] for x in per_seed]
        kl = [x["kl_to_pretrained"] for x in per_seed]
        assert points[m]["accuracy"]["mean"] == pytest.approx(statistics.fmean(acc))
        assert points[m]["inherited_unseen"]["mean"] == pytest.approx(statistics.fmean(inh))
        assert points[m]["kl_to_pretrained"]["mean"] == pytest.approx(statistics.fmean(kl))
        assert points[m]["inherited_unseen"]["lo"] == pytest.approx(mean_ci(inh)["lo"])
        # the table shows the same means
        row = next(line for line in table.splitlines() if line.startswith(f"| 30% | {METHODS[m].label} |"))
        assert f"{statistics.fmean(acc):.1f} ± {statistics.stdev(acc):.1f}" in row
        assert f"{statistics.fmean(inh):.1f} ± " in row
    choice = choose_settings(results, agg)
    # admissible: validation accuracy at most 2 points below PiSSA's; chosen: the lowest validation KL among them
    assert set(choice["ba_lora"]["admissible"]) == {"ba_l0.01", "ba_release"}
    assert choice["ba_lora"]["chosen"] == "ba_l0.01" and choice["lc"]["chosen"] == "lc_l0.01"
    assert "**Primary**" in table and "BA-LoRA λ1=0.01 − PiSSA" in table
    assert LC_HYPOTHESIS == ("lc_l0.01", "ba_l0.01") and "**Label-consistent**" in table
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["aggregate"]["0.3"]["pissa"]["accuracy"]["ci"]["n"] == 10


def test_strip_plot_from_results_files(tmp_path):
    from lab.report import main, write_report

    paths = []
    for name, acc in (("before", 0.3), ("after", 0.6)):
        out = tmp_path / name
        out.mkdir()
        write_report(_synthetic_results({"pissa": (acc, 0.17, 7.0, 0.2, 6.0)}, seeds=range(5)), str(out), plots=False)
        paths.append(str(out / "results.json"))
    png = tmp_path / "strip.png"
    assert main(["strip", *paths, "--labels", "before", "after", "--out", str(png)]) == 0
    assert png.stat().st_size > 5_000
    with pytest.raises(SystemExit) as e:
        main(["strip", *paths, "--labels", "one", "--out", str(png)])
    assert e.value.code == 2


def test_nlu_lambda_scales():
    spec = importlib.util.spec_from_file_location("nlu_sst2", REPO / "benchmarks" / "nlu_sst2.py")
    nlu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nlu)
    table = nlu.method_table(["pissa", "ba-lora"], [1, 10, 100, 250])
    assert list(table) == ["PiSSA", "BA-LoRA", "BA-LoRA (λ×10)", "BA-LoRA (λ×100)", "BA-LoRA (λ×250)"]
    assert table["PiSSA"] == ("pissa", 0.0, 0.0, 0.0)  # unregularised: once, whatever the scales
    init, *lambdas = table["BA-LoRA (λ×250)"]
    assert init == "pissa" and lambdas == pytest.approx([0.025, 0.1, 0.025])
    with pytest.raises(ValueError, match="--lambda_scale"):
        nlu.method_table(["ba-lora"], [0.0])
    args = nlu.parse_args(["--lambda_scale", "1", "100", "--features", "hidden"])
    assert args.lambda_scale == [1.0, 100.0] and args.features == "hidden"
