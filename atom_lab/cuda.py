"""Run-time compilation of the CUDA sources in `kernels/` through CuPy (NVRTC): no build step.

Works with whichever CuPy wheel is installed (cupy-cuda12x, cupy-cuda13x, ...): only `import cupy`
is used. Without CuPy or a GPU, `kernel_backend_available()` is False and nothing else fails at
import time.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

KERNELS_ENV = "ATOM_LAB_KERNELS"
DEFAULT_OPTIONS = ("--std=c++17", "-DNDEBUG")


class KernelBackendUnavailable(RuntimeError):
    pass


def kernels_dir() -> Path:
    override = os.environ.get(KERNELS_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "kernels"


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """None if CuPy and a CUDA GPU are usable, else the reason they are not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return f"CuPy is not importable ({exc.__class__.__name__}: {exc}); install atom-lab[kernels]"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device is visible"
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    return None


def kernel_backend_available() -> bool:
    return _probe() is None


def require_kernel_backend() -> None:
    reason = _probe()
    if reason is not None:
        raise KernelBackendUnavailable(f"backend=kernel needs CuPy and an NVIDIA GPU: {reason}")


def compute_capability() -> tuple[int, int]:
    import cupy

    cc = cupy.cuda.Device().compute_capability  # e.g. "90"
    return int(cc[:-1]), int(cc[-1])


@functools.lru_cache(maxsize=None)
def load_module(name: str, options: tuple[str, ...] = ()):
    """Compile kernels/<name>.cu once per process (CuPy also caches the binary on disk)."""
    require_kernel_backend()
    import cupy

    path = kernels_dir() / f"{name}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"kernel source {path} not found (set ${KERNELS_ENV} to its folder)")
    major, minor = compute_capability()
    arch = f"--gpu-architecture=sm_{major}{minor}{'a' if major >= 9 else ''}"
    opts = DEFAULT_OPTIONS + (arch, f"-I{kernels_dir()}") + tuple(options)
    return cupy.RawModule(code=source_with_header_digest(path), options=opts, name_expressions=None)


def source_with_header_digest(path: Path) -> str:
    """The source plus a comment hashing its local headers: CuPy's on-disk cache is keyed on the
    source text alone, so without it an edited kernels/*.cuh would reuse a stale binary."""
    code = path.read_text()
    digest = hashlib.sha256()
    for name in sorted(set(re.findall(r'^\s*#include\s+"([^"]+)"', code, flags=re.M))):
        header = path.parent / name
        if header.is_file():
            digest.update(name.encode() + b"\0" + header.read_bytes())
    return code + f"\n// local headers sha256 {digest.hexdigest()}\n"


def get_kernel(module: str, function: str, options: tuple[str, ...] = ()):
    return load_module(module, options).get_function(function)


@functools.lru_cache(maxsize=16)
def _external_stream(ptr: int, device: int):
    import warnings

    import cupy

    with warnings.catch_warnings():  # newer CuPy prefers Stream.from_external; same object
        warnings.simplefilter("ignore", DeprecationWarning)
        return cupy.cuda.ExternalStream(ptr, device)


def torch_current_stream(device_index: int | None = None):
    """torch's current CUDA stream of a device as a CuPy stream, so kernels order with torch ops."""
    import torch

    index = torch.cuda.current_device() if device_index is None else device_index
    return _external_stream(torch.cuda.current_stream(index).cuda_stream, index)
