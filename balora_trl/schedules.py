r"""How the BA-LoRA weights λ1, λ2, λ3 move during training: closed-form schedules and the KL controller.

Pure functions of the optimizer step t (``TrainerState.global_step``, the same for every micro-batch of one
optimizer step) and the run length T (``TrainerState.max_steps``), so gradient accumulation and resuming cannot
change them. The names and formulas are those of the authors' released training script (``train.py`` /
``scripts/ba-lora.sh`` of github.com/llm172/BA-LoRA), except :class:`KLController`, which is ours.

λ1 (consistency), ``lambda_consistency_schedule``:

* ``"constant"``: λ1(t) = λ1 (the paper's text).
* ``"cosine"``:   λ1(t) = λ1_end + (λ1 − λ1_end) · ½ (1 + cos(π t / T)), λ1_end = 0.1 · λ1 by default (release).
* ``"adaptive"``: λ1 = λ1_min + (λ1_max − λ1_min) · c,  c = 1 − clamp(H̄_ref / log V, 0, 1), H̄_ref the reference
  model's mean entropy (at the KL temperature) over response positions (release; defaults λ1_min = 0.1 λ1,
  λ1_max = λ1). See :func:`adaptive_lambda`.
* ``kl_target`` set: λ1 is the value of a :class:`KLController` (ours, not in the release).

λ2 and λ3 (diversity, SVD) are both multiplied by a focus factor f(t), ``lambda_focus_schedule``, with
W = ⌊warmup_ratio · T⌋ and R = max(1, ⌊ramp_ratio · T⌋) (the release truncates with ``int``):

* ``"constant"``:         f = 1
* ``"linear_warmup"``:    f = t / W for t < W, then 1
* ``"quadratic_warmup"``: f = (t / W)² for t < W, then 1
* ``"two_phase"``:        f = 0 for t < W, (t − W) / R for W ≤ t < W + R, then 1 (release: W = 0.2 T, R = 0.05 T)
"""

from __future__ import annotations

import math

CONSISTENCY_SCHEDULES = ("constant", "cosine", "adaptive")
FOCUS_SCHEDULES = ("constant", "linear_warmup", "quadratic_warmup", "two_phase")


def cosine_lambda(start: float, end: float, step: int, total_steps: int) -> float:
    """λ(t) = end + (start − end) · ½ (1 + cos(π t / T)); t is clamped to [0, T] (T ≥ 1)."""
    total = max(int(total_steps), 1)
    t = min(max(int(step), 0), total)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t / total))


def focus_factor(schedule: str, step: int, total_steps: int, warmup_ratio: float, ramp_ratio: float) -> float:
    """f(t) multiplying λ2 and λ3 (see the module docstring for the formulas)."""
    if schedule == "constant":
        return 1.0
    total = max(int(total_steps), 1)
    t = max(int(step), 0)
    warmup = int(warmup_ratio * total)
    if schedule == "two_phase":
        ramp = max(int(ramp_ratio * total), 1)
        if t < warmup:
            return 0.0
        return min((t - warmup) / ramp, 1.0)
    if t >= warmup:  # also covers W = 0: no warm-up
        return 1.0
    progress = t / warmup
    if schedule == "linear_warmup":
        return progress
    if schedule == "quadratic_warmup":
        return progress * progress
    raise ValueError(f"Unknown focus schedule {schedule!r}; choose one of {FOCUS_SCHEDULES}.")


def adaptive_lambda(lambda_min: float, lambda_max: float, mean_ref_entropy: float, vocab_size: int) -> float:
    """λ1 = λ_min + (λ_max − λ_min) · (1 − clamp(H̄_ref / log V, 0, 1)).

    A confident reference (low entropy) pulls the policy towards itself harder; a uniform one (H = log V) not at
    all beyond λ_min.
    """
    confidence = 1.0 - min(max(mean_ref_entropy / math.log(vocab_size), 0.0), 1.0)
    return lambda_min + (lambda_max - lambda_min) * confidence


def scheduled_lambdas(cfg, step: int, total_steps: int) -> tuple[float, float, float]:
    """(λ1, λ2, λ3) of a config's constant/cosine λ1 schedule and focus schedule at optimizer step ``step`` (the
    NLG trainer replaces λ1 for ``"adaptive"`` and ``kl_target``, which need measurements)."""
    lambda1 = cfg.lambda_consistency
    if cfg.lambda_consistency_schedule == "cosine":
        end = 0.1 * lambda1 if cfg.lambda_consistency_end is None else cfg.lambda_consistency_end
        lambda1 = cosine_lambda(lambda1, end, step, total_steps)
    focus = focus_factor(cfg.lambda_focus_schedule, step, total_steps, cfg.focus_warmup_ratio, cfg.focus_ramp_ratio)
    return lambda1, cfg.lambda_diversity * focus, cfg.lambda_svd * focus


class KLController:
    r"""λ1 from a KL budget: a proportional multiplicative controller (Ziegler et al. 2019, "Fine-Tuning Language
    Models from Human Preferences", the adaptive KL coefficient TRL's PPO used).

    After each optimizer step with measured mean KL per response token K̄:

        e = clip(K̄ / target − 1, −0.2, 0.2),   λ ← clamp(λ · (1 + e / horizon), λ_min, λ_max)

    ``horizon`` is in optimizer steps: a KL persistently 20 % or more off target changes λ by a factor e (about 2.7)
    every ``5 · horizon`` steps. A step with no response token (K̄ undefined) leaves λ unchanged.
    """

    CLIP = 0.2

    def __init__(self, initial: float, target: float, horizon: float, minimum: float, maximum: float):
        if not horizon > self.CLIP:  # 1 + e/horizon <= 0 for e = -CLIP: λ would drop to its floor, and stay at 0
            raise ValueError(f"KLController: horizon must be > {self.CLIP}, got {horizon!r}.")
        self.target, self.horizon, self.minimum, self.maximum = float(target), float(horizon), float(minimum), float(maximum)
        self.value = min(max(float(initial), self.minimum), self.maximum)
        self.last_kl: float | None = None

    def update(self, mean_kl: float | None) -> float:
        """Feed one optimizer step's measured mean KL; returns the λ1 of the next step."""
        if mean_kl is None or not math.isfinite(mean_kl):
            return self.value
        self.last_kl = float(mean_kl)
        error = min(max(mean_kl / self.target - 1.0, -self.CLIP), self.CLIP)
        self.value = min(max(self.value * (1.0 + error / self.horizon), self.minimum), self.maximum)
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "last_kl": self.last_kl}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.last_kl = state.get("last_kl")


__all__ = ["CONSISTENCY_SCHEDULES", "FOCUS_SCHEDULES", "KLController", "adaptive_lambda", "cosine_lambda",
           "focus_factor", "scheduled_lambdas"]
