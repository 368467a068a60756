"""Compiling `batched_skip.cu` with NVRTC through cuda-python (no GPU or driver needed), and
the on-disk cubin cache keyed by source, arch, options and NVRTC version."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .batched_skip_ref import require

SOURCE_PATH = Path(__file__).with_name("batched_skip.cu")
# Bumped when the way the cubin is built changes, so stale cache entries are not reused.
_CACHE_FORMAT = "1"
_NVRTC_OPTIONS = ("std=c++17",)


def _cuda_core():
    """(Program, ProgramOptions) from cuda.core, or cuda.core.experimental before 0.4."""
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError:
        from cuda.core.experimental import Program, ProgramOptions
    return Program, ProgramOptions


def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
    except Exception:  # no bindings or no NVRTC library: the compile will say so
        return "unknown"
    return f"{major}.{minor}" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else "unknown"


def _compile_with_nvrtc_bindings(source: str, arch: str) -> bytes:
    """Fallback when cuda.core is missing: the raw NVRTC bindings."""
    from cuda.bindings import nvrtc

    def check(result):
        err = result[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed: {err}")
        return result[1:]

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), b"batched_skip.cu", 0, [], []))
    try:
        opts = [f"-arch={arch}".encode()] + [f"-{o}".encode() for o in _NVRTC_OPTIONS]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(f"NVRTC compile of {SOURCE_PATH.name} failed:\n{log.decode()}")
        (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(arch: str, source: str | None = None) -> bytes:
    """Compile the kernels to a cubin for ``arch`` (e.g. "sm_90") with NVRTC; no GPU needed."""
    require(arch.startswith("sm_") and arch[3:].rstrip("a").isdigit(), f"bad arch {arch!r}")
    source = SOURCE_PATH.read_text() if source is None else source
    try:
        Program, ProgramOptions = _cuda_core()
    except ImportError:
        return _compile_with_nvrtc_bindings(source, arch)
    options = ProgramOptions(arch=arch, std="c++17")
    code = Program(source, "c++", options=options).compile("cubin").code
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    return _compile_with_nvrtc_bindings(source, arch)  # a cuda.core that hands back no bytes


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "adadepth" / "kernels"


def load_or_compile_cubin(arch: str, cache_dir: Path | str | None = None) -> bytes:
    """The cubin for ``arch``, from ``cache_dir`` (default ~/.cache/adadepth/kernels) when the
    source, arch, options and NVRTC version match, else compiled and stored there."""
    source = SOURCE_PATH.read_text()
    key = hashlib.sha256(
        "\0".join((_CACHE_FORMAT, source, arch, *_NVRTC_OPTIONS, _nvrtc_version())).encode()
    ).hexdigest()[:32]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(arch, source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass  # an unwritable cache only costs a recompile next time
    return cubin
