"""Resuming from a checkpoint continues exactly, and a checkpoint only appears under its name once complete."""

import os

import pytest
import safetensors.torch
import torch
from conftest import StopAt, cpu_config, gsm8k_rows
from datasets import Dataset
from peft import LoraConfig, get_peft_model_state_dict
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from balora_trl import BALoraSFTTrainer
from balora_trl.checkpoints import BALoraSaveMixin
from balora_trl.reference import REFERENCE_ADAPTER

# Every BA-LoRA term on, weighted enough to move the adapter; the KL needs the restored reference to match.
BALORA = dict(lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, learning_rate=5e-2, max_length=96,
              disable_tqdm=True)


@pytest.fixture(scope="module")
def short_rows():
    """48 real GSM8K rows cut short (one epoch = 12 steps of 4), so steps are fast and no epoch boundary is crossed."""
    rows = gsm8k_rows("train", 48)
    return Dataset.from_list([{"prompt": "Question: " + r["question"][:120] + "\nAnswer:",
                               "completion": " " + r["answer"][:120]} for r in rows])

def draw_another_random_svd(monkeypatch):
    """Make PEFT's randomised PiSSA SVD draw differently, as on another machine (the global RNG is left alone):
    what a resumed run rebuilds at start-up is then not the interrupted run's initial adapter."""
    import peft.tuners.lora.layer as lora_layer

    draw = lora_layer.svd_lowrank

    def other_draw(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(12345)
            return draw(*args, **kwargs)

    monkeypatch.setattr(lora_layer, "svd_lowrank", other_draw)



def make_trainer(make_model, tokenizer, dataset, out, init="pissa", callbacks=None, **cfg):
    config = cpu_config(out, **{**BALORA, "max_steps": 6, "save_strategy": "steps", "save_steps": 3, **cfg})
    return BALoraSFTTrainer(make_model("llama"), config, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init),
                            callbacks=callbacks)


def step_losses(trainer):
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def adapter(trainer, name="default"):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model, adapter_name=name).items()}


def residual_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "base_layer" in k}


def assert_same_tensors(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def test_resume_is_exact_for_pissa_with_every_term(make_model, tokenizer, short_rows, tmp_path):
    full = make_trainer(make_model, tokenizer, short_rows, tmp_path / "full")
    full.train()

    stopped = make_trainer(make_model, tokenizer, short_rows, tmp_path / "run", callbacks=[StopAt(3)])
    stopped.train()
    assert stopped.state.global_step == 3
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]
    checkpoint = run_dir / "checkpoint-3"
    # Resumable form: the trained (residual-parameterised) adapter at the root, the reference beside it.
    assert (checkpoint / REFERENCE_ADAPTER / "adapter_model.safetensors").is_file()
    assert (checkpoint / "rng_state.pth").is_file() and (checkpoint / "trainer_state.json").is_file()
    saved_reference = safetensors.torch.load_file(checkpoint / REFERENCE_ADAPTER / "adapter_model.safetensors")
    assert_same_tensors(saved_reference, adapter(full, REFERENCE_ADAPTER), atol=0)

    resumed = make_trainer(make_model, tokenizer, short_rows, run_dir)
    assert resumed.reference.kind == "initial_adapter"
    resumed.train(resume_from_checkpoint=True)  # finds checkpoint-3 through get_last_checkpoint

    expected, got = step_losses(full), step_losses(resumed)
    assert sorted(expected) == list(range(1, 7)) and sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), f"step {step}"
    assert len({round(v, 4) for v in expected.values()}) > 1  # the loss moved: the comparison is not vacuous

    assert_same_tensors(adapter(resumed), adapter(full), atol=1e-6)
    assert_same_tensors(adapter(resumed, REFERENCE_ADAPTER), adapter(full, REFERENCE_ADAPTER), atol=0)
    assert_same_tensors(residual_weights(resumed), residual_weights(full), atol=0)
    # The reference stays frozen after the Trainer's adapter loading.
    assert not any(p.requires_grad for n, p in resumed.model.named_parameters() if REFERENCE_ADAPTER in n)
    assert all(p.requires_grad for n, p in resumed.model.named_parameters() if ".default." in n)

    # And the final (converted) outputs of both runs are the same adapter.
    full.save_model(str(tmp_path / "full-final"))
    resumed.save_model(str(tmp_path / "resumed-final"))
    a = safetensors.torch.load_file(tmp_path / "full-final" / "adapter_model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "resumed-final" / "adapter_model.safetensors")
    assert_same_tensors(a, b, atol=1e-6)
    assert next(iter(a.values())).shape[0] in (8, 32)  # rank 2r (lora_A [2r, in] or lora_B [out, 2r])


@pytest.mark.slow
def test_resume_restores_the_reference_of_a_randomised_pissa_init(make_model, tokenizer, short_rows, tmp_path,
                                                                  monkeypatch):
    """pissa_niter_* draws a random SVD: a fresh run's initial adapter (and residual) differ from the checkpoint's.

    The reference is restored from the checkpoint and the residual base moved to match it, so the resumed run
    continues the interrupted one (up to float rounding of the residual correction).
    """
    init = "pissa_niter_2"
    full = make_trainer(make_model, tokenizer, short_rows, tmp_path / "full", init=init)
    full.train()
    stopped = make_trainer(make_model, tokenizer, short_rows, tmp_path / "run", init=init, callbacks=[StopAt(3)])
    stopped.train()

    draw_another_random_svd(monkeypatch)
    resumed = make_trainer(make_model, tokenizer, short_rows, tmp_path / "run", init=init)
    monkeypatch.undo()
    fresh_reference = adapter(resumed, REFERENCE_ADAPTER)
    assert any(not torch.allclose(fresh_reference[k], v, atol=1e-4)
               for k, v in adapter(full, REFERENCE_ADAPTER).items())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))

    assert_same_tensors(adapter(resumed, REFERENCE_ADAPTER), adapter(full, REFERENCE_ADAPTER), atol=0)
    assert_same_tensors(residual_weights(resumed), residual_weights(full), atol=1e-5)
    expected, got = step_losses(full), step_losses(resumed)
    for step in range(4, 7):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), f"step {step}"
    assert_same_tensors(adapter(resumed), adapter(full), atol=1e-4)


def test_a_deepspeed_resume_restores_the_initial_adapter_before_wrapping(make_model, tokenizer, short_rows, tmp_path,
                                                                         monkeypatch):
    """DeepSpeed resumes from its own files, which exclude frozen parameters, and never calls the Trainer's
    `_load_from_checkpoint`: the reference adapter and the residual base of a randomised PiSSA init must come from
    the checkpoint's `balora_reference/` before the model is wrapped (the engine then loads the trained adapter).
    Emulated: tests/test_deepspeed.py resumes a real ZeRO-3 run, but its exact PiSSA init comes out the same again."""
    init = "pissa_niter_2"
    stopped = make_trainer(make_model, tokenizer, short_rows, tmp_path / "run", init=init, max_steps=3)
    stopped.train()

    draw_another_random_svd(monkeypatch)
    resumed = make_trainer(make_model, tokenizer, short_rows, tmp_path / "run", init=init, max_steps=3)
    monkeypatch.undo()
    assert any(not torch.allclose(adapter(resumed, REFERENCE_ADAPTER)[k], v, atol=1e-4)
               for k, v in adapter(stopped, REFERENCE_ADAPTER).items())

    # Emulate the DeepSpeed path: everything after BA-LoRA's own step belongs to the Trainer and the engine.
    mro = type(resumed).__mro__
    trainer_train = next(c for c in mro[mro.index(BALoraSaveMixin) + 1:] if "train" in vars(c))
    monkeypatch.setattr(trainer_train, "train", lambda self, *args, **kwargs: "engine resumes here")
    monkeypatch.setattr(resumed, "is_deepspeed_enabled", True)
    (tmp_path / "run" / "checkpoint-3" / "global_step3").mkdir()  # the engine's state, which the resume check wants
    assert resumed.train(resume_from_checkpoint=True) == "engine resumes here"

    assert_same_tensors(adapter(resumed, REFERENCE_ADAPTER), adapter(stopped, REFERENCE_ADAPTER), atol=0)
    assert_same_tensors(residual_weights(resumed), residual_weights(stopped), atol=1e-5)
    assert_same_tensors(resumed._balora_initial_state, adapter(stopped, REFERENCE_ADAPTER), atol=0)


def test_a_checkpoint_killed_mid_save_is_never_picked_up(make_model, tokenizer, short_rows, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = make_trainer(make_model, tokenizer, short_rows, run_dir, max_steps=2, save_steps=1)
    original = trainer._save_rng_state

    def crash_at_step_2(output_dir):
        if trainer.state.global_step == 2:
            raise KeyboardInterrupt("killed while saving checkpoint-2")
        original(output_dir)

    monkeypatch.setattr(trainer, "_save_rng_state", crash_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    names = sorted(os.listdir(run_dir))
    assert "checkpoint-1" in names and "checkpoint-2" not in names
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-1")
    # The half-written checkpoint sits under a name neither get_last_checkpoint nor rotation nor the Hub push uses.
    assert any(name.startswith("_tmp-checkpoint-2") for name in names)

    resumed = make_trainer(make_model, tokenizer, short_rows, run_dir, max_steps=2, save_steps=1)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 2
    names = sorted(os.listdir(run_dir))
    assert "checkpoint-2" in names and not any(name.startswith("_tmp-") for name in names)
    assert (run_dir / "checkpoint-2" / REFERENCE_ADAPTER / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------------------------
# The main job killed after each checkpoint and resumed: the same run as an uninterrupted one (issue 30)
# ------------------------------------------------------------------------------------------------------------------

# 40 rows of 4 = 10 steps per epoch, max_steps 6: the run ends mid-epoch (where transformers would run a 7th step
# when resumed from checkpoint-6), checkpoints at 2, 4 and 6; the cosine λ1 schedule moves every step.
JOB = ["--max_train_samples", "40", "--per_device_train_batch_size", "4", "--embedded_hidden_size", "32",
       "--embedded_num_layers", "1", "--embedded_vocab_size", "512", "--max_length", "256", "--max_steps", "6",
       "--save_strategy", "steps", "--save_steps", "2", "--lambda_consistency_schedule", "cosine",
       "--lambda_consistency", "0.05", "--report_to", "none", "--disable_tqdm", "true"]
WALL_CLOCK = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}


class Killed(Exception):
    """Stands in for a kill right after a checkpoint is written (nothing after it runs: no final save)."""


class KillAfterSave(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(self.step)


def _job(out, logging_steps, *extra, callbacks=None):
    from balora_trl.sft import main, parse_args

    script, training, model = parse_args(["--output_dir", str(out), "--logging_steps", str(logging_steps), *JOB,
                                          *extra])
    return main(script, training, model, callbacks=callbacks)


def _records(path):
    import json

    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK} for line in open(path)]


@pytest.mark.parametrize("logging_steps", [1, 3])
def test_killed_after_every_checkpoint_and_resumed_is_the_uninterrupted_run(tmp_path, logging_steps):
    """logging_steps 1: the λ path and every record step by step; 3: a checkpoint falls between two log records, so
    the loss not yet logged and the metric window must travel in the checkpoint too."""
    import json

    full = _job(tmp_path / "full", logging_steps)
    assert full.global_step == 6
    out = tmp_path / "run"
    for step in (2, 4, 6):
        with pytest.raises(Killed):
            _job(out, logging_steps, *([] if step == 2 else ["--resume_from_checkpoint", "true"]),
                 callbacks=[KillAfterSave(step)])
        assert not (out / "logs.jsonl").exists()  # a run that did not finish publishes no log
    result = _job(out, logging_steps, "--resume_from_checkpoint", "true")  # from checkpoint-6, the last one

    assert result.global_step == 6  # no step past max_steps
    assert result.training_loss == pytest.approx(full.training_loss, rel=0, abs=0)
    a = safetensors.torch.load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = safetensors.torch.load_file(out / "adapter_model.safetensors")
    assert_same_tensors(a, b, atol=0)
    logs_full, logs_run = _records(tmp_path / "full" / "logs.jsonl"), _records(out / "logs.jsonl")
    assert logs_run == logs_full  # every record, none twice: loss, λ path, num_tokens, train_loss
    if logging_steps == 1:
        lambdas = [r["ba_lora/lambda_consistency"] for r in logs_run if "loss" in r]
        assert len(lambdas) == 6 and len(set(lambdas)) == 6  # the cosine λ1 path, step by step
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["train"]["train_loss"] == full.metrics["train_loss"]
    assert not (out / "logs.partial.jsonl").exists()


def test_an_incomplete_or_damaged_checkpoint_is_refused(tmp_path):
    """Each file a resume needs, removed or truncated: one error naming it (transformers would train on from the
    initial adapter without the adapter, restart the lr schedule without the optimizer)."""
    import shutil as sh

    from balora_trl.checkpoints import CheckpointError
    from balora_trl.sft import build_trainer, parse_args

    _job(tmp_path / "full", 2)
    source = tmp_path / "full" / "checkpoint-4"
    cases = {"adapter_model.safetensors": "missing adapter", "optimizer.pt": "missing optimizer",
             "scheduler.pt": "missing scheduler", "trainer_state.json": "no trainer_state.json",
             "balora_reference/adapter_model.safetensors": "missing initial adapter"}
    script, training, model = parse_args(["--output_dir", str(tmp_path / "resumed"), "--logging_steps", "2", *JOB])
    trainer, _ = build_trainer(script, training, model)
    assert trainer.resume_checkpoint(str(source)) == str(source)  # the complete one passes
    for name, message in cases.items():
        broken = tmp_path / name.replace("/", "_")
        sh.copytree(source, broken)
        os.remove(broken / name)
        with pytest.raises(CheckpointError, match=f"{message}.*{name.split('/')[-1]}" if "missing" in message
                           else message):
            trainer.resume_checkpoint(str(broken))
        if name != "trainer_state.json":  # opting in continues (warned); the state is needed whatever
            trainer.args.resume_incomplete_checkpoint = True
            with pytest.warns(UserWarning, match="started afresh"):
                assert trainer.resume_checkpoint(str(broken)) == str(broken)
            trainer.args.resume_incomplete_checkpoint = False
        (broken / name).parent.mkdir(exist_ok=True)
        size = os.path.getsize(source / name)
        with open(source / name, "rb") as f, open(broken / name, "wb") as g:
            g.write(f.read(size // 2))  # truncated: refused even when opted in
        trainer.args.resume_incomplete_checkpoint = True
        with pytest.raises(CheckpointError, match=f"{name.split('/')[-1]} .*damaged"):
            trainer.resume_checkpoint(str(broken))
        trainer.args.resume_incomplete_checkpoint = False
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        trainer.resume_checkpoint(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="holds no checkpoint-N folder"):
        trainer.resume_checkpoint(True)
