"""Where a worker's time goes: py-spy samples the running process, this sums the stacks.

`py-spy record --format raw` writes collapsed stacks (`frame;frame;... count`); we report each
function's share of samples inclusive (anywhere on the stack) and exclusive (on top of it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def start(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("bench: py-spy is not installed (pip install -e '.[dev]'); no profile", file=sys.stderr)
        return None
    command = [spy, "record", "--format", "raw", "--nonblocking", "--rate", "200",
               "--duration", str(int(seconds)), "--pid", str(pid), "--output", str(output)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _name(frame: str) -> str:
    # A raw frame reads `function (path/to/module.py:line)`; keep function and file, drop the line.
    function, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    parts = Path(path).parts
    short = (
        "/".join(parts[-2:])
        if "site-packages" not in parts
        else "/".join(parts[parts.index("site-packages") + 1 :][:2])
    )
    return f"{function} ({short})"


def summarize(raw: Path, top: int = 25) -> str:
    inclusive: Counter[str] = Counter()
    exclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_name(frame) for frame in stack.split(";") if frame]
        for name in set(frames):
            inclusive[name] += count
        if frames:
            exclusive[frames[-1]] += count
    if not total:
        return "no samples\n"
    lines = ["| function | inclusive % | exclusive % |", "|---|---:|---:|"]
    for name, count in inclusive.most_common(top):
        lines.append(f"| `{name}` | {100 * count / total:.1f} | {100 * exclusive[name] / total:.1f} |")
    lines.append("")
    lines.append("Top exclusive (self) time:")
    lines.append("")
    lines += [f"- `{n}`: {100 * c / total:.1f} %" for n, c in exclusive.most_common(12)]
    return "\n".join(lines) + "\n"
