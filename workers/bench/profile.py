"""`farmiq-edge bench ingest --profile`: where each pipeline process spends its time, by py-spy.

py-spy samples a running interpreter from outside; with --nonblocking it
never pauses the process, so the pipeline runs unmodified (py-spy's own CPU
shows up as "other" in the CPU table, and slows a 2-core box a little). Only
threads that are not idle are sampled, so the shares are of busy time. A
frame is `function (file)`: line numbers are dropped, so a function's samples
are not split by the line it was on. Time inside a C extension (psycopg2,
pydantic-core) counts to the Python frame that called it (no --native: it
would need to stop the process).
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

RATE = 200  # samples per second
INSTALL_HINT = "py-spy is not installed: .venv/bin/pip install -e '.[bench]'  (or: pip install py-spy)"
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*?)(?::\d+)?\)$")
# At the bottom of every thread's or the main module's stack: they would fill
# the top of the inclusive table and say nothing.
PLUMBING = {"Thread._bootstrap (threading.py)", "Thread._bootstrap_inner (threading.py)",
            "Thread.run (threading.py)", "_run_module_as_main (<frozen runpy>)",
            "_run_code (<frozen runpy>)"}


def find_py_spy() -> str | None:
    """py-spy beside this interpreter (the venv's, even when not on PATH), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def frame_name(frame: str) -> str:
    """`dumps (json/__init__.py:231)` → `dumps (json/__init__.py)`."""
    m = _FRAME.match(frame)
    return f"{m['function']} ({m['file']})" if m else frame


@dataclass
class Summary:
    samples: int
    inclusive: list[tuple[str, int]]  # frame, samples with it anywhere on the stack
    leaves: list[tuple[str, int]]     # frame, samples with it on top of the stack


def summarize(raw: str, top: int = 15, leaves: int = 10) -> Summary:
    """Summarize py-spy's `--format raw` output: one `frame;frame;…;frame COUNT` line per stack."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [frame_name(f) for f in stack.split(";")]
        total += n
        leaf[frames[-1]] += n
        for f in dict.fromkeys(frames):  # once per sample, however deep the recursion; outermost first
            if f not in PLUMBING:
                inclusive[f] += n
    return Summary(total, inclusive.most_common(top), leaf.most_common(leaves))


def table(name: str, pid: int, seconds: int, summary: Summary, width: int = 90) -> list[str]:
    if not summary.samples:
        return [f"  profile {name} [{pid}]: no busy samples in {seconds} s (idle)"]
    out = [f"  profile {name} [{pid}]: {summary.samples:,} busy samples in {seconds} s at {RATE}/s "
           f"(≈ {summary.samples / (RATE * seconds):.2f} threads busy)",
           "    inclusive"]
    out += [f"    {n / summary.samples:6.1%}  {_cut(frame, width)}" for frame, n in summary.inclusive]
    out.append("    leaf (self)")
    out += [f"    {n / summary.samples:6.1%}  {_cut(frame, width)}" for frame, n in summary.leaves]
    return out


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


class Profiler:
    """One `py-spy record` per target process, for a fixed window; tables once they end."""

    def __init__(self, py_spy: str, out_dir: Path) -> None:
        self.py_spy, self.out_dir = py_spy, out_dir
        self.runs: list[tuple[str, int, Path, subprocess.Popen[bytes]]] = []
        self.seconds = 0

    @property
    def started(self) -> bool:
        return bool(self.runs)

    def start(self, targets: dict[str, int], seconds: float) -> None:
        self.seconds = max(1, math.ceil(seconds))  # py-spy takes whole seconds
        for name, pid in targets.items():
            out = self.out_dir / f"py-spy-{pid}.txt"
            with open(out.with_suffix(".log"), "wb") as log:
                proc = subprocess.Popen([self.py_spy, "record", "--format", "raw", "--nonblocking",
                                         "-r", str(RATE), "-d", str(self.seconds), "-p", str(pid),
                                         "-o", str(out)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.runs.append((name, pid, out, proc))

    def finish(self) -> list[str]:
        """Wait for every py-spy to end; the tables (or why a process has none)."""
        lines: list[str] = []
        for name, pid, out, proc in self.runs:
            try:
                proc.wait(self.seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                lines += table(name, pid, self.seconds, summarize(out.read_text(errors="replace")))
            else:
                said = out.with_suffix(".log").read_text(errors="replace").strip().splitlines()
                lines.append(f"  profile {name} [{pid}]: py-spy exited {proc.returncode}: "
                             + (said[-1] if said else "no output"))
        self.runs.clear()
        return lines

    def stop(self) -> None:
        """Interrupted: end the py-spy processes still running."""
        for _, _, _, proc in self.runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
