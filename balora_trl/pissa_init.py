"""Pre-initialised PiSSA: factor the base model once, offline, then train from the files with no SVD.

``balora pissa-init --model M --r 8 --lora_alpha 8 --out DIR`` writes

* ``DIR/`` — a transformers model (config, sharded safetensors, tokenizer) holding the residual
  W_res = W − s·B₀A₀ of every targeted layer (s = α/r, or α/√r with rsLoRA) and the untouched other weights;
* ``DIR/pissa_init/`` — a standard PEFT adapter (B₀, A₀), the top-r singular part of each W:
  W = U·S·Vᵀ, B₀ = U_r·√(S_r/s), A₀ = √(S_r/s)·V_rᵀ, so W_res + s·B₀A₀ = W. Its ``adapter_config.json`` says
  ``init_lora_weights: true``, so loading it never re-runs an SVD;
* ``DIR/balora_pissa_init.json`` (copied into ``pissa_init/``) — the original model (id or path, revision,
  commit hash, a fingerprint of its weight files), r, α, the init, the targeted modules and a random ``init_id``
  that pairs the residual with its adapter.

This is the layout of PEFT's PiSSA example and of LLaMA-Factory's ``pissa_init`` (a residual model folder with a
``pissa_init/`` adapter inside); folders they made are read too (without the metadata, the original model is the
adapter's ``base_model_name_or_path``).

Training from ``DIR`` (``--model_name_or_path DIR``, detected by its ``pissa_init/`` folder, or ``--pissa_init``):
the residual is loaded like any checkpoint (so ZeRO-3's ``zero3_init_flag`` and FSDP's
``cpu_ram_efficient_loading`` may shard it while loading: nothing needs the full weights), the adapter is loaded
trainable, and the KL reference is residual + a frozen copy of (B₀, A₀) — the original model, with no second model.
The final save converts the trained adapter to a rank-2r LoRA on the *original* model, exactly as for on-the-fly
PiSSA. With ``load_in_4bit`` the residual is quantised to NF4 (QPiSSA, PiSSA paper section 5): the reference is
then NF4(W_res) + s·B₀A₀, which differs from the original model by NF4's error on the residual — smaller than its
error on W itself (QLoRA's reference), since the residual has the largest singular values removed.

The factorisation is PEFT's own (``LoraLayer.pissa_init``), applied one targeted layer at a time to the loaded
model: peak memory is the model plus one layer's SVD work space.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import sys
import uuid
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .gguf_models import resolve_model

ADAPTER_SUBDIR = "pissa_init"
METADATA_FILE = "balora_pissa_init.json"
FORMAT = "balora-pissa-init/1"
DTYPE_NAMES = {"auto": "auto", "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_PREFIX = "base_model.model."
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


# ----------------------------------------------------------------------------------------------------------------
# The original model's identity
# ----------------------------------------------------------------------------------------------------------------


def _is_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name)


def fingerprint(folder: str) -> dict | None:
    """A content fingerprint of a local model folder: sha256 of its weight index (if any) and of the sorted
    (file name, size) list of its weight files. Cheap (no weight is read) and changes when a weight file is replaced
    by one of another size or the index changes; ``None`` for a folder without weight files."""
    if not os.path.isdir(folder):
        return None
    files = sorted(n for n in os.listdir(folder) if n.endswith(_WEIGHT_SUFFIXES) and not n.startswith("."))
    if not files:
        return None
    sizes = hashlib.sha256(json.dumps([[n, os.path.getsize(os.path.join(folder, n))] for n in files]).encode())
    out = {"weight_files": len(files), "sizes_sha256": sizes.hexdigest()}
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out["index_sha256"] = hashlib.sha256(f.read()).hexdigest()
    return out


def _original_record(model: str, revision: str | None, commit_hash: str | None) -> dict:
    local = _is_local(model)
    name = os.path.abspath(os.path.expanduser(model)) if local else model
    return {"name_or_path": name, "revision": revision, "commit_hash": commit_hash,
            "fingerprint": fingerprint(name) if local else None}


def _weight_files(folder: str) -> dict[str, str]:
    """tensor name -> safetensors file of a local model folder (sharded or not); empty without safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(folder, v) for k, v in json.load(f).get("weight_map", {}).items()}
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return {}
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


def residual_fingerprint(folder: str, modules) -> str | None:
    """sha256 over the residual weights of ``modules`` as stored in ``folder``: per layer its name, dtype, shape and
    first and last two rows (read alone, not the whole tensor). W_res = W − s·B₀A₀ changes in every row when B₀A₀
    does, so another run's residual (another model, another randomised SVD) differs here. ``None`` when ``folder``
    has no safetensors holding them (nothing to check the pair by)."""
    from safetensors import safe_open

    files = _weight_files(folder) if os.path.isdir(folder) else {}
    digest, found = hashlib.sha256(), 0
    for module in sorted(modules):
        key = f"{module}.weight"
        if key not in files:
            continue
        with safe_open(files[key], "pt") as f:
            part = f.get_slice(key)
            rows = part.get_shape()[0]
            head, tail = part[: min(2, rows)], part[max(rows - 2, 0):]
        digest.update(json.dumps([key, str(head.dtype), list(part.get_shape())]).encode())
        for block in (head, tail):
            digest.update(block.contiguous().view(torch.uint8).numpy().tobytes())
        found += 1
    return digest.hexdigest() if found else None


def adapter_fingerprint(state: dict) -> str:
    """sha256 over the initial adapter's tensors (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().to("cpu").contiguous()
        digest.update(json.dumps([key, str(value.dtype), list(value.shape)]).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Writing: balora pissa-init
# ----------------------------------------------------------------------------------------------------------------


def _lora_config(r, lora_alpha, target_modules, init, use_rslora=False, base=None, exclude_modules=None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, lora_dropout=0.0,
                      init_lora_weights=init, use_rslora=use_rslora, base_model_name_or_path=base,
                      exclude_modules=exclude_modules, task_type="CAUSAL_LM")


def resolve_targets(model_config, target_modules, r=8, lora_alpha=8, trust_remote_code=False, exclude_modules=None):
    """``(module names, resolved target_modules)``: the layers PEFT would adapt for ``target_modules`` (``all-linear``,
    a list of names, a regex), found by PEFT itself on a weightless (meta-device) copy of the model."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from .zero3_init import meta_skeleton

    if isinstance(target_modules, str) and "," in target_modules and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    skeleton = meta_skeleton(model_config, trust_remote_code)
    config = _lora_config(r, lora_alpha, target_modules, True, exclude_modules=exclude_modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft_model = get_peft_model(skeleton, config, low_cpu_mem_usage=True)
        except ValueError as error:  # PEFT: "Target modules ... not found in the base model"
            raise ValueError(f"target_modules={target_modules!r}: {str(error).splitlines()[0]}") from None
    prefix = "base_model.model."
    names = [n[len(prefix):] if n.startswith(prefix) else n
             for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]
    resolved = peft_model.peft_config["default"].target_modules
    resolved = sorted(resolved) if isinstance(resolved, (set, list, tuple)) else resolved
    if isinstance(resolved, list):
        # PEFT may spell the resolved set as full module names; the layer names (q_proj, ...) say the same more
        # briefly when they select exactly these modules.
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        if short != resolved and _matching(skeleton, short, exclude_modules) == set(names):
            resolved = short
    return names, resolved


def _matching(model, target_modules, exclude_modules=None) -> set[str]:
    from peft.tuners.tuners_utils import check_target_module_exists

    config = _lora_config(8, 8, target_modules, True, exclude_modules=exclude_modules)
    return {name for name, module in model.named_modules()
            if name and check_target_module_exists(config, name) is True}


def _check_out_dir(out: str, force: bool) -> None:
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file, not a folder.")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out {out} is not empty; pass --force to replace it.")


def _tied_parameters(model) -> set[int]:
    """ids of parameters reachable under more than one name (tied embeddings / heads)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {k for k, v in seen.items() if v > 1}


@torch.no_grad()
def factor_layer(module: nn.Module, r: int, lora_alpha: float, init: str, use_rslora: bool = False):
    """PiSSA-factor one layer in place with PEFT's ``LoraLayer.pissa_init``: its weight becomes W − s·B₀A₀.

    Returns ``(A₀, B₀)`` on the CPU in float32. PEFT wraps the layer in a LoRA layer held by a throw-away parent,
    so the model's own module object keeps its place and only its weight tensor is replaced.
    """
    from peft import inject_adapter_in_model

    holder = nn.Module()
    holder.layer = module
    config = _lora_config(r, lora_alpha, ["layer"], init, use_rslora=use_rslora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notices for GPT-2's Conv1D
        inject_adapter_in_model(config, holder, adapter_name="default")
    lora = holder.layer
    a = lora.lora_A["default"].weight.detach().to("cpu", torch.float32).contiguous()
    b = lora.lora_B["default"].weight.detach().to("cpu", torch.float32).contiguous()
    module.weight.requires_grad_(False)
    del holder, lora
    return a, b


def pissa_init(model: str, out: str, r: int = 8, lora_alpha: float = 8, target_modules="all-linear",
               init: str = "pissa_niter_16", dtype: str = "fp32", revision: str | None = None, force: bool = False,
               use_rslora: bool = False, exclude_modules=None, max_shard_size: str = "5GB",
               trust_remote_code: bool = False, progress: bool = True) -> str:
    """Write ``out`` (residual model + ``pissa_init/`` adapter + metadata) for ``model``; returns ``out``."""
    import safetensors.torch
    from peft import LoraConfig
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import __version__
    from .checkpoints import atomic_directory
    from .preflight import parse_init_lora_weights

    _check_out_dir(out, force)
    from .checkpoints import clean_leftovers

    clean_leftovers(out)  # <out>.tmp-PID of a killed pissa-init: a residual model that never got its name
    try:
        parsed = parse_init_lora_weights(init)
    except Exception as error:  # noqa: BLE001 - PreflightError: same one-line message
        raise ValueError(str(error)) from None
    if not (isinstance(parsed, str) and parsed.startswith("pissa")):
        raise ValueError(f"--init {init!r}: pissa-init computes PiSSA only ('pissa' or 'pissa_niter_<n>').")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPE_NAMES)}.")
    if not (isinstance(r, int) and r > 0):
        raise ValueError(f"--r must be a positive integer, got {r!r}.")

    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=DTYPE_NAMES[dtype],
                                                      trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ValueError(f"Cannot load the model {model!r}: {str(error).splitlines()[0]}") from None
    names, resolved = resolve_targets(loaded.config, target_modules, r, lora_alpha, trust_remote_code,
                                      exclude_modules)
    tied = _tied_parameters(loaded)
    for name in names:
        module = loaded.get_submodule(name)
        if id(module.weight) in tied:
            raise ValueError(f"{name} shares its weight with another layer (tied embeddings): its residual would "
                             "change both; leave it out of --target_modules.")
        if min(module.weight.shape) < r:
            raise ValueError(f"{name} has shape {list(module.weight.shape)}: rank {r} exceeds its smaller side.")

    state = {}
    for name in tqdm(names, desc="PiSSA", unit="layer", disable=not progress):
        a, b = factor_layer(loaded.get_submodule(name), r, lora_alpha, parsed, use_rslora)
        state[f"{_PREFIX}{name}.lora_A.weight"] = a
        state[f"{_PREFIX}{name}.lora_B.weight"] = b

    original = _original_record(model, revision, getattr(loaded.config, "_commit_hash", None))
    metadata = {
        "format": FORMAT,
        "init_id": uuid.uuid4().hex,
        "original": original,
        "init_lora_weights": parsed,
        "r": r,
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "target_modules": resolved,
        "modules": len(names),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "balora_trl_version": __version__,
    }
    adapter_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=resolved, lora_dropout=0.0,
                                use_rslora=use_rslora, exclude_modules=exclude_modules, task_type="CAUSAL_LM",
                                base_model_name_or_path=original["name_or_path"], revision=revision,
                                init_lora_weights=True)  # loading (B₀, A₀) must never re-run an SVD
    adapter_config.inference_mode = False
    with atomic_directory(out, replace_all=True) as staging:
        loaded.save_pretrained(staging, max_shard_size=max_shard_size)
        try:
            AutoTokenizer.from_pretrained(model, revision=revision,
                                          trust_remote_code=trust_remote_code).save_pretrained(staging)
        except (OSError, ValueError) as error:
            warnings.warn(f"No tokenizer saved with the residual model ({error}).", stacklevel=2)
        adapter_dir = os.path.join(staging, ADAPTER_SUBDIR)
        os.makedirs(adapter_dir)
        safetensors.torch.save_file(state, os.path.join(adapter_dir, "adapter_model.safetensors"),
                                    metadata={"format": "pt"})
        adapter_config.save_pretrained(adapter_dir)
        # The pair, from the data as written: each half's metadata vouches for both (see `_check_fingerprints`).
        metadata["residual_sha256"] = residual_fingerprint(staging, names)
        metadata["adapter_sha256"] = adapter_fingerprint(state)
        for folder in (staging, adapter_dir):
            with open(os.path.join(folder, METADATA_FILE), "w") as f:
                json.dump(metadata, f, indent=2)
        with open(os.path.join(staging, "PISSA_INIT.md"), "w") as f:
            f.write(_readme(metadata))
    return out


def _readme(meta: dict) -> str:
    return (
        "# PiSSA residual model (balora pissa-init)\n\n"
        f"The residual W − s·B₀A₀ of {meta['modules']} layers of `{meta['original']['name_or_path']}` "
        f"(init `{meta['init_lora_weights']}`, r = {meta['r']}, lora_alpha = {meta['lora_alpha']}), with the "
        "initial adapter (B₀, A₀) in `pissa_init/`. The residual alone is *not* the original model; residual + "
        "adapter is.\n\n"
        "Train BA-LoRA from it (no SVD at start-up):\n\n"
        f"    balora train --model_name_or_path THIS_FOLDER --lora_r {meta['r']} "
        f"--lora_alpha {meta['lora_alpha']} ...\n\n"
        "The final adapter is converted to a rank-2r LoRA for the original model.\n"
    )


# ----------------------------------------------------------------------------------------------------------------
# Reading: training from a pissa-init folder
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PissaInitFolder:
    """A residual model and its initial PiSSA adapter, as found on disk."""

    residual: str
    adapter: str
    metadata: dict = field(default_factory=dict)
    original: str | None = None  # the model residual + adapter reproduces, when known and reachable
    unreachable_reason: str | None = None  # why the final adapter stays in residual form
    init: str = "pissa"

    @property
    def adapter_config(self):
        from peft import LoraConfig

        return LoraConfig.from_pretrained(self.adapter)

    def initial_state(self) -> dict:
        """(B₀, A₀) as saved (float32 from pissa-init), keyed like ``get_peft_model_state_dict``."""
        from .conversion import _adapter_weights_path, _load_state

        path = _adapter_weights_path(self.adapter)
        if path is None:
            raise ValueError(f"{self.adapter} holds no adapter weights (adapter_model.safetensors).")
        return _load_state(path)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from None


def _hub_pissa_init(repo_id: str, revision: str | None) -> str | None:
    """The local copy of a Hub model's ``pissa_init/`` and metadata (only those small files are fetched), or ``None``
    when the repository has none or cannot be reached (then it loads as an ordinary model, or fails there)."""
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{ADAPTER_SUBDIR}/*", METADATA_FILE])
    except Exception:  # offline and not cached, no such repository, gated, not a repository id: not a pissa-init
        return None
    return local if os.path.isfile(os.path.join(local, ADAPTER_SUBDIR, "adapter_config.json")) else None


def find_pissa_init(model_name_or_path: str | None, pissa_init: str | None = None,
                    revision: str | None = None) -> PissaInitFolder | None:
    """The pissa-init pair named by the arguments, or ``None`` for an ordinary model.

    ``pissa_init`` may be the adapter folder (then ``model_name_or_path`` is the residual model) or a residual
    model folder holding ``pissa_init/``. Without it, ``model_name_or_path`` is a pissa-init pair when it is a
    local folder holding ``pissa_init/adapter_config.json``, or a Hub repository (at ``revision``) holding it: its
    adapter and metadata are fetched, the residual weights load from the Hub as any model's do.
    """
    residual, adapter = model_name_or_path, None
    hub_copy = None
    if pissa_init is None and residual is not None and not _is_local(residual):
        hub_copy = _hub_pissa_init(residual, revision)
        if hub_copy is not None:
            adapter = os.path.join(hub_copy, ADAPTER_SUBDIR)
    if pissa_init is not None:
        if not os.path.isdir(pissa_init):
            raise ValueError(f"pissa_init={pissa_init!r} is not a folder.")
        if os.path.isfile(os.path.join(pissa_init, "adapter_config.json")):
            adapter = pissa_init
            if residual is None:
                parent = os.path.dirname(os.path.abspath(pissa_init))
                if not os.path.isfile(os.path.join(parent, "config.json")):
                    raise ValueError(f"pissa_init={pissa_init!r} is an adapter folder; set model_name_or_path to "
                                     "the residual model it belongs to.")
                residual = parent
        elif os.path.isfile(os.path.join(pissa_init, ADAPTER_SUBDIR, "adapter_config.json")):
            if residual is not None and os.path.abspath(residual) != os.path.abspath(pissa_init):
                raise ValueError(f"pissa_init={pissa_init!r} is a residual model folder, but model_name_or_path="
                                 f"{residual!r} names another model; give one of them.")
            residual, adapter = pissa_init, os.path.join(pissa_init, ADAPTER_SUBDIR)
        else:
            raise ValueError(f"pissa_init={pissa_init!r} holds neither adapter_config.json nor "
                             f"{ADAPTER_SUBDIR}/adapter_config.json.")
    elif residual is not None and os.path.isfile(os.path.join(residual, ADAPTER_SUBDIR, "adapter_config.json")):
        adapter = os.path.join(residual, ADAPTER_SUBDIR)
    if adapter is None:
        return None
    residual = os.path.abspath(residual) if _is_local(residual) else residual  # a Hub id stays one
    adapter = os.path.abspath(adapter)
    meta = _read_json(os.path.join(hub_copy or residual, METADATA_FILE)) if hub_copy or _is_local(residual) else {}
    meta = meta or _read_json(os.path.join(adapter, METADATA_FILE))
    folder = PissaInitFolder(residual=residual, adapter=adapter, metadata=meta,
                             init=meta.get("init_lora_weights") or "pissa")
    _locate_original(folder)
    return folder


def _locate_original(folder: PissaInitFolder) -> None:
    """Set ``folder.original`` when the original model is known and reachable, else ``unreachable_reason``."""
    recorded = folder.metadata.get("original") or {}
    name = recorded.get("name_or_path")
    if not name:
        name = _read_json(os.path.join(folder.adapter, "adapter_config.json")).get("base_model_name_or_path")
        if name and _is_local(name) and os.path.abspath(name) == folder.residual:
            name = None  # the adapter names its residual: the original is not recorded anywhere
    if not name:
        folder.unreachable_reason = "the original model is recorded neither in balora_pissa_init.json nor in the " \
                                    "adapter's base_model_name_or_path"
        return
    if _is_local(name):
        if not os.path.isdir(name):
            folder.unreachable_reason = f"the original model {name} is not there any more"
            return
        recorded_print = recorded.get("fingerprint")
        if recorded_print and fingerprint(name) != recorded_print:
            folder.unreachable_reason = (f"the weight files of the original model {name} changed since pissa-init "
                                         "(fingerprint mismatch)")
            return
    folder.original = name


def _adapter_modules(adapter_dir: str) -> set[str]:
    from .merging import _adapter_shapes

    out = set()
    for key in _adapter_shapes(adapter_dir):
        inner = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if ".lora_" in inner:
            out.add(inner.rsplit(".lora_", 1)[0])
    return out


_UNCHECKED_PAIRS_SAID: set[str] = set()


def _check_fingerprints(folder: PissaInitFolder, adapter_meta: dict) -> None:
    """The pair checked from the data: the residual's weights and the adapter's tensors against the fingerprints
    pissa-init wrote into both halves' ``balora_pissa_init.json``. Either half's metadata vouches for both, so
    removing one file and swapping in another run's ``pissa_init/`` (or only its weights) is caught. A pair with no
    fingerprint at all (PEFT's or LLaMA-Factory's layout, or metadata removed) cannot be checked: said once."""
    residual_meta = (_read_json(os.path.join(folder.residual, METADATA_FILE)) if os.path.isdir(folder.residual)
                     else folder.metadata)
    records = [(os.path.join(folder.residual, METADATA_FILE), residual_meta),
               (os.path.join(folder.adapter, METADATA_FILE), adapter_meta)]
    records = [(path, meta) for path, meta in records if meta.get("residual_sha256") or meta.get("adapter_sha256")]
    if not records:
        message = (f"The PiSSA pair {folder.residual} + {folder.adapter} has no {METADATA_FILE} with weight "
                   "fingerprints (not written by this version of `balora pissa-init`): that the adapter was made "
                   "from this residual cannot be checked; only the shapes are.")
        if message not in _UNCHECKED_PAIRS_SAID:  # check_pair runs twice per job (before and at loading)
            _UNCHECKED_PAIRS_SAID.add(message)
            warnings.warn(message, stacklevel=3)
        return
    state = folder.initial_state()
    modules = {k[len(_PREFIX):] if k.startswith(_PREFIX) else k for k in state}
    modules = {k.rsplit(".lora_", 1)[0] for k in modules if ".lora_" in k}
    adapter_print = adapter_fingerprint(state)
    residual_print = residual_fingerprint(folder.residual, modules) if os.path.isdir(folder.residual) else None
    for path, meta in records:
        if meta.get("adapter_sha256") and meta["adapter_sha256"] != adapter_print:
            raise ValueError(f"PiSSA pair mismatch: the adapter weights in {folder.adapter} are not the ones "
                             f"pissa-init wrote with this pair ({path} records others); use the residual and the "
                             "pissa_init/ of one `balora pissa-init` run.")
        if meta.get("residual_sha256") and residual_print is not None and meta["residual_sha256"] != residual_print:
            raise ValueError(f"PiSSA pair mismatch: the residual weights in {folder.residual} are not the ones the "
                             f"adapter was made with ({path} records others); use the residual and the pissa_init/ "
                             "of one `balora pissa-init` run.")


def check_pair(folder: PissaInitFolder, r: int | None = None, lora_alpha: float | None = None,
               target_modules=None, use_rslora: bool | None = None, use_dora: bool = False,
               trust_remote_code: bool = False, modules_to_save=None) -> None:
    """Raise ``ValueError`` naming the mismatch when the residual, the adapter and the requested LoRA disagree.

    The residual and the adapter must come from the same pissa-init run (``init_id``), fit each other's shapes
    (every adapter tensor against the residual's layers), and agree with the requested r, α, rsLoRA and target
    modules: the residual was made for exactly those (s = α/r enters W − s·B₀A₀).
    """
    from .merging import _load_base_config, validate_base

    config = folder.adapter_config
    adapter_meta = _read_json(os.path.join(folder.adapter, METADATA_FILE))
    ours, theirs = folder.metadata.get("init_id"), adapter_meta.get("init_id")
    if ours and theirs and ours != theirs:
        raise ValueError(f"PiSSA pair mismatch: the adapter {folder.adapter} was made by another pissa-init run "
                         f"(init_id {theirs}) than the residual model {folder.residual} ({ours}).")
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"PiSSA pair mismatch: {folder.adapter} is a {config.peft_type} adapter, not LoRA.")
    _check_fingerprints(folder, adapter_meta)
    if modules_to_save:
        raise ValueError(f"lora_modules_to_save={modules_to_save!r} is not supported when training from a pissa-init "
                         "folder; leave it unset.")
    if use_dora or config.use_dora:
        raise ValueError("DoRA on a pre-initialised PiSSA residual is not supported (it has no LoRA form on the "
                         "original model); set use_dora false.")
    for key in ("r", "lora_alpha", "use_rslora"):
        if key in folder.metadata and folder.metadata[key] != getattr(config, key):
            raise ValueError(f"PiSSA pair mismatch: the residual model was made with {key}={folder.metadata[key]}, "
                             f"the adapter {folder.adapter} has {key}={getattr(config, key)}.")
    residual_config = _load_base_config(folder.residual, trust_remote_code)
    validate_base(folder.adapter, folder.residual, base_config=residual_config, adapter_config=config,
                  trust_remote_code=trust_remote_code)
    have = _adapter_modules(folder.adapter)
    rank = None
    from .merging import _adapter_shapes

    for key, shape in _adapter_shapes(folder.adapter).items():
        if key.endswith(".lora_A.weight"):
            rank = shape[0]
            break
    if rank is not None and rank != config.r and not config.rank_pattern:
        raise ValueError(f"PiSSA pair mismatch: {folder.adapter} says r={config.r} but its tensors have rank {rank}.")
    if r is not None and r != config.r:
        raise ValueError(f"lora_r={r} was requested, but the pissa-init adapter {folder.adapter} has r={config.r}: "
                         f"pass --lora_r {config.r} (or re-run balora pissa-init with --r {r}).")
    if lora_alpha is not None and float(lora_alpha) != float(config.lora_alpha):
        raise ValueError(f"lora_alpha={lora_alpha} was requested, but the pissa-init adapter {folder.adapter} has "
                         f"lora_alpha={config.lora_alpha}: pass --lora_alpha {config.lora_alpha} (the residual "
                         "W − (α/r)·B₀A₀ was made for that scale).")
    if use_rslora is not None and bool(use_rslora) != bool(config.use_rslora):
        raise ValueError(f"use_rslora={use_rslora} was requested, but the pissa-init adapter has "
                         f"use_rslora={config.use_rslora}.")
    if target_modules is not None:
        wanted, _ = resolve_targets(residual_config, target_modules, config.r, config.lora_alpha, trust_remote_code)
        missing, extra = sorted(set(wanted) - have), sorted(have - set(wanted))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no initial adapter for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"the adapter also covers {extra[:3]}{' ...' if len(extra) > 3 else ''}")
            raise ValueError(f"lora_target_modules={target_modules!r} does not match the pissa-init adapter "
                             f"{folder.adapter} ({'; '.join(parts)}); pass the target modules it was made with: "
                             f"{config.target_modules!r}.")


def load_pissa_init(folder: PissaInitFolder, model_init_kwargs: dict | None = None, quantization_config=None,
                    lora_dropout: float | None = None):
    """The residual model with the initial adapter loaded trainable: a ``PeftModel`` ready for the trainer.

    No SVD runs: the adapter config is loaded with ``init_lora_weights=True`` whatever the file says (a folder
    whose adapter config still names PiSSA would otherwise factor the *residual* again). In memory, the adapter is
    then marked as a residual-form PiSSA adapter whose base is the original model, so the trainer keeps a frozen copy
    of (B₀, A₀) as the KL reference and converts the final adapter to a LoRA on the original model. When the
    original is unknown or unreachable, the adapter stays in residual form with the residual folder as its base, and
    the export notes say how to get the original-model form.
    """
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    from .reference import materialise_meta_adapter

    kwargs = dict(model_init_kwargs or {})
    if _is_local(folder.residual):
        kwargs.pop("revision", None)
    check_pair(folder, trust_remote_code=bool(kwargs.get("trust_remote_code")))  # the pair itself must fit
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(folder.residual, **kwargs)
    config = LoraConfig.from_pretrained(folder.adapter)
    config.init_lora_weights = True
    config.inference_mode = False
    if lora_dropout is not None:  # training-only: the residual does not depend on it
        config.lora_dropout = lora_dropout
    from transformers.integrations import is_deepspeed_zero3_enabled

    # Like TRL's own PEFT set-up: under ZeRO-3 the adapters keep the base dtype (DeepSpeed gathers parameters of one
    # dtype at a time); elsewhere PEFT keeps them in float32.
    autocast = not (is_deepspeed_zero3_enabled() and quantization_config is None)
    peft_model = PeftModel.from_pretrained(model, folder.adapter, config=config, is_trainable=True,
                                           autocast_adapter_dtype=autocast)
    state = folder.initial_state()
    materialise_meta_adapter(peft_model, state, peft_model.active_adapter)
    live = peft_model.peft_config[peft_model.active_adapter]
    if folder.original is not None:
        live.init_lora_weights = folder.init  # residual form: the trainer converts it back at save
        live.base_model_name_or_path = folder.original
        commit = (folder.metadata.get("original") or {}).get("commit_hash")
        if commit and not _is_local(folder.original):
            live.revision = commit
        notes = [f"Trained from the pre-initialised PiSSA residual {folder.residual} (balora pissa-init, "
                 f"{folder.init}); converted to a LoRA on the original model {folder.original}."]
    else:
        live.base_model_name_or_path = folder.residual
        message = (f"The original model of the PiSSA residual {folder.residual} is not reachable "
                   f"({folder.unreachable_reason}): the final adapter is saved in residual form, for the residual model. Merge it with `balora merge "
                   f"--adapter OUT --base {folder.residual}`, or convert it to a LoRA on the original with "
                   "balora_trl.conversion.residual_to_lora(config, trained, initial) using the initial adapter in "
                   f"{folder.adapter}.")
        warnings.warn(message, stacklevel=2)
        notes = [message]
    peft_model.balora_initial_state = state  # the reference's (B₀, A₀), exactly as saved (float32)
    peft_model.balora_export_notes = notes
    if quantization_config is not None:
        peft_model.balora_export_notes.append(
            "QPiSSA: the residual was quantised (NF4) for training, so the KL reference NF4(W_res) + s·B₀A₀ differs "
            "from the original model by the quantisation error of the residual; the saved LoRA applies to the "
            "unquantised original.")
    return peft_model


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="balora pissa-init",
        description="Compute PiSSA once, offline: write a residual model (W − s·B₀A₀) with its initial adapter in "
                    "pissa_init/, to train BA-LoRA from with no SVD at start-up (ZeRO-3 / FSDP sharded loading, "
                    "QPiSSA with load_in_4bit).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="The original model: Hub id or local folder.")
    parser.add_argument("--out", required=True, help="Folder to write (must be empty unless --force).")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank r (BA-LoRA's recipes: 8).")
    parser.add_argument("--lora_alpha", type=float, default=8, help="LoRA alpha (s = alpha / r).")
    parser.add_argument("--target_modules", default="all-linear",
                        help="'all-linear', comma-separated module names, or a regex (PEFT's target_modules).")
    parser.add_argument("--init", default="pissa_niter_16",
                        help="'pissa' (exact SVD) or 'pissa_niter_<n>' (randomised SVD with n subspace iterations).")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES),
                        help="dtype of the residual model: the one you train in (BA-LoRA's recipes: fp32, in which "
                             "residual + adapter is the original to rounding; bf16 rounds the residual). 'auto': the "
                             "model's own. The adapter is saved in float32.")
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument("--use_rslora", action="store_true", help="rsLoRA scaling s = alpha / sqrt(r).")
    parser.add_argument("--max_shard_size", default="5GB", help="Largest safetensors shard of the residual model.")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--force", action="store_true", help="Replace a non-empty --out.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    args.model = resolve_model(args.model)  # a .gguf file or short name: its converted folder (gguf_models)
    target = args.target_modules
    if target != "all-linear" and re.fullmatch(r"[\w.,\s-]+", target):
        target = [t.strip() for t in target.split(",") if t.strip()]
    lora_alpha = int(args.lora_alpha) if float(args.lora_alpha).is_integer() else args.lora_alpha
    pissa_init(args.model, args.out, r=args.r, lora_alpha=lora_alpha, target_modules=target, init=args.init,
               dtype=args.dtype, revision=args.revision, force=args.force, use_rslora=args.use_rslora,
               max_shard_size=args.max_shard_size, trust_remote_code=args.trust_remote_code)
    print(f"Residual model and initial adapter written to {args.out} (adapter: {args.out}/{ADAPTER_SUBDIR}).")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
