"""Runs the standalone SDK apps under tests/interop/apps as subprocesses and reads their output.

Used by the seed-scenario tests: each app is started with `Hub.env()`, so it trusts the hub
through environment variables only, exactly like an unchanged user app would.
"""

from __future__ import annotations

import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

APPS_DIR = Path(__file__).resolve().parent / "apps"


class App:
    """A running app; a reader thread collects stdout lines so waits never block forever."""

    def __init__(self, script: str, env: dict[str, str], args: list[str] | None = None) -> None:
        self.script = APPS_DIR / script
        self.proc = subprocess.Popen(
            [sys.executable, str(self.script), *(args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._readers:
            t.start()

    def _pump(self, stream, is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if is_stdout:
                self.lines.append(line)
                self._q.put(line)
            else:
                self.err_lines.append(line)
        if is_stdout:
            self._q.put(None)

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Waits for a stdout line matching pattern; fails with the app's output otherwise."""
        rx = re.compile(pattern)
        for line in list(self.lines):
            m = rx.search(line)
            if m:
                return m
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.script.name}: no line /{pattern}/ within {timeout}s\n{self.output()}"
                )
            try:
                line = self._q.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                # EOF: give the process a moment so the exit code shows in the message.
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise AssertionError(
                    f"{self.script.name} ended (rc={self.proc.poll()}) before /{pattern}/\n{self.output()}"
                )
            m = rx.search(line)
            if m:
                return m

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.terminate()
            raise AssertionError(
                f"{self.script.name} did not finish within {timeout}s\n{self.output()}"
            ) from None
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def output(self) -> str:
        return (
            f"--- {self.script.name} stdout ---\n" + "\n".join(self.lines) + "\n"
            f"--- {self.script.name} stderr (last 60 lines) ---\n" + "\n".join(self.err_lines[-60:])
        )


def run_app(script: str, env: dict[str, str], timeout: float, args: list[str] | None = None) -> App:
    """Runs an app to completion (bounded) and returns it for inspection."""
    app = App(script, env, args)
    app.wait(timeout)
    return app
