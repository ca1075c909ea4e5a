"""balora_trl.schedules: every λ schedule against its closed form at t = 0, at the warm-up and ramp boundaries,
mid-way and at the end; the KL controller's update rule; config validation of the schedule fields."""

import math

import pytest
from conftest import cpu_config

from balora_trl import BALoraConfig, BALoraNLUConfig
from balora_trl.schedules import KLController, adaptive_lambda, cosine_lambda, focus_factor

T = 200  # steps in the run


# ------------------------------------------------------------------------------------------------------------------
# λ1: cosine
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 1, 50, 100, 137, 199, 200])
def test_cosine_lambda_matches_its_closed_form(t):
    start, end = 0.025, 0.0025
    # ½(1 + cos x) = cos²(x / 2): an independent form of the same curve.
    expected = end + (start - end) * math.cos(math.pi * t / (2 * T)) ** 2
    assert cosine_lambda(start, end, t, T) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_cosine_lambda_endpoints():
    assert cosine_lambda(0.025, 0.0025, 0, T) == pytest.approx(0.025, rel=1e-12)
    assert cosine_lambda(0.025, 0.0025, T // 2, T) == pytest.approx((0.025 + 0.0025) / 2, rel=1e-12)
    assert cosine_lambda(0.025, 0.0025, T, T) == pytest.approx(0.0025, rel=1e-12)
    assert cosine_lambda(0.025, 0.0025, T + 5, T) == pytest.approx(0.0025, rel=1e-12)  # past the end: stays there
    values = [cosine_lambda(1.0, 0.1, t, T) for t in range(T + 1)]
    assert all(a > b for a, b in zip(values, values[1:]))  # strictly decreasing


# ------------------------------------------------------------------------------------------------------------------
# λ2, λ3: focus factor (W = ⌊0.2·200⌋ = 40, R = ⌊0.05·200⌋ = 10)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,expected", [(0, 0.0), (1, 1 / 40), (20, 0.5), (39, 39 / 40), (40, 1.0), (41, 1.0),
                                        (T, 1.0)])
def test_linear_warmup(t, expected):
    assert focus_factor("linear_warmup", t, T, 0.2, 0.05) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t,expected", [(0, 0.0), (10, 1 / 16), (20, 0.25), (39, (39 / 40) ** 2), (40, 1.0),
                                        (T, 1.0)])
def test_quadratic_warmup(t, expected):
    assert focus_factor("quadratic_warmup", t, T, 0.2, 0.05) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t,expected", [(0, 0.0), (39, 0.0), (40, 0.0), (41, 0.1), (45, 0.5), (49, 0.9), (50, 1.0),
                                        (120, 1.0), (T, 1.0)])
def test_two_phase(t, expected):
    assert focus_factor("two_phase", t, T, 0.2, 0.05) == pytest.approx(expected, rel=1e-12)


def test_focus_edge_cases():
    assert focus_factor("constant", 0, T, 0.2, 0.05) == 1.0
    # No warm-up at all: full weight from step 0.
    for name in ("linear_warmup", "quadratic_warmup"):
        assert focus_factor(name, 0, T, 0.0, 0.05) == 1.0
    # The ramp is at least one step: off for t < W, on from W + 1.
    assert [focus_factor("two_phase", t, 10, 0.5, 0.01) for t in (4, 5, 6)] == [0.0, 0.0, 1.0]
    # W is truncated like the release's int(ratio · T): ⌊0.25 · 10⌋ = 2.
    assert focus_factor("linear_warmup", 1, 10, 0.25, 0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two_phase"):
        focus_factor("cubic_warmup", 1, 10, 0.25, 0.0)


# ------------------------------------------------------------------------------------------------------------------
# adaptive λ1 and the KL controller
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("entropy", [0.0, 1.0, 5.5, math.log(512), 20.0, -1.0])
def test_adaptive_lambda(entropy):
    low, high, vocab = 0.0025, 0.025, 512
    confidence = 1.0 - min(1.0, max(0.0, entropy / math.log(vocab)))
    assert adaptive_lambda(low, high, entropy, vocab) == pytest.approx(low + (high - low) * confidence, rel=1e-12)
    assert adaptive_lambda(low, high, 0.0, vocab) == pytest.approx(high)  # a certain reference: λ1_max
    assert adaptive_lambda(low, high, math.log(vocab), vocab) == pytest.approx(low)  # a uniform one: λ1_min


def test_kl_controller_update_rule():
    c = KLController(initial=0.1, target=0.5, horizon=4, minimum=0.0, maximum=10.0)
    assert c.update(0.6) == pytest.approx(0.1 * (1 + 0.2 / 4))  # 20 % over: error 0.2
    assert c.update(0.55) == pytest.approx(0.1 * (1 + 0.2 / 4) * (1 + 0.1 / 4))
    before = c.value
    assert c.update(100.0) == pytest.approx(before * 1.05)  # clipped at +0.2
    before = c.value
    assert c.update(0.0) == pytest.approx(before * 0.95)  # clipped at −0.2
    before = c.value
    assert c.update(None) == before and c.update(float("nan")) == before  # nothing measured: unchanged
    state = c.state_dict()
    other = KLController(initial=0.1, target=0.5, horizon=4, minimum=0.0, maximum=10.0)
    other.load_state_dict(state)
    assert other.value == c.value and other.last_kl == c.last_kl == 0.0


def test_kl_controller_bounds():
    c = KLController(initial=5.0, target=0.1, horizon=1, minimum=0.01, maximum=1.0)
    assert c.value == 1.0  # the start is clamped into the bounds
    for _ in range(100):
        c.update(1e3)
    assert c.value == 1.0
    for _ in range(100):
        c.update(0.0)
    assert c.value == 0.01


# ------------------------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (dict(lambda_consistency_schedule="linear"), "'constant', 'cosine', 'adaptive'"),
    (dict(lambda_focus_schedule="cubic"), "'two_phase'"),
    (dict(focus_warmup_ratio=-0.1), "focus_warmup_ratio"),
    (dict(focus_ramp_ratio=1.5), "focus_ramp_ratio"),
    (dict(entropy_top_k=-1), "entropy_top_k"),
    (dict(svd_normalizer="l2"), "'sum', 'frobenius'"),
    (dict(lambda_consistency_min=0.5, lambda_consistency_max=0.1), "must not exceed"),
    (dict(lambda_consistency_end=-1.0), "lambda_consistency_end"),
    (dict(kl_target=0.1, lambda_consistency=0.025, lambda_consistency_max=1e30), "`lambda_consistency_max` = 1e"),
    (dict(lambda_consistency_schedule="cosine", lambda_consistency_end=2.0 ** 25), "`lambda_consistency_end` = 3"),
    (dict(kl_target=0.0), "kl_target"),
    (dict(kl_target=0.1, lambda_consistency_schedule="cosine"), "controller"),
    (dict(kl_target=0.1, lambda_consistency=0.0), "starting"),
    (dict(kl_horizon=0), "kl_horizon"),
    (dict(lambda_consistency_schedule="adaptive", lambda_consistency=0.0), "adaptive"),
    # Defaults of the adaptive bounds are 0.1·λ1 and λ1: a max below them is out of order.
    (dict(lambda_consistency_schedule="adaptive", lambda_consistency_max=1e-6), "must not exceed"),
])
def test_bad_schedule_settings_fail_at_config_time(bad, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        cpu_config(tmp_path, **bad)


def test_defaults_are_the_paper_and_bounds_fill_in(tmp_path):
    cfg = cpu_config(tmp_path)
    assert (cfg.lambda_consistency_schedule, cfg.lambda_focus_schedule, cfg.entropy_top_k, cfg.svd_normalizer,
            cfg.kl_t2_scaling, cfg.kl_target) == ("constant", "constant", 0, "sum", False, None)
    assert cpu_config(tmp_path, lambda_consistency=0.025).consistency_bounds == pytest.approx((0.0025, 0.025))
    assert cpu_config(tmp_path, lambda_consistency=0.025, kl_target=0.1).consistency_bounds == pytest.approx((2.5e-4, 10.0))
    assert isinstance(cfg, BALoraConfig)


def test_nlu_config_takes_the_schedules_but_not_adaptive(tmp_path):
    cfg = BALoraNLUConfig(str(tmp_path), lambda_consistency_schedule="cosine", lambda_focus_schedule="two_phase",
                          svd_normalizer="frobenius", use_cpu=True, report_to="none")
    assert cfg.lambda_focus_schedule == "two_phase"
    with pytest.raises(ValueError, match="'constant', 'cosine'"):
        BALoraNLUConfig(str(tmp_path), lambda_consistency_schedule="adaptive", use_cpu=True, report_to="none")
    with pytest.raises(ValueError, match="lambda_focus_schedule"):
        BALoraNLUConfig(str(tmp_path), lambda_focus_schedule="x", use_cpu=True, report_to="none")
