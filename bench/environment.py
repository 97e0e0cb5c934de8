"""What machine and software a run measured: device name, thread count, versions."""

from __future__ import annotations

import os
import platform
import re
import sys
from typing import Any

import torch

__all__ = ["describe_device", "device_slug", "load_average", "pick_device", "pin_threads", "versions"]


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none): other work on a shared
    machine slows every CPU figure, so each run records how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def pick_device(requested: str | None = None) -> torch.device:
    """``cuda`` when present (or when asked for), else ``cpu``."""
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {requested!r} requested but torch.cuda.is_available() is False")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pin_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count (default: what torch chose, normally the physical cores)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: expected a positive int, got {threads}")
        torch.set_num_threads(threads)
    else:
        torch.set_num_threads(torch.get_num_threads())
    return torch.get_num_threads()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "cpu_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, memory_bytes=props.total_memory, capability=f"{props.major}.{props.minor}")
    else:
        info["name"] = info["cpu_name"]
    return info


def device_slug(info: dict[str, Any]) -> str:
    """Short file-name part: ``cpu-2core`` or the GPU's name, e.g. ``nvidia-h100-80gb-hbm3``."""
    if info["type"] == "cpu":
        return f"cpu-{info['cpu_count']}core"
    return re.sub(r"[^a-z0-9]+", "-", str(info["name"]).lower()).strip("-")


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    import agalite_triton

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "agalite_triton": getattr(agalite_triton, "__version__", None),
        "platform": platform.platform(),
    }
