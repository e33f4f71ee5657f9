"""Refuse to load an engine the machine has no room for, before trying (not after an OOM).

The 360 article's failure mode: a second model version loaded beside the first runs the host
out of memory. Every manifest carries `memory_bytes` (weights + activation workspace); loaders
compare it with what the device has free. Host RAM here; GPU runtimes pass their own reading.
"""

from __future__ import annotations

from pathlib import Path

from engines.errors import EngineError


class InsufficientMemory(EngineError):
    """The engine's estimated footprint does not fit in the free memory."""


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from the kernel (None where it cannot be read, e.g. not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(artifact: Path, needed: int, available: int | None, *, device: str = "host",
               headroom: float = 0.1) -> None:
    """Raise InsufficientMemory if `needed` (+ headroom) exceeds `available`; unknowns pass."""
    if needed <= 0 or available is None:
        return  # an old manifest without an estimate, or a platform we cannot read
    wanted = int(needed * (1 + headroom))
    if wanted > available:
        raise InsufficientMemory(
            f"{artifact}: the engine needs about {wanted / 2**20:,.0f} MiB "
            f"(estimate {needed / 2**20:,.0f} MiB + {headroom:.0%} headroom) but the {device} "
            f"has {available / 2**20:,.0f} MiB free; free memory (e.g. unload the previous "
            "version first) or use a smaller batch/engine")
