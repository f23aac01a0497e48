"""What this machine's CPU is, as far as int8 kernels care: its name and its dot-product flags."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

# x86 flags of the int8 dot-product instructions that accumulate u8 x s8 in int32 without saturation.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SATURATING_FLAGS = ("avx2", "avx512bw")  # vpmaddubsw: u8 x s8 pairs summed into a saturating int16


def cpu_needs_reduced_range(cpuinfo: str | None = None) -> bool:
    """True for an x86 CPU with AVX2/AVX-512BW but no VNNI, from /proc/cpuinfo (or the given text).
    False for VNNI, non-x86 CPUs and when the flags cannot be read."""
    flags: set[str] = set()
    for key, value in _fields(_proc_cpuinfo() if cpuinfo is None else cpuinfo):
        if key == "flags":
            flags.update(value.split())
    return not flags & set(VNNI_FLAGS) and bool(flags & set(SATURATING_FLAGS))


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo), else what `platform` knows."""
    for key, value in _fields(_proc_cpuinfo() if cpuinfo is None else cpuinfo):
        if key == "model name":
            return value.strip()
    return platform.processor() or platform.machine()


def _fields(text: str):
    for line in text.splitlines():
        key, _, value = line.partition(":")
        yield key.strip(), value


@lru_cache(maxsize=1)
def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
