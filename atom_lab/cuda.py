"""Run-time compilation of the CUDA sources in `kernels/` through CuPy (NVRTC): no build step.

Works with whichever CuPy wheel is installed (cupy-cuda12x, cupy-cuda13x, ...): only `import cupy`
is used. Without CuPy or a GPU, `kernel_backend_available()` is False and nothing else fails at
import time.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import warnings
from pathlib import Path

import numpy as np

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


def _local_headers(path: Path, seen: set[str]) -> None:
    """Names of the local headers `path` includes, directly or through other local headers."""
    for name in re.findall(r'^\s*#include\s+"([^"]+)"', path.read_text(), flags=re.M):
        header = path.parent / name
        if name not in seen and header.is_file():
            seen.add(name)
            _local_headers(header, seen)


def source_with_header_digest(path: Path) -> str:
    """The source plus a comment hashing its local headers (nested ones too): CuPy's on-disk cache
    is keyed on the source text alone, so without it an edited kernels/*.cuh would reuse a stale
    binary."""
    code = path.read_text()
    names: set[str] = set()
    _local_headers(path, names)
    digest = hashlib.sha256()
    for name in sorted(names):
        digest.update(name.encode() + b"\0" + (path.parent / name).read_bytes())
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


# ------------------------------------------------------------------------------------------------
# Launch attributes (sm_90): programmatic dependent launch (a kernel that may start before the
# previous one ends) and thread-block clusters

class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute (cuda.h): id, padding, 64-byte union
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_ubyte * 4), ("value", ctypes.c_ubyte * 64)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuda.h)
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


CLUSTER_DIMENSION = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION: {x, y, z} CTAs
PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.lru_cache(maxsize=1)
def _driver():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _kernel_param(value) -> ctypes._SimpleCData:
    if isinstance(value, np.int32):
        return ctypes.c_int32(int(value))
    if isinstance(value, np.float32):
        return ctypes.c_float(float(value))
    return ctypes.c_uint64(int(value))  # device pointers (np.uint64)


def _launch_ex(kernel, grid, block, args, smem: int, device, attrs: list[_LaunchAttribute],
               what: str) -> None:
    """Launch a CuPy RawKernel on torch's current stream with launch attributes
    (cuLaunchKernelEx through ctypes: CuPy's launch takes no attributes)."""
    import cupy
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    params = [_kernel_param(a) for a in args]
    pointers = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
    grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
    array = (_LaunchAttribute * len(attrs))(*attrs)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem,
                           torch.cuda.current_stream(index).cuda_stream, array, len(attrs))
    with cupy.cuda.Device(index):
        function = kernel.kernel.ptr  # compiles and loads the module on first use
        rc = _driver().cuLaunchKernelEx(ctypes.byref(config), function, pointers, None)
    if rc != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"cuLaunchKernelEx ({what}) failed: error {rc} "
                           f"({(msg.value or b'?').decode()})")


def launch_pdl(kernel, grid, block, args, smem: int, device) -> None:
    """Launch with programmatic stream serialization. The kernel may start before the previous
    kernel in the stream has finished; it must execute griddepcontrol.wait before touching
    anything that kernel writes. Works under CUDA-graph capture (a programmatic edge)."""
    attr = _LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1  # programmaticStreamSerializationAllowed
    _launch_ex(kernel, grid, block, args, smem, device, [attr], "programmatic serialization")


def launch_cluster(kernel, grid, block, args, smem: int, device, cluster_x: int) -> None:
    """Launch in thread-block clusters of cluster_x CTAs along the grid's x (a divisor of it; at
    most 8, the portable size): a cluster's CTAs run at once and share their shared memory."""
    if not 1 <= cluster_x <= 8 or grid[0] % cluster_x:
        raise ValueError(f"cluster_x={cluster_x}: must lie in 1..8 and divide grid x={grid[0]}")
    dims = _LaunchAttribute(id=CLUSTER_DIMENSION)
    ctypes.memmove(dims.value, (ctypes.c_uint * 3)(cluster_x, 1, 1), 12)
    _launch_ex(kernel, grid, block, args, smem, device, [dims], f"clusters of {cluster_x}")


_EARLY_LAUNCH_FAILED = False


def launch_early(kernel, grid, block, args, smem: int, device) -> bool:
    """launch_pdl, or False (once warned, for good) where the driver refuses it: the caller then
    launches plainly, which the kernels' griddepcontrol instructions treat as a no-op."""
    global _EARLY_LAUNCH_FAILED
    if _EARLY_LAUNCH_FAILED:
        return False
    try:
        launch_pdl(kernel, grid, block, args, smem, device)
        return True
    except RuntimeError as exc:  # e.g. a driver without programmatic serialization
        _EARLY_LAUNCH_FAILED = True
        warnings.warn(f"early-start (PDL) launch failed ({exc}); launching plainly from now on")
        return False
