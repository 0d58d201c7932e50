"""Daedalus as a subprocess for the bench tools (fuzz_server.py, soak.py): start it with the toy back
half on the CPU, read its address and token, sample its memory, scan its output for tracebacks."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def read_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes (0 when it is gone)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in out:
                out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class ServerProc:
    """``python -m comfyui_mesh.server --toy --device cpu --port 0`` with its output in files."""

    def __init__(self, workdir: Path, args: list[str], ready_s: float = 120.0):
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.out_path, self.err_path = workdir / "server.out", workdir / "server.err"
        cmd = [sys.executable, "-m", "comfyui_mesh.server", "--toy", "--device", "cpu", "--port", "0"]
        cmd += ["--n-blocks", "3", "--state-dir", str(self.state_dir), *args]
        self.cmd = cmd
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL)
        end = time.monotonic() + ready_s
        while True:
            m = re.search(rb"READY listening on ([\d.]+):(\d+)", self.out_path.read_bytes())
            if m:
                self.address = (m.group(1).decode(), int(m.group(2)))
                break
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"server did not start: {self.tail()}")
            time.sleep(0.05)
        self.token = (self.state_dir / "token").read_text().strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return (self.out_path.read_bytes()[-n:] + b"\n--- stderr ---\n" + self.err_path.read_bytes()[-n:]).decode(
            errors="replace"
        )

    def log_bytes(self) -> int:
        return self.out_path.stat().st_size + self.err_path.stat().st_size

    def tracebacks(self) -> tuple[int, list[str]]:
        """How many tracebacks the server printed, and the distinct exception lines ending them."""
        n, last = 0, Counter()
        for p in (self.out_path, self.err_path):
            lines = p.read_bytes().decode(errors="replace").splitlines()
            for i, line in enumerate(lines):
                if "Traceback (most recent call last)" in line:
                    n += 1
                    j = i + 1
                    while j < len(lines) and (lines[j].startswith(" ") or lines[j].startswith("Traceback")):
                        j += 1
                    last[lines[j] if j < len(lines) else "?"] += 1
        return n, [f"{k} (x{v})" for k, v in last.most_common(10)]

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()
        return self.proc.returncode


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
