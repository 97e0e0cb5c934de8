"""Building and loading the fused CPU recurrences' C++ sources (``cpu_fused.cpp``, ``galite_cpu_fused.cpp``).

Each source is a small library of plain C++ (no torch headers) compiled at first use, cached per machine
and loaded through ctypes. Both share one switch (``AGALITE_CPU_FUSED=0``, read at every call, or
``forced``), one cache directory (``AGALITE_CPU_CACHE``, default ``$XDG_CACHE_HOME/agalite_triton`` or
``~/.cache/agalite_triton``), one compiler choice (``CXX``, default ``c++`` then ``g++``) and one list of
flag sets; where no compiler works a library warns once and its calls take the eager reference.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["CppLibrary", "FusedUnavailableWarning", "enabled", "forced", "cpu_call_ok"]

# Flag sets tried in order: the host's ISA first; then portable code; then without OpenMP (one thread).
FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)
COMMON_FLAGS = ["-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]

_override: list[bool] = []
_compiles = [0]  # compiler runs in this process, all libraries (a test checks that shapes never add any)


class FusedUnavailableWarning(RuntimeWarning):
    """The fused CPU recurrence could not be built or loaded; the eager reference runs instead."""


def enabled() -> bool:
    """Whether calls may take a fused path: ``forced`` if set, else ``AGALITE_CPU_FUSED`` != "0"."""
    if _override:
        return _override[-1]
    return os.environ.get("AGALITE_CPU_FUSED", "1") != "0"


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Turn the fused paths on or off inside the block (for side-by-side benchmarks and tests)."""
    _override.append(bool(on))
    try:
        yield
    finally:
        _override.pop()


def cpu_call_ok(keys: torch.Tensor, dones: torch.Tensor | None) -> bool:
    """Whether a call with these inputs may be handed to a fused library (before building it)."""
    if keys.device.type != "cpu" or not enabled() or torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(keys):
        return False  # vmap / grad transforms: no raw memory to hand to the library
    if dones is not None and dones.requires_grad:
        return False  # floating dones with a gradient: only the eager path differentiates them
    return True


def _cache_dir() -> Path:
    explicit = os.environ.get("AGALITE_CPU_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(base) / "agalite_triton"
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    # A read-only home (some CI runners, containers): a per-user directory under the temporary one.
    return Path(tempfile.gettempdir()) / f"agalite_triton-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def _compilers() -> list[str]:
    named = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++"]
    return [path for path in (shutil.which(c) for c in named) if path]


def _cpu_flags() -> str:
    # -march=native code must never be loaded on another CPU (a shared home directory): the build key
    # includes what the CPU reports.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


class CppLibrary:
    """One C++ source, built at first use (or found built) and loaded; ``functions`` are its entry points,
    each taking one pointer to ``args`` (a ctypes.Structure); ``abi_function`` returns ``abi_version``.
    ``headers``: the local headers it includes (part of the build key, so that editing one rebuilds)."""

    def __init__(
        self,
        source: Path,
        abi_function: str,
        abi_version: int,
        functions: tuple[str, ...],
        args: type,
        headers: tuple[Path, ...] = (),
    ) -> None:
        self.source, self.abi_function, self.abi_version, self.headers = source, abi_function, abi_version, headers
        self.functions, self.args = functions, args
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._info: dict[str, Any] = {"state": "not built"}

    def _build(self, compiler: str, flags: list[str], target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: concurrent first uses never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [compiler, *flags, *COMMON_FLAGS, str(self.source), "-o", tmp]
            _compiles[0] += 1
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
                raise RuntimeError(f"exit status {done.returncode}: {(errors or [''])[0].strip()[:300]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, building it first if needed; None (after one warning) where unavailable."""
        if self._info["state"] != "not built":
            return self._lib
        with self._lock:
            if self._info["state"] != "not built":
                return self._lib
            started = time.perf_counter()
            errors = []
            source = b"".join(path.read_bytes() for path in (self.source, *self.headers))
            for compiler in _compilers():
                for flags in FLAG_SETS:
                    key = hashlib.sha256(b"\0".join(
                        [source, compiler.encode(), " ".join(flags + COMMON_FLAGS).encode(), _cpu_flags().encode()]
                    )).hexdigest()[:16]  # fmt: skip
                    target = _cache_dir() / f"{self.source.stem}-{key}.so"
                    try:
                        cached = target.exists()
                        if not cached:
                            self._build(compiler, flags, target)
                        lib = ctypes.CDLL(str(target))
                        version = getattr(lib, self.abi_function)()
                        if version != self.abi_version:
                            raise RuntimeError(f"{target}: ABI version {version}, expected {self.abi_version}")
                    except Exception as exc:  # try the next flag set / compiler, then fall back
                        errors.append(f"{compiler} {' '.join(flags)}: {exc}")
                        continue
                    for name in self.functions:
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = [ctypes.POINTER(self.args)], None
                    self._lib = lib
                    self._info = dict(state="ready", path=str(target), compiler=compiler, flags=flags, cached=cached,
                                      seconds=time.perf_counter() - started, errors=errors)  # fmt: skip
                    return lib
            reason = "; ".join(errors) if errors else "no C++ compiler found (set CXX, or install g++)"
            self._info = dict(state="unavailable", reason=reason, seconds=time.perf_counter() - started)
            warnings.warn(
                f"agalite_triton: the fused CPU recurrence ({self.source.name}) is unavailable, "
                f"using the eager reference ({reason})",
                FusedUnavailableWarning,
                stacklevel=3,
            )
            return None

    def usable(self, keys: torch.Tensor, dones: torch.Tensor | None) -> bool:
        """Whether a reference call with these inputs takes this fused path (and, first time, builds it)."""
        return cpu_call_ok(keys, dones) and self.load() is not None

    def build_info(self) -> dict[str, Any]:
        """Build (or load) the library now and say how it went: ``state`` ("ready" or "unavailable"),
        ``seconds`` (build or load time in this process), ``cached`` (found built), ``path``, ``flags``,
        ``compiler`` or ``reason``, and ``compiles`` (compiler runs in this process so far)."""
        self.load()
        return dict(self._info, compiles=_compiles[0])

    def fresh_build_seconds(self) -> float | None:
        """Seconds a build from scratch takes on this machine (into a temporary directory; nothing is
        loaded): the first-call cost of a process that finds no cached build. None where unavailable."""
        info = self.build_info()
        if info["state"] != "ready":
            return None
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            self._build(info["compiler"], info["flags"], Path(tmp) / "fresh.so")
            return time.perf_counter() - started

    def reset_for_tests(self) -> None:
        with self._lock:
            self._lib, self._info = None, {"state": "not built"}

    def call(self, name: str, args: ctypes.Structure, label: str) -> None:
        """Call entry point ``name`` with ``args``, named ``label`` in profiler traces."""
        lib = self._lib if self._lib is not None else self.load()
        if lib is None:
            raise RuntimeError(f"the fused CPU recurrence is unavailable: {self._info.get('reason')}")
        fn = getattr(lib, name)
        if torch.autograd.profiler._is_profiler_enabled:
            # Named in profiler traces, which do not see foreign calls otherwise (a record costs ~9 us).
            with torch.profiler.record_function(f"agalite_triton::{label}"):
                fn(ctypes.byref(args))
        else:
            fn(ctypes.byref(args))
