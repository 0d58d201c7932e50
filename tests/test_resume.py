"""Resume: a model call survives a server crash + restart, a silent link and a slow step.

A Daedalus process killed (SIGKILL) in the middle of a request and restarted on the same port, a link
that stops passing bytes, a stopped (SIGSTOP) server: the call reconnects with backoff and the
generation ends bit-identical to an uninterrupted run, or the call fails with a clear message once
its retry budget is spent. PROGRESS heartbeats keep a client waiting through a step slower than its
liveness timeout. Subprocess servers are tests/seam_server.py (stand-in DiTs) and the real CLI (--toy).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fake_dit
import pytest
import torch
from comfyui_mesh import protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.icarus import SplitSettings, split_model
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient, RetriesExhausted, ServerTimeout, drop_pooled
from fake_comfy import FakeModelPatcher, LoRAAdapter, sample
from seam_server import TOKEN

TESTS = Path(__file__).resolve().parent
posix = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")


def _sample_while_restarted(first: subprocess.Popen, second: subprocess.Popen, port: int, run: Any) -> Any:
    """``run()`` while a supervisor starts the standby server ``second`` on ``port`` once ``first`` died."""

    def restart() -> None:
        first.wait()
        assert second.stdin is not None
        second.stdin.write(f"serve {port}\n")
        second.stdin.flush()
        _ready_line(second)

    supervisor = threading.Thread(target=restart)
    supervisor.start()
    try:
        return run()
    finally:
        supervisor.join(timeout=120)


def _ready_line(proc: subprocess.Popen, within_s: float = 120.0, word: str = "READY") -> str:
    """The process's first stdout line with ``word`` in it (it is slow to import torch on a loaded box)."""
    assert proc.stdout is not None
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.5)
        if r:
            line = proc.stdout.readline()
            if word in line:
                return line
            if not line:
                break
    proc.kill()
    raise AssertionError(f"server did not start (exit {proc.poll()})")


def _stand_in_server(log: Path, *args: str) -> subprocess.Popen:
    """tests/seam_server.py as a process of its own (stand-in FLUX.2, last 2 blocks)."""
    cmd = [sys.executable, str(TESTS / "seam_server.py"), "--n-blocks", "2", *args]
    with open(log, "a") as err:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)


@contextlib.contextmanager
def _reaped(procs: list[subprocess.Popen]):
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
            for f in (p.stdin, p.stdout):
                if f is not None:
                    f.close()


def _patcher_with_lora(family: str) -> FakeModelPatcher:
    """The seed-0 stand-in (the server builds the same weights) with a LoRA on a remote weight: it
    travels as a constant, so a restarted server must be sent it again."""
    model = FakeModelPatcher(fake_dit.BaseModel(fake_dit.build(family, 0)))
    sd = model.model.state_dict()
    key = next(k for k in sd if k.startswith("diffusion_model.final_layer.") and sd[k].ndim == 2)
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(sd[key].shape[0], 2, generator=g) * 0.1, torch.randn(2, sd[key].shape[1], generator=g) * 0.1
    assert len(model.add_patches({key: LoRAAdapter(set(), (up, down, 2.0, None, None, None))}, 0.8)) == 1
    return model


@posix
@pytest.mark.parametrize("codec_name", ["raw", "lossless-t"])
def test_a_server_killed_mid_request_and_restarted_gives_the_uninterrupted_output(comfy_env, tmp_path, codec_name):
    """kill -9 inside the second model call of a generation, restart on the same port: the call
    reconnects, resends the constants (the LoRA set too) and keyframes, and the generation's output is
    torch.equal to an uninterrupted run's."""
    family = "flux2"
    sigmas = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2])  # four model calls (cond and uncond batched)
    calls = len(sigmas) - 1
    noise, pos, neg = fake_dit.STANDINS[family].inputs()
    log = tmp_path / "daedalus.log"
    # Dies in the reference run's calls + 2: the second call of the interrupted run. Its replacement
    # imports meanwhile and takes the same port once it died.
    first = _stand_in_server(log, "--die-in-call", str(calls + 2))
    second = _stand_in_server(log, "--standby")
    statuses: list[tuple[str, str]] = []
    with _reaped([first, second]):
        port = int(_ready_line(first).split()[1])
        _ready_line(second, word="STANDBY")
        cfg = ClientConfig(
            host="127.0.0.1", port=port, token=TOKEN, retry_backoff_s=0.2, retry_backoff_max_s=1.0, retry_budget_s=120
        )
        settings = SplitSettings(
            n_remote=2, client=cfg, codec_name=codec_name, on_status=lambda level, text: statuses.append((level, text))
        )
        try:
            m, run = split_model(_patcher_with_lora(family), settings)
            assert run.lora is not None
            ref, _ = sample(m, noise, sigmas, pos, neg)
            assert not statuses and first.poll() is None
            out, _ = _sample_while_restarted(first, second, port, lambda: sample(m, noise, sigmas, pos, neg))
        finally:
            drop_pooled("127.0.0.1", port)
        assert first.returncode == -signal.SIGKILL and second.poll() is None
        assert torch.equal(out, ref)
        assert run.calls == calls
        warned = [text for level, text in statuses if level == "warn"]
        assert warned and all(f"reconnecting to 127.0.0.1:{port}" in t for t in warned)
        assert statuses[-1][0] == "ok" and "reconnected" in statuses[-1][1]


# ---------------------------------------------------------------------------- toy back half, in process


class SlowToy(ToyBackend):
    def __init__(self, n_blocks: int, sleep_s: float):
        super().__init__(n_blocks)
        self.sleep_s = sleep_s

    def forward(self, tensors, scalars):
        time.sleep(self.sleep_s)
        return super().forward(tensors, scalars)


@contextlib.contextmanager
def _toy_server(sleep_s: float = 0.0, **cfg):
    scfg = ServerConfig(port=0, device="cpu", n_blocks=3, **cfg)
    srv = DaedalusServer(ServerState(scfg, lambda n: SlowToy(n, sleep_s), token=TOKEN))
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def _toy_call(c: MeshClient, statuses: list | None = None) -> None:
    """One forward of the toy back half; asserts the exact answer."""
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 11, 64, generator=g), torch.randn(64, generator=g)
    model = ToyModel()
    out, _ = c.forward(
        arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={}, consts={"bias": bias}, scalars={},
        on_status=None if statuses is None else lambda level, text: statuses.append((level, text)),
    )  # fmt: skip
    assert torch.equal(out["out"], model.run(x, bias))


def _toy_client(address: tuple[str, int], **kw) -> MeshClient:
    host, port = address
    return MeshClient(ClientConfig(host=host, port=port, token=TOKEN, **kw), expect={"arch": "toy", "n_blocks": 3})


class Proxy:
    """A TCP relay to ``upstream``; ``black_hole()`` makes every open connection swallow its bytes
    both ways without closing (a link that went silent); connections opened later pass bytes again."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.links: list[dict] = []
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection(self.upstream)
            link = {"silent": False}
            self.links.append(link)
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b, link), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, link: dict) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if not link["silent"]:
                    dst.sendall(chunk)
        except OSError:
            pass

    def black_hole(self) -> None:
        for link in self.links:
            link["silent"] = True

    def close(self) -> None:
        self.sock.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_link_gone_silent_is_detected_within_the_liveness_timeout_and_the_call_retried():
    """Without a reply or heartbeat for liveness_timeout_s the connection is given up (long before the
    300 s read timeout) and the call goes through on a new one."""
    with _toy_server() as srv:
        proxy = Proxy(srv.address)
        try:
            c = _toy_client(proxy.address, liveness_timeout_s=1.5, retry_backoff_s=0.1)
            _toy_call(c)
            proxy.black_hole()
            statuses: list[tuple[str, str]] = []
            t0 = time.monotonic()
            _toy_call(c, statuses)
            took = time.monotonic() - t0
            c.close()
        finally:
            proxy.close()
    assert 1.5 <= took < 60, took  # detected at the liveness timeout, not the 300 s read timeout
    assert [level for level, _ in statuses] == ["warn", "ok"]
    assert "sent nothing for 1.5 s (no reply, no heartbeat)" in statuses[0][1]


@posix
def test_a_stopped_server_is_detected_and_the_call_completes_once_it_runs_again(tmp_path):
    """A Daedalus process that stops (SIGSTOP) mid-call keeps its TCP connections open but sends
    nothing: the call gives it up after the liveness timeout, keeps retrying (the handshake times out
    too), and completes once the process continues (SIGCONT)."""
    cmd = [sys.executable, "-m", "comfyui_mesh.server", "--toy", "--device", "cpu", "--n-blocks", "3"]
    with open(tmp_path / "daedalus.log", "w") as err:
        proc = subprocess.Popen(
            [*cmd, "--port", "0", "--no-auth", "--state-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=err,
            text=True,
        )  # fmt: skip
    with _reaped([proc]):
        line = _ready_line(proc)
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        c = MeshClient(
            ClientConfig(
                host="127.0.0.1", port=port, token=None, liveness_timeout_s=1.5, handshake_timeout_s=1.5,
                retry_backoff_s=0.2, retry_backoff_max_s=0.5, retry_budget_s=120.0,
            ),
            expect={"arch": "toy", "n_blocks": 3},
        )  # fmt: skip
        _toy_call(c)
        proc.send_signal(signal.SIGSTOP)
        statuses: list[tuple[str, str]] = []
        timer = threading.Timer(5.0, proc.send_signal, (signal.SIGCONT,))
        timer.start()
        try:
            _toy_call(c, statuses)
        finally:
            timer.join()
            c.close()
    warned = [text for level, text in statuses if level == "warn"]
    assert len(warned) >= 2 and "sent nothing for 1.5 s" in warned[0]
    assert statuses[-1][0] == "ok"


def test_when_the_retry_budget_is_spent_the_error_names_the_server_how_long_and_the_fix():
    with _toy_server() as srv:
        c = _toy_client(srv.address, retry_backoff_s=0.1, retry_backoff_max_s=0.4, retry_budget_s=2.0)
        _toy_call(c)
    host, port = srv.address
    statuses: list[tuple[str, str]] = []
    t0 = time.monotonic()
    with pytest.raises(RetriesExhausted) as e:
        _toy_call(c, statuses)
    took = time.monotonic() - t0
    msg = str(e.value)
    assert f"gave up on Daedalus at {host}:{port} after retrying for " in msg
    assert "retry budget 2 s" in msg and "connection refused" in msg
    assert "start Daedalus again" in msg and "check the network link" in msg
    assert 1.0 <= took < 60, took
    assert [level for level, _ in statuses][-1] == "error" and statuses[-1][1] == msg
    assert all(f"reconnecting to {host}:{port}" in text for level, text in statuses[:-1])


def test_heartbeats_keep_a_client_waiting_through_a_step_slower_than_its_liveness_timeout(monkeypatch):
    """A 3 s forward, a client that gives a silent server up after 1.5 s: PROGRESS frames every 0.25 s
    keep it waiting; the call completes on its first connection, with no retry."""
    with _toy_server(sleep_s=3.0, heartbeat_interval_s=0.25) as srv:
        c = _toy_client(srv.address, liveness_timeout_s=1.5)
        c.connect()
        seen: list[protocol.Message] = []
        real = c._recv

        def spy(sock, link=None):
            msg, n = real(sock, link)
            seen.append(msg)
            return msg, n

        monkeypatch.setattr(c, "_recv", spy)
        statuses: list[tuple[str, str]] = []
        _toy_call(c, statuses)
        c.close()
        assert srv.state.stats.steps == 1
    beats = [m for m in seen if isinstance(m, protocol.Progress)]
    assert not statuses, "no reconnect"
    assert len(beats) >= 3 and isinstance(seen[-1], protocol.Result)
    # 3 s = 12 beats of 0.25 s: the last may fall just as the step ends (encoding the reply)
    assert "forward" in {b.phase for b in beats} <= {"forward", "encode"}
    assert all(b.seq == seen[-1].seq for b in beats)
    assert beats[-1].elapsed_ms > beats[0].elapsed_ms


def test_a_server_alive_past_the_read_timeout_is_reported_not_retried():
    """Heartbeats but no reply within read_timeout_s: ServerTimeout (it is still working; a resend
    would only queue behind it)."""
    with _toy_server(sleep_s=4.0, heartbeat_interval_s=0.25) as srv:
        c = _toy_client(srv.address, liveness_timeout_s=1.5, read_timeout_s=2.0)
        statuses: list[tuple[str, str]] = []
        with pytest.raises(ServerTimeout, match=r"is alive but did not answer within 2 s"):
            _toy_call(c, statuses)
        assert not statuses
        c.close()


def test_no_heartbeat_follows_the_reply():
    """The reply is the last frame of its exchange: after a RESULT, nothing more arrives."""
    with _toy_server(sleep_s=0.5, heartbeat_interval_s=0.05) as srv:
        c = _toy_client(srv.address)
        _toy_call(c)
        sock = c._sock
        assert sock is not None
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        c.close()


def test_client_config_refuses_nonsense_retry_settings():
    from comfyui_mesh.errors import LocalError

    with pytest.raises(LocalError, match="liveness_timeout_s must be > 0"):
        ClientConfig(liveness_timeout_s=0)
    with pytest.raises(LocalError, match="retry_budget_s must be >= 0"):
        ClientConfig(retry_budget_s=-1)


def test_big_buffers_are_sent_in_slices_so_a_timeout_bounds_a_stall_not_the_transfer():
    """sendall's timeout bounds the whole call: a frame's big tensors go out in SEND_SLICE pieces, so
    the client's liveness timeout on a send catches a stalled link without cutting a big frame short."""
    from comfyui_mesh.constants import SEND_SLICE
    from comfyui_mesh.netio import send_message

    class Recorder:
        def __init__(self):
            self.pieces: list[bytes] = []

        def sendall(self, buf):
            self.pieces.append(bytes(buf))

    body = bytes(range(256)) * ((2 * SEND_SLICE + 12345) // 256)
    msg = protocol.Forward(seq=1, tensors=(protocol.WireTensor("x", "uint8", (len(body),), 0, body),))
    rec = Recorder()
    n = send_message(rec, msg)  # type: ignore[arg-type]
    assert b"".join(rec.pieces) == protocol.encode_bytes(msg) and n == len(protocol.encode_bytes(msg))
    assert max(len(p) for p in rec.pieces) == SEND_SLICE and len(rec.pieces) == 1 + 3
