"""Server-wide memory budgets (issue 14, item 1): what all connections together may make Daedalus
hold is taken from a budget before it is allocated, given back when freed, and a request the budget
has no room for is answered ``busy`` (the server stays up and serves the others)."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from comfyui_mesh import codec, protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.errors import OverBudget, RemoteFailure
from comfyui_mesh.netio import recv_message
from comfyui_mesh.protocol import Forward, Ping
from comfyui_mesh.server.budget import Budget, SizedLRU
from comfyui_mesh.server.core import ConstCache, DaedalusServer, ServerState
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient
from toy_support import wait_for

TOKEN = "0123456789abcdef0123456789abcdef"
MiB = 1 << 20


@contextmanager
def serve(**cfg: object) -> Iterator[DaedalusServer]:
    # Over TCP: on the same-host fast path big payloads would not be frames at all (PROTOCOL.md §11).
    srv = DaedalusServer(
        ServerState(
            ServerConfig(port=0, device="cpu", n_blocks=3, samehost=False, **cfg),
            lambda n: ToyBackend(n, ignored=("pad", "big")),
            token=TOKEN,
        )  # type: ignore[arg-type]
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def client(srv: DaedalusServer) -> MeshClient:
    host, port = srv.address
    return MeshClient(ClientConfig(host=host, port=port, token=TOKEN), expect={"arch": "toy", "n_blocks": 3})


def probe(n_bytes: int) -> Ping:
    """A PING carrying ``n_bytes`` up (a frame body of about that size)."""
    return Ping(seq=1, tensors=(protocol.WireTensor("probe", "uint8", (n_bytes,), 0, bytes(n_bytes)),))


def toy_forward(c: MeshClient, consts: dict[str, torch.Tensor] | None = None) -> None:
    """One toy step, checked against the whole model (extra constants ride along unused)."""
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 11, 64, generator=g), torch.randn(64, generator=g)
    model = ToyModel()
    out, _ = c.forward(
        arch="toy",
        n_blocks=3,
        coded={"x": model.run(x, bias, 0, 5)},
        exact={},
        consts={"bias": bias, **(consts or {})},
        scalars={},
    )
    assert torch.equal(out["out"], model.run(x, bias))


# ---------------------------------------------------------------------------- the pieces


def test_budget_take_give_and_refusals():
    b = Budget("things", 100, "--max-things-mb")
    assert b.take(60) and not b.take(41) and b.take(40)
    assert (b.used, b.peak) == (100, 100)
    b.give(100)
    assert b.used == 0
    e = b.refusal(101, "a request")
    assert not e.transient and "more than this server's whole budget of 100 bytes" in str(e)
    b.take(90)
    e = b.refusal(20, "a request")
    assert e.transient and "--max-things-mb" in str(e) and "try again" in str(e)
    with pytest.raises(OverBudget):
        with b.reserve(20, "x"):
            pass
    with b.reserve(10, "x"):
        assert b.used == 100
    assert b.used == 90


def test_budget_allocator_counts_a_buffer_while_any_view_of_it_lives():
    from comfyui_mesh import hostmem

    b = Budget("frames", 10 * MiB, "--max-inflight-mb")
    alloc = b.allocator(hostmem.lazy_buffer)
    view = alloc(4 * MiB)
    part = view[100:200]  # a tensor that is a view into the frame keeps it counted
    del view
    gc.collect()
    assert b.used == 4 * MiB
    with pytest.raises(OverBudget, match="--max-inflight-mb"):
        alloc(7 * MiB)
    assert b.used == 4 * MiB  # a refused allocation takes nothing
    del part
    gc.collect()
    assert b.used == 0


def test_sized_lru_own_limit_is_soft_and_shared_budget_is_hard():
    pool = Budget("consts", 10, "--max-consts-total-mb")
    a: SizedLRU[int] = SizedLRU(8, lambda v: v, pool)
    b: SizedLRU[int] = SizedLRU(8, lambda v: v, pool)
    assert a.put("a1", 4) and a.put("a2", 4)
    assert a.put("a3", 4) and a.get("a1") is None  # its own limit: the oldest goes
    assert a.put("big", 9) and len(a) == 1  # the newest is kept even alone over its own limit
    assert pool.used == 9
    assert not b.put("b1", 2)  # the server-wide budget is held by the other cache: not kept
    assert pool.used == 9 and b.get("b1") is None
    a.clear()
    assert pool.used == 0 and b.put("b1", 2) and pool.used == 2


def test_const_cache_counts_against_the_server_wide_budget():
    pool = Budget("consts", 3 * MiB, "--max-consts-total-mb")
    one, two = ConstCache(2 * MiB, pool), ConstCache(2 * MiB, pool)
    assert one.put("h1", torch.zeros(MiB // 2))  # 2 MiB of float32
    assert not two.put("h2", torch.zeros(MiB // 2))  # would take the server past 3 MiB
    assert pool.used == 2 * MiB and two.bytes == 0
    one.clear()
    assert pool.used == 0 and two.put("h2", torch.zeros(MiB // 2))


# ---------------------------------------------------------------------------- through a server


def authenticated_socket(srv: DaedalusServer) -> tuple[MeshClient, socket.socket]:
    c = client(srv)
    c.connect()
    assert c._sock is not None
    return c, c._sock


def test_frames_of_all_connections_share_the_inflight_budget():
    """Connection A is in the middle of a 6 MiB frame; connection B's 4 MiB frame does not fit the
    8 MiB server-wide budget: B is told ``busy`` (try again), the server stays up, and once A is gone
    B's retry is served and the budget is back to 0."""
    with serve(max_inflight_bytes=8 * MiB) as srv:
        a, sa = authenticated_socket(srv)
        header = b"{}"
        prefix = protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 3, len(header), 6 * MiB, 0)
        assert a._link is not None  # frames after the handshake travel sealed
        for rec_header, sealed in a._link.sealer.seal([prefix + header + b"\0" * (2 * MiB)]):
            sa.sendall(rec_header + sealed)  # the server reserves the whole frame now
        assert wait_for(lambda: srv.state.budgets.inflight.used >= 6 * MiB)
        b = client(srv)
        with pytest.raises(RemoteFailure, match=r"other clients hold .*--max-inflight-mb.*try again") as e:
            b.request(probe(4 * MiB), retry=False)
        assert e.value.code == "busy"
        a.close()
        assert wait_for(lambda: srv.state.budgets.inflight.used == 0)
        rtt, _ = b.ping()  # reconnects: served
        assert rtt >= 0
        reply, _, _ = b.request(probe(4 * MiB))
        assert isinstance(reply, protocol.Pong)
        assert srv.state.budgets.inflight.peak <= 8 * MiB
        b.close()


def test_a_frame_bigger_than_the_whole_budget_is_refused_for_good():
    with serve(max_inflight_bytes=2 * MiB) as srv:
        c = client(srv)
        with pytest.raises(RemoteFailure, match=r"more than this server's whole budget .*--max-inflight-mb") as e:
            c.request(probe(3 * MiB), retry=False)
        assert e.value.code == "busy"
        toy_forward(c)  # small requests are still served (the client reconnected)
        c.close()


def test_decoded_tensors_count_against_the_inflight_budget():
    """A request's tensors are reserved, decoded size from their descriptors, for as long as it is
    served: with the budget smaller than one request, it is refused before decoding."""
    import dataclasses

    with serve(max_inflight_bytes=1 * MiB) as srv:
        c = client(srv)
        x = torch.randn(2, 11, 64)
        big = dataclasses.replace(codec.encode(x, "x", "lossless"), shape=(1, 4096, 64))  # 1 MiB decoded
        extra = codec.encode(torch.zeros(4096), "pad", "lossless")  # 16 KiB more
        msg = Forward(seq=1, arch="toy", n_blocks=3, consts={}, tensors=(big, extra))
        with pytest.raises(RemoteFailure, match=r"decoded tensors needs \d+ bytes.*--max-inflight-mb"):
            c.request(msg)
        toy_forward(c)
        assert wait_for(lambda: srv.state.budgets.inflight.used == 0)
        c.close()


def test_only_tensors_decoded_as_views_of_their_frame_are_not_reserved_again():
    """The in-flight budget reserves a request's decoded size except for tensors decoded in place
    (raw, CPU, writable and aligned: a view of the frame, whose bytes are already counted)."""
    import numpy as np
    from comfyui_mesh.wirecodecs.base import decodes_in_place

    buf = np.zeros(4096 + 64, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64
    aligned = memoryview(buf)[start : start + 4096]
    wt = codec.encode(torch.zeros(1024), "x", "raw")
    assert decodes_in_place(dataclasses.replace(wt, data=aligned))
    assert not decodes_in_place(dataclasses.replace(wt, data=memoryview(buf)[start + 1 : start + 4097]))  # misaligned
    assert not decodes_in_place(dataclasses.replace(wt, data=bytes(4096)))  # read-only: copied
    assert not decodes_in_place(dataclasses.replace(wt, data=aligned), "cuda")  # copied to the device
    assert not decodes_in_place(codec.encode(torch.zeros(1024), "x", "lossless"))


def test_constants_of_all_connections_share_one_budget():
    """Two clients each send a 2 MiB constant; the server-wide constants budget is 3 MiB: both steps
    are right, the second client's constant is used but not kept (it is resent when named again),
    and the budget is never exceeded; a closed connection's constants go back."""
    with serve(max_const_total_bytes=3 * MiB) as srv:
        big1, big2 = torch.randn(MiB // 2), torch.randn(MiB // 2)
        a, b = client(srv), client(srv)
        toy_forward(a, {"big": big1})
        used = srv.state.budgets.consts.used
        assert used >= 2 * MiB
        toy_forward(b, {"big": big2})
        toy_forward(b, {"big": big2})  # named by hash only: the server answers missing_consts, b resends
        assert srv.state.budgets.consts.peak <= 3 * MiB
        a.close()
        assert wait_for(lambda: srv.state.budgets.consts.used < used)
        toy_forward(b, {"big": big2})
        b.close()
        assert wait_for(lambda: srv.state.budgets.consts.used == 0)


def test_temporal_references_of_all_connections_share_one_budget():
    """Past --max-codec-state-total-mb (all connections together) a connection's temporal request is
    answered ``busy`` and its references dropped; the first connection's stay and keep working."""
    torch.manual_seed(0)
    pads = {f"pad{i}": torch.randn(64, 64) for i in range(4)}  # 4 x 16 KiB of float32 references
    with serve(max_codec_state_total_bytes=96 << 10) as srv:
        a, b = client(srv), client(srv)
        for c in (a, b):
            c.connect()
        msg = Forward(
            seq=1,
            arch="toy",
            n_blocks=3,
            consts={},
            tensors=tuple(codec.encode(t, n, "lossless-t", state={}) for n, t in pads.items())
            + (codec.encode(torch.zeros(1, 2, 64), "x", "raw"), codec.encode(torch.zeros(64), "bias", "raw")),
        )
        assert isinstance(a.request(msg)[0], protocol.Result)  # 64 KiB of references held by a
        held = srv.state.stats.codec_state_bytes
        assert held >= 64 << 10
        with pytest.raises(
            RemoteFailure, match=r"temporal-codec references needs \d+ bytes.*--max-codec-state-total-mb"
        ):
            b.request(msg)
        assert srv.state.stats.codec_state_bytes == held == srv.state.budgets.codec_state.used
        a.close()
        assert wait_for(lambda: srv.state.stats.codec_state_bytes == 0)
        b.close()


def test_pre_auth_frames_have_a_small_header_limit():
    """Before authentication a frame header may be at most PRE_AUTH_MAX_HEADER (16 KiB), not 1 MiB."""
    from comfyui_mesh.constants import PRE_AUTH_MAX_HEADER

    with serve() as srv:
        s = socket.create_connection(srv.address, timeout=5)
        hlen = PRE_AUTH_MAX_HEADER + 1
        s.sendall(protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 1, hlen, 0, 0))
        msg, _ = recv_message(s, protocol.FrameDecoder(), time.monotonic() + 5)
        assert isinstance(msg, protocol.Error) and msg.code == "bad_frame"
        assert f"header length {hlen} exceeds the limit of {PRE_AUTH_MAX_HEADER}" in msg.message
        s.close()


def test_cli_sets_the_server_wide_budgets():
    from comfyui_mesh import constants
    from comfyui_mesh.server.__main__ import build_parser, config_from_args

    default = config_from_args(build_parser().parse_args(["--toy"]))
    assert (default.max_inflight_bytes, default.max_const_total_bytes, default.max_codec_state_total_bytes) == (
        constants.MAX_INFLIGHT_BYTES,
        constants.MAX_CONST_TOTAL_BYTES,
        constants.MAX_CODEC_STATE_TOTAL_BYTES,
    )
    argv = "--toy --max-inflight-mb 100 --max-consts-total-mb 50 --max-codec-state-total-mb 40 --max-lora-mb 30"
    argv += " --max-consts-mb 20"
    cfg = config_from_args(build_parser().parse_args(argv.split()))
    assert (cfg.max_inflight_bytes, cfg.max_const_total_bytes, cfg.max_codec_state_total_bytes) == (
        100 * MiB,
        50 * MiB,
        40 * MiB,
    )
    assert (cfg.max_lora_bytes, cfg.const_cache_bytes) == (30 * MiB, 20 * MiB)


def test_a_call_refused_for_a_full_budget_is_retried_until_it_fits():
    """``busy`` with ``transient`` (other clients hold the memory) is waited out with the call's
    retry backoff: once the other connection lets go, the same call goes through, exact."""
    import threading

    with serve(max_inflight_bytes=8 * MiB) as srv:
        a, sa = authenticated_socket(srv)
        header = b"{}"
        prefix = protocol._PREFIX.pack(protocol.MAGIC, protocol.PROTOCOL_VERSION, 3, len(header), 6 * MiB, 0)
        assert a._link is not None
        for rec_header, sealed in a._link.sealer.seal([prefix + header + b"\0" * (2 * MiB)]):
            sa.sendall(rec_header + sealed)
        assert wait_for(lambda: srv.state.budgets.inflight.used >= 6 * MiB)
        host, port = srv.address
        b = MeshClient(
            ClientConfig(host=host, port=port, token=TOKEN, retry_backoff_s=0.2, retry_budget_s=30),
            expect={"arch": "toy", "n_blocks": 3},
        )
        statuses: list[tuple[str, str]] = []
        threading.Timer(1.0, a.close).start()  # the other client lets go a second later
        g = torch.Generator().manual_seed(0)
        x, bias = torch.randn(2, 11, 64, generator=g), torch.randn(64, generator=g)
        model = ToyModel()
        out, _ = b.forward(
            arch="toy",
            n_blocks=3,
            coded={"x": model.run(x, bias, 0, 5)},
            exact={},
            consts={"bias": bias, "big": torch.randn(3 * MiB // 4)},  # a 3 MiB frame: no room at first
            scalars={},
            on_status=lambda level, text: statuses.append((level, text)),
        )
        assert torch.equal(out["out"], model.run(x, bias))
        assert any(level == "warn" and "try again shortly" in text for level, text in statuses), statuses
        b.close()


def test_the_allocator_is_tuned_once_unless_the_environment_says_otherwise():
    """Daedalus asks glibc to give freed frame buffers back (mallopt); a MALLOC_* variable the
    operator set wins. In a subprocess: mallopt changes the whole process."""
    import subprocess
    import sys

    code = "from comfyui_mesh.server.budget import tune_allocator; print(tune_allocator())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    if sys.platform.startswith("linux"):
        assert out.stdout.startswith("allocator: blocks >= 256 KiB from the OS, 2 arenas"), out.stdout + out.stderr
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MALLOC_ARENA_MAX": "4"}, capture_output=True, text=True, timeout=60
    )
    assert "environment" in out.stdout or not sys.platform.startswith("linux"), out.stdout + out.stderr
