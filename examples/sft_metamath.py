"""BA-LoRA fine-tuning, the project's main job.

    python examples/sft_metamath.py                                   # embedded default: offline, ~2 min on 2 CPU cores
    python examples/sft_metamath.py --config configs/metamath_llama2_7b.yaml          # a paper recipe (GPU)
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml \\
        examples/sft_metamath.py --config configs/metamath_mistral_7b.yaml --gradient_accumulation_steps 1

Arguments are parsed like `trl sft`: every field of BALoraConfig (TRL's SFTConfig plus the BA-LoRA lambdas),
trl.ModelConfig and BALoraScriptArguments, from a YAML `--config` and/or the command line (the command line wins).
`--help` lists them all.

With no model named, the job builds its *embedded default*: a small randomly initialised Llama-shaped model
(hidden 128, 4 layers, ~1.5M parameters) and a byte-level BPE tokenizer trained on the MetaMathQA-format GSM8K
sample shipped in balora_trl/data/ (2000 rows), then fine-tunes it with BA-LoRA (PiSSA init, r = 8, the paper's
lambdas, Alpaca prompt, loss on the responses) for one epoch on that sample. It exercises the whole pipeline — data
conversion, PiSSA, the pretrained reference, the three regularisers, logging, saving — offline; it says nothing
about accuracy: the base is not a pretrained language model.

Output (output_dir, ./outputs/sft_metamath by default): the adapter (adapter_model.safetensors, adapter_config.json),
the tokenizer, prompt_template.json, logs.jsonl (every log record, the ba_lora/* terms included),
training_metrics.json (final metrics and the whole log history), trainer_state.json, TensorBoard runs/ (when
tensorboard is installed) and, for the embedded default, base_model/ (the base the adapter was trained on).

A mistake in the arguments or the data (a missing, empty or malformed file, unknown columns, an empty completion, a
model folder that does not exist) stops the job before training with one `error: ...` line and exit code 2;
BALORA_DEBUG=1 shows the traceback.
"""

import os
import sys

if not any(a.split("=")[0] in ("--config", "--model_name_or_path", "--dataset_name") for a in sys.argv[1:]):
    # The embedded default needs nothing from the Hub: make sure nothing is even looked up (set before the
    # Hugging Face libraries are imported, which read it once).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from balora_trl.sft import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(prog="examples/sft_metamath.py"))
