"""Where `farmiq-edge up` puts its children's output: one file per process.

A honcho printer (honcho.printer.Printer's `write(message)` interface): each
line a process prints is appended to `<logs_dir>/<process>.log`, honcho's own
lines (started, stopped, signals) to `system.log`; with `echo` set they are
also passed on to another printer (the terminal).
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

from honcho.printer import Printer


class ProcessLogs:
    def __init__(self, logs_dir: Path, echo: Printer | None = None) -> None:
        self.logs_dir = logs_dir
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.echo = echo
        self._files: dict[str, IO[str]] = {}
        self.width = 0  # honcho's Manager sets this (its prefix column width)

    def write(self, message: Any) -> None:
        data = message.data.decode("utf-8", "replace") if isinstance(message.data, bytes) else message.data
        out = self._file(message.name or "system")
        stamp = message.time.strftime("%Y-%m-%dT%H:%M:%S")
        for line in data.splitlines():
            out.write(f"{stamp} {line}\n")
        out.flush()
        if self.echo is not None:
            self.echo.width = self.width
            self.echo.write(message)

    def path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, name: str) -> IO[str]:
        if name not in self._files:
            self._files[name] = open(self.path(name), "a", encoding="utf-8")
        return self._files[name]
