"""CPU and memory of a process, read from /proc (Linux only, like the rest of the bench)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


@dataclass
class CpuMeter:
    """CPU use of one process over a window, as a percentage of one core."""

    pid: int
    _start_cpu: float = 0.0
    _start_wall: float = 0.0

    def start(self, wall: float) -> None:
        self._start_cpu, self._start_wall = cpu_seconds(self.pid), wall

    def percent(self, wall: float) -> float:
        elapsed = wall - self._start_wall
        return 100.0 * (cpu_seconds(self.pid) - self._start_cpu) / elapsed if elapsed > 0 else 0.0


def machine() -> dict[str, str]:
    import platform

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )  # fmt: skip
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
