"""Two processes (`accelerate launch`, torch.distributed over gloo on CPU) train the main job for a few steps.
~11 s on idle cores, ~35 s on busy ones: not marked slow."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_work_and_agree(tmp_path):
    record, out = tmp_path / "record", tmp_path / "run"
    record.mkdir()
    env = dict(os.environ, BALORA_TEST_RECORD=str(record), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # `--cpu --num_processes 2` starts a single process in accelerate 1.x unless MPI is set up; `--multi_gpu` uses
    # torchrun, and the job's `--use_cpu true` makes each process join a gloo (MULTI_CPU) group instead of NCCL.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(HERE / "multiprocess_worker.py"),
        "--use_cpu", "true", "--output_dir", str(out), "--max_steps", "3", "--per_device_train_batch_size", "2",
        "--max_train_samples", "40", "--embedded_hidden_size", "32", "--embedded_num_layers", "1",
        "--embedded_vocab_size", "512", "--max_length", "256", "--report_to", "none",
        "--logging_steps", "1",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]

    ranks = [json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and all("MULTI_CPU" in r["distributed_type"] for r in ranks)

    # Different data: each rank collated its own examples (3 steps x 2, plus the batch the loader prefetches), and no
    # example went to both.
    seen = [{tuple(ids) for ids in r["seen"]} for r in ranks]
    assert len(ranks[0]["seen"]) >= 6 and len(ranks[1]["seen"]) >= 6
    assert len(seen[0]) >= 6 and len(seen[1]) >= 6 and not seen[0] & seen[1]

    # Identical adapters: DDP kept every trainable weight equal across ranks, and training changed them.
    adapters = [torch.load(record / f"adapter_rank{r}.pt") for r in (0, 1)]
    assert adapters[0]["after"].keys() == adapters[1]["after"].keys() and adapters[0]["after"]
    for name, weight in adapters[0]["after"].items():
        assert torch.equal(weight, adapters[1]["after"][name]), name
    assert any(not torch.equal(adapters[0]["before"][n], w) for n, w in adapters[0]["after"].items())

    # Only rank 0 wrote the output: it wrote the adapter folder's files, rank 1 wrote nothing under output_dir.
    assert ranks[1]["writes"] == []
    written = {Path(w.split(" ", 1)[1]).name for w in ranks[0]["writes"]}
    # the log is written as logs.partial.jsonl while training and renamed to logs.jsonl once the run has saved
    assert {"prompt_template.json", "training_metrics.json", "logs.partial.jsonl"} <= written
    assert (out / "logs.jsonl").is_file() and not (out / "logs.partial.jsonl").exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "base_model" / "config.json").is_file()
