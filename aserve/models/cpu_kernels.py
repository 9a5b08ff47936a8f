"""aserve's CPU kernels: C++ built with torch.utils.cpp_extension at first use, for this CPU.

One module from csrc/ (paged attention, and the fused small ops of a decoder layer), built
with `-march=native` (about 40 s, then 0.15 s to load from torch's build cache). Every
kernel has a torch version beside it that runs where the build fails (no compiler, CUDA
tensors) and that tests compare it with.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import threading
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("aserve")

_SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.cpp"))
_HEADERS = sorted(Path(__file__).with_name("csrc").glob("*.h"))

# -fopenmp-simd honours the `omp simd` pragmas: vectorized float reductions without -ffast-math.
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd"]

_build_lock = threading.Lock()
# A build killed midway leaves torch's lock file behind, and every later start would wait on
# it forever; a build takes under a minute, so a lock this old is stale.
_STALE_LOCK_SECONDS = 600


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"  # not Linux: the best there is


def _openmp_flags() -> tuple[list[str], list[str]]:
    """Compile and link flags for at::parallel_for. With torch's OpenMP backend it is a
    `#pragma omp parallel` compiled into the caller, so without -fopenmp it runs on one thread.
    The link names the OpenMP runtime torch itself loaded (pip wheels bundle their own
    libgomp): one thread pool in the process, sized by torch.set_num_threads."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []  # the native backend's at::parallel_for lives in libtorch
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if any(name in Path(path).name for name in ("libgomp", "libiomp", "libomp")):
                return ["-fopenmp"], [path]
    except OSError:
        pass
    return ["-fopenmp"], ["-fopenmp"]


def _extension_name(cflags: list[str], ldflags: list[str]) -> str:
    """`-march=native` code must never run on another CPU, and torch's build cache
    (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) may be shared with one, so the
    name carries a hash of the CPU's flags, the source, the build flags and torch's version."""
    digest = hashlib.sha256()
    sources = [f.read_text() for f in _SOURCES + _HEADERS]
    for part in (_cpu_flags(), *sources, " ".join(cflags + ldflags), torch.__version__):
        digest.update(part.encode())
    return f"aserve_cpu_kernels_{digest.hexdigest()[:12]}"


def _reason(exc: BaseException) -> str:
    """The compiler's error lines rather than the whole build log that torch puts in the message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    text = "; ".join((errors or lines or [type(exc).__name__])[:3])
    return text if len(text) <= 500 else text[:500] + "..."


@functools.cache
def _build() -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import get_default_build_root
        from torch.utils.cpp_extension import load as build

        omp_cflags, ldflags = _openmp_flags()
        cflags = _CFLAGS + omp_cflags
        name = _extension_name(cflags, ldflags)
        build_dir = Path(get_default_build_root()) / name
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = build_dir / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
        cached = any(build_dir.glob("*.so"))
        if not cached:
            log.info("building the CPU kernels for this CPU (once; about a minute on 2 cores) in %s", build_dir)
        start = time.monotonic()
        module = build(name=name, sources=[str(f) for f in _SOURCES], extra_cflags=cflags, extra_ldflags=ldflags,
                       build_directory=str(build_dir), verbose=False)
        log.info("CPU kernels ready in %.1f s", time.monotonic() - start)
        return module
    except Exception as exc:  # a missing compiler or ninja, a compile error, a bad cache...
        log.warning("CPU kernels unavailable, using the torch path: %s", _reason(exc))
        return None


def load() -> ModuleType | None:
    """The kernels' module, built (or loaded from torch's build cache) once per process; None
    if that failed (logged once)."""
    with _build_lock:
        return _build()


def kernel_available() -> bool:
    """Whether the CPU kernels are built and loaded (builds them on the first call)."""
    return load() is not None


def vector_width() -> int:
    """Floats per vector in the kernels' hot loops: 16 where they were built for AVX-512, else 8."""
    module = load()
    assert module is not None, "the CPU kernels are unavailable"
    return module.vector_width()
