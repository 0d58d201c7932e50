"""The same-host fast path (samehost.py, docs/PROTOCOL.md §11): proved in the handshake, seam tensors
through shared memory between two processes (a real toy Daedalus), bit-identical, TCP fallback with
a logged reason, no segment left behind. ``COMFYUI_MESH_TEST_DEVICE=cuda`` adds the CUDA IPC path."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from comfyui_mesh import samehost
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.errors import RemoteProtocolError
from comfyui_mesh.protocol import Forward, WireTensor
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient
from comfyui_proc import DaedalusProc, ToyDaedalus
from toy_support import toy_forward

DEV = os.environ.get("COMFYUI_MESH_TEST_DEVICE", "cpu")
TOKEN = "0123456789abcdef0123456789abcdef"
SHM = Path("/dev/shm")
needs_posix_shm = pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory in /dev/shm (Linux)")


def _segments() -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith("mh")} if SHM.is_dir() else set()


def _inputs(device: str = "cpu", tokens: int = 4096):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, tokens, 64, generator=g).to(device), torch.randn(64, generator=g).to(device)


def _forward(c: MeshClient, front, bias, codec_name="raw", device="cpu"):
    return toy_forward(c, front, bias, codec_name, device=device)


@pytest.fixture
def toy(tmp_path):
    srv = ToyDaedalus(tmp_path / "state")
    yield srv
    srv.stop()


@needs_posix_shm
def test_two_processes_raw_and_lossless_are_bit_identical_through_shared_memory(toy):
    model = ToyModel()
    x, bias = _inputs()
    whole = model.run(x, bias)
    front = model.run(x, bias, 0, 5)  # 2 MiB of float32: the seam
    c = MeshClient(ClientConfig(port=toy.port, token=toy.token), expect={"arch": "toy", "n_blocks": 3})
    try:
        for name in ("raw", "lossless", "raw"):
            out, st = _forward(c, front, bias, name)
            assert torch.equal(out["out"], whole), name
            assert st.via == "samehost"
            # Only the control message crossed the socket, both ways.
            assert st.bytes_out < 4096 and st.bytes_in < 4096, (st.bytes_out, st.bytes_in)
        assert any(s.endswith("c1") for s in _segments()), "the client's request segment exists while connected"
    finally:
        c.close()
    assert "on this host: seam tensors go through shared memory" in toy.log()


@needs_posix_shm
def test_tcp_only_when_turned_off_and_the_same_results(toy, monkeypatch):
    model = ToyModel()
    x, bias = _inputs()
    front = model.run(x, bias, 0, 5)
    monkeypatch.setenv("COMFYUI_MESH_SAMEHOST", "0")
    c = MeshClient(ClientConfig(port=toy.port, token=toy.token), expect={"arch": "toy", "n_blocks": 3})
    try:
        out, st = _forward(c, front, bias)
    finally:
        c.close()
    assert torch.equal(out["out"], model.run(x, bias))
    assert st.via == "tcp" and st.bytes_out > front.numel() * 4


@needs_posix_shm
def test_a_wrong_proof_falls_back_to_tcp_with_the_reason_logged(toy, monkeypatch, caplog):
    """A client that cannot prove it reads the server's secret (another /dev/shm namespace: simulated by
    a bogus secret) stays on TCP; the server says why."""
    real = samehost.answer

    def bogus(offer, cn, sn):
        proof, _, why = real(offer, cn, sn)
        fake = bytes(samehost.SECRET_BYTES)
        return {**proof, "proof": samehost._mac(fake, b"proof", cn, sn)}, fake, why

    monkeypatch.setattr(samehost, "answer", bogus)
    model = ToyModel()
    x, bias = _inputs()
    front = model.run(x, bias, 0, 5)
    c = MeshClient(ClientConfig(port=toy.port, token=toy.token), expect={"arch": "toy", "n_blocks": 3})
    try:
        with caplog.at_level(logging.INFO, logger="comfyui_mesh"):
            out, st = _forward(c, front, bias)
    finally:
        c.close()
    assert torch.equal(out["out"], model.run(x, bias))
    assert st.via == "tcp"
    assert "did not accept the same-host proof" in caplog.text
    deadline = time.monotonic() + 10
    while "wrong same-host proof" not in toy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "over TCP: wrong same-host proof" in toy.log()


def test_a_server_in_another_namespace_is_not_trusted(monkeypatch):
    """The client cannot open the named secret (as from a container or over an SSH tunnel): no proof."""
    proof, secret, why = samehost.answer({"seg": "mh" + "0" * 24 + "p", "gpus": []}, "a" * 64, "b" * 64)
    assert proof == {} and secret == b"" and "not the same host" in why
    proof, _, why = samehost.answer({"seg": "../../etc/passwd"}, "a" * 64, "b" * 64)
    assert proof == {} and "malformed" in why


@needs_posix_shm
def test_segments_are_removed_after_disconnect_and_after_the_server_is_killed(tmp_path):
    before = _segments()
    srv = ToyDaedalus(tmp_path / "state")
    try:
        model = ToyModel()
        x, bias = _inputs()
        c = MeshClient(ClientConfig(port=srv.port, token=srv.token), expect={"arch": "toy", "n_blocks": 3})
        _forward(c, model.run(x, bias, 0, 5), bias)
        during = _segments() - before
        assert len(during) == 3, during  # the server's secret, its reply segment, the client's request segment
        c.close()
        deadline = time.monotonic() + 10
        while len(_segments() - before) > 1 and time.monotonic() < deadline:  # the server unlinks on disconnect
            time.sleep(0.1)
        assert len(_segments() - before) == 1, "only the server's secret stays after the client left"
        c2 = MeshClient(ClientConfig(port=srv.port, token=srv.token), expect={"arch": "toy", "n_blocks": 3})
        _forward(c2, model.run(x, bias, 0, 5), bias)
        if sys.platform.startswith("linux"):
            os.kill(srv.proc.pid, signal.SIGKILL)  # no cleanup code runs: its resource tracker unlinks
            srv.proc.wait(10)
        c2.close()
    finally:
        srv.stop()
    deadline = time.monotonic() + 15
    while _segments() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _segments() - before, f"leaked: {_segments() - before}"


# ---------------------------------------------------------------------------- in one process: the checks


def _pair(max_bytes: int = 1 << 30):
    secret = os.urandom(32)
    cn, sn = "c" * 64, "d" * 64
    return (
        samehost.Channel(secret, cn, sn, "c", [], max_bytes, pin=False),
        samehost.Channel(secret, cn, sn, "s", [], max_bytes, pin=False),
    )


def _msg(n: int) -> Forward:
    return Forward(tensors=(WireTensor("x", "uint8", (n,), 0, bytes(range(256)) * (n // 256)),))


@needs_posix_shm
def test_locations_are_checked_before_any_view_is_made():
    cli, srv = _pair()
    try:
        wt = cli.outgoing(_msg(1 << 16)).tensors[0]
        name, off, n = wt.meta["shm"]
        assert wt.nbytes == 0 and off == 0 and n == 1 << 16
        assert bytes(srv.resolve(wt).data) == bytes(range(256)) * 256
        for bad in ([name, 0, 1 << 40], [name, -1, 10], [name, 0], ["mh" + "0" * 16 + "c1", 0, 10], [7, 0, 1]):
            with pytest.raises(RemoteProtocolError):
                srv.resolve(WireTensor("x", "uint8", (10,), 0, b"", {"shm": bad}))
        # A segment of this connection, but the server's own direction: not the peer's to name.
        with pytest.raises(RemoteProtocolError, match="not one of this connection's"):
            srv.resolve(WireTensor("x", "uint8", (10,), 0, b"", {"shm": [name[:-2] + "s1", 0, 10]}))
        other, _ = _pair()  # another connection's segment
        try:
            wt2 = other.outgoing(_msg(1 << 16)).tensors[0]
            with pytest.raises(RemoteProtocolError, match="not one of this connection's"):
                srv.resolve(wt2)
        finally:
            other.close()
    finally:
        cli.close()
        srv.close()


@needs_posix_shm
def test_segment_grows_on_demand_and_a_message_over_the_limit_goes_in_the_frame():
    cli, srv = _pair(max_bytes=4 << 20)
    try:
        a = cli.outgoing(_msg(1 << 16)).tensors[0]
        b = cli.outgoing(_msg(3 << 20)).tensors[0]
        assert a.meta["shm"][0] != b.meta["shm"][0], "a bigger message needs a new segment"
        assert bytes(srv.resolve(b).data)[:256] == bytes(range(256))
        big = cli.outgoing(_msg(5 << 20)).tensors[0]
        assert "shm" not in big.meta and big.nbytes == 5 << 20
    finally:
        cli.close()
        srv.close()


def test_shared_memory_descriptors_are_refused_outside_a_same_host_session():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3, samehost=False)
    srv = DaedalusServer(ServerState(cfg, lambda n: ToyBackend(n), token=TOKEN))
    host, port = srv.start()
    try:
        c = MeshClient(ClientConfig(host=host, port=port, token=TOKEN), expect={"arch": "toy", "n_blocks": 3})
        assert c.connect().samehost == {}, "--no-samehost offers nothing"
        x, bias = _inputs()
        out, st = _forward(c, x, bias)
        assert st.via == "tcp"
        c.close()
    finally:
        srv.shutdown()


@pytest.mark.skipif(DEV != "cuda" or not torch.cuda.is_available(), reason="COMFYUI_MESH_TEST_DEVICE=cuda")
def test_cuda_tensors_travel_as_ipc_handles_between_two_processes(tmp_path):
    srv = DaedalusProc(["--toy", "--device", "cuda:0", "--port", "0", "--n-blocks", "3"], tmp_path / "state")
    try:
        model = ToyModel()
        x, bias = _inputs("cuda")
        front = model.run(x, bias, 0, 5)
        back = model.run(front, bias, 5)
        c = MeshClient(ClientConfig(port=srv.port, token=srv.token), expect={"arch": "toy", "n_blocks": 3})
        try:
            for name in ("raw", "lossless", "raw"):
                out, st = _forward(c, front, bias, name, device="cuda")
                assert out["out"].device.type == "cuda"
                assert torch.equal(out["out"], back), name
                assert st.via == "samehost" and st.bytes_out < 4096 and st.bytes_in < 4096
            assert c._chan is not None and c._chan.peer_gpus, "the server announced its GPUs"
        finally:
            c.close()
    finally:
        srv.stop()


def test_a_cuda_ipc_failure_on_the_server_sends_cuda_tensors_through_shared_memory_instead(caplog):
    """The recovery the client applies when the server cannot open its CUDA IPC handles (checked
    without a GPU: the decision only)."""
    from comfyui_mesh.errors import RemoteFailure

    c = MeshClient(ClientConfig(port=1, token=TOKEN))
    chan, peer = _pair()
    try:
        chan.peer_gpus = {"GPU-1"}
        c._chan = chan
        gen = c._codec_gen
        other = RemoteFailure("bad_request", "Daedalus at 127.0.0.1:1: duplicate tensor")
        assert not c._recover(other, 0), "other bad requests are not retried"
        e = RemoteFailure("bad_request", f"Daedalus at 127.0.0.1:1: tensor 'x': {samehost.IPC_FAILED}: no GPU")
        with caplog.at_level(logging.WARNING, logger="comfyui_mesh"):
            assert c._recover(e, 0)
        assert chan.peer_gpus == set() and c._codec_gen != gen, "re-encoded without IPC"
        assert "shared host memory instead" in caplog.text
        assert not c._recover(e, 0), "once only"
    finally:
        c._chan = None
        chan.close()
        peer.close()


@needs_posix_shm
def test_a_client_process_that_exits_without_closing_leaves_no_segment_and_no_warning(toy):
    """A script (or ComfyUI stopped with Ctrl-C) that never closes its connection: its segments are
    unlinked at exit, before Python's resource tracker would warn about 'leaked shared_memory objects'."""
    import subprocess
    import sys

    script = f"""
import torch
from comfyui_mesh.config import ClientConfig
from comfyui_mesh.server.toy import ToyModel
from comfyui_mesh.transport import MeshClient
c = MeshClient(ClientConfig(port={toy.port}, token={toy.token!r}), expect={{"arch": "toy", "n_blocks": 3}})
g = torch.Generator().manual_seed(0)
x, bias = torch.randn(2, 4096, 64, generator=g), torch.randn(64, generator=g)
out, st = c.forward(arch="toy", n_blocks=3, coded={{"x": ToyModel().run(x, bias, 0, 5)}}, exact={{}},
                    consts={{"bias": bias}}, scalars={{}})
assert st.via == "samehost", st.via
print("DONE", flush=True)
"""  # no c.close(): the process just ends
    before = {s for s in _segments() if s.endswith(("c1", "c2", "c3"))}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "DONE", r.stdout + r.stderr
    assert "leaked shared_memory" not in r.stderr, r.stderr
    assert {s for s in _segments() if s.endswith(("c1", "c2", "c3"))} <= before


@pytest.mark.skipif(os.name != "posix", reason="only POSIX registers attached segments with a resource tracker")
def test_threads_attaching_one_segment_leave_the_resource_tracker_quiet(tmp_path):
    """Clients in one process proving the same host at once attach the server's secret segment together:
    the resource tracker must not see one registration unregistered twice (it prints a KeyError traceback
    into the ComfyUI console)."""
    script = tmp_path / "attach.py"
    script.write_text(
        "import subprocess, sys, threading\n"
        "from comfyui_mesh import samehost\n"
        "p = subprocess.Popen([sys.executable, '-c', 'from multiprocessing import shared_memory as m; import sys; "
        "s = m.SharedMemory(create=True, size=4096); print(s.name, flush=True); sys.stdin.read(); s.close(); s.unlink()'],"
        " stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)\n"
        "name = p.stdout.readline().strip()\n"
        "def attach():\n"
        "    for _ in range(300):\n"
        "        samehost._attach(name).close()\n"
        "ts = [threading.Thread(target=attach) for _ in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "p.communicate('')\n"
        "print('done')\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("done"), out.stdout + out.stderr
    assert "Traceback" not in out.stderr, out.stderr
