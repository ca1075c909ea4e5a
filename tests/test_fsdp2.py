"""FSDP on a CPU: what can run for real, and BA-LoRA's own code under torch's FSDP2 sharding.

accelerate (1.16) cannot run FSDP on a CPU: with ``fsdp_sync_module_states`` it refuses ("not supported on cpu"),
without it it silently falls back to plain data parallel. So a CPU cannot run ``accelerate launch`` with
configs/accelerate/fsdp*.yaml (FSDP1, flat parameters, ``cpu_ram_efficient_loading``): those stay GPU-only and
untested here. torch's own FSDP2 (``fully_shard``) does run on 2 CPU processes over gloo, and shards a PEFT model
the way accelerate's FSDP2 plugin does (per decoder layer, then the root). tests/fsdp2_worker.py shards the
trainer's PiSSA model so and checks, on every rank, that the BA-LoRA loss and the adapter gradients FSDP2
reduce-scatters equal the unsharded loss and the rank-averaged gradients:

* the reference pass (the frozen initial adapter switched in, its parameters sharded with the layer's);
* the fused head reading the LM-head weight directly: with the head in the root's unit it is unsharded for the
  forward; with the head sharded on its own it is a DTensor, gathered by ``balora_trl.head.head_parameters`` (``full_tensor``);
* the plain head calling the LM head as a module (with the head sharded on its own: FSDP2's hooks gather it);
* the SVD term on the response logits, the entropy, and the real gloo gathers of the metrics.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_balora_loss_and_gradients_under_fsdp2_match_unsharded(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(HERE / "fsdp2_worker.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["results"].keys() == {"plain/root", "plain/head", "fused/root", "fused/head"}
    for rank in ranks:
        for name, result in rank["results"].items():
            assert result["tokens"] > 0 and result["kl"] and result["kl"][-1] > 0, name  # the KL term is live
            assert result["sharded_parameters"] > 0.5 * result["parameters"], name  # really sharded
            assert result["loss_sharded"] == pytest.approx(result["loss"], rel=1e-5), name
            assert result["grad_max_diff"] <= 1e-5 * max(1.0, result["grad_max"]), name
    # Each rank trained on its own examples: the losses differ between ranks.
    assert ranks[0]["results"]["plain/root"]["loss"] != ranks[1]["results"]["plain/root"]["loss"]
