"""One Daedalus serving several checkpoints (--weights repeated; Wan 2.2's two experts; PROTOCOL §5.4):
the command line and config, the backends a server holds (one family, none twice), the session bound
by HELLO's fingerprint, CHALLENGE.models, the mismatch error that lists the models, reconfigure moving
them all, and the client pool keeping a session per model. Toy back halves of two seeds stand in for
two checkpoints (tests/test_wan_split.py runs the real Wan pair)."""

from __future__ import annotations

import pytest
import torch
from comfyui_mesh import handshake, protocol
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.constants import MAX_POOLED_MODELS, PACKAGE_VERSION
from comfyui_mesh.errors import LocalError, VersionMismatch
from comfyui_mesh.handshake import Expect, ProblemKind
from comfyui_mesh.server.__main__ import build_parser, config_from_args, make_factory
from comfyui_mesh.server.core import DaedalusServer, ServerState, Session
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient, drop_pooled, pooled_client
from test_handshake import make_client, pair

TOKEN = "0123456789abcdef0123456789abcdef"


def toy(seed: int):
    return lambda n: ToyBackend(n, seed=seed)


def two_model_state(n_blocks: int = 3) -> ServerState:
    return ServerState(ServerConfig(port=0, device="cpu", n_blocks=n_blocks), [toy(0), toy(1)], TOKEN)


@pytest.fixture
def server():
    srv = DaedalusServer(two_model_state())
    host, port = srv.start()
    yield srv, host, port
    drop_pooled(host, port)
    srv.shutdown()


def fp(seed: int, n_blocks: int = 3) -> str:
    return ToyBackend(n_blocks, seed=seed).fingerprint


# ---------------------------------------------------------------------------- command line, config


def test_weights_repeated_gives_the_main_checkpoint_and_the_extra_ones():
    cfg = config_from_args(build_parser().parse_args(["--weights", "/m/high.st", "--weights", "/m/low.st"]))
    assert (cfg.weights, cfg.extra_weights) == ("/m/high.st", ("/m/low.st",))
    assert cfg.all_weights == ("/m/high.st", "/m/low.st")
    one = config_from_args(build_parser().parse_args(["--weights", "/m/flux.st"]))
    assert (one.weights, one.extra_weights, one.all_weights) == ("/m/flux.st", (), ("/m/flux.st",))
    none = config_from_args(build_parser().parse_args(["--toy"]))
    assert (none.weights, none.all_weights) == ("", ())


def test_config_refuses_a_checkpoint_twice_and_extras_without_a_main_one():
    with pytest.raises(
        LocalError, match=r"checkpoint /m/../m/a.st is given twice in --weights: name each checkpoint once"
    ):
        ServerConfig(weights="/m/a.st", extra_weights=("/m/b.st", "/m/../m/a.st"))
    with pytest.raises(LocalError, match="extra_weights given without weights"):
        ServerConfig(extra_weights=("/m/b.st",))
    assert ServerConfig.from_dict({"weights": "/m/a.st", "extra_weights": ["/m/b.st"]}).extra_weights == ("/m/b.st",)


def test_one_factory_per_checkpoint_and_one_for_the_toy():
    cfg = ServerConfig(weights="/m/high.st", extra_weights=("/m/low.st",), device="cpu")
    assert len(make_factory(cfg, toy=False)) == 2
    assert len(make_factory(ServerConfig(device="cpu"), toy=True)) == 1


# ---------------------------------------------------------------------------- the backends a server holds


def test_state_holds_each_checkpoint_and_finds_it_by_fingerprint():
    st = two_model_state()
    a, b = st.backends
    assert st.backend is a and a.fingerprint != b.fingerprint
    assert st.models() == [
        {"fingerprint": a.fingerprint, "model": "toy-8x64"},
        {"fingerprint": b.fingerprint, "model": "toy-8x64-seed1"},
    ]
    found = [st.slot_for(f) for f in (a.fingerprint, b.fingerprint, "", "ff" * 16)]
    assert found == [0, 1, 0, None]


class Other(ToyBackend):
    arch = "flux2"
    closed: list[str] = []

    def close(self) -> None:
        Other.closed.append(self.model_name)


class Closing(ToyBackend):
    def close(self) -> None:
        Other.closed.append(self.model_name)


def test_checkpoints_of_two_families_are_refused_naming_both_and_the_fix():
    Other.closed = []
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    with pytest.raises(LocalError) as e:
        ServerState(cfg, [lambda n: Closing(n), lambda n: Other(n, seed=1)], TOKEN)
    assert str(e.value) == (
        "toy-8x64-seed1 is a flux2 model but toy-8x64 is toy: one Daedalus serves checkpoints of one family; "
        "start a second Daedalus on another --port for it"
    )
    assert Other.closed == ["toy-8x64", "toy-8x64-seed1"], "what was loaded is freed"


def test_the_same_weights_twice_are_refused():
    cfg = ServerConfig(port=0, device="cpu", n_blocks=3)
    with pytest.raises(LocalError, match="toy-8x64 holds the same back-half weights as toy-8x64: give each"):
        ServerState(cfg, [toy(0), toy(0)], TOKEN)


# ---------------------------------------------------------------------------- handshake, session binding


def session() -> Session:
    return Session(two_model_state(), "memory:1")


@pytest.mark.parametrize("seed", [0, 1])
def test_hello_fingerprint_binds_the_session_and_challenge_lists_every_model(seed):
    s = session()
    client = make_client(expect=Expect("toy", 3, fp(seed)))
    pair(client, s)
    assert client.done and client.problems == []
    ch = client.challenge
    assert s.slot == seed and s.backend is s.state.backends[seed]
    assert (ch.fingerprint, ch.model) == (fp(seed), s.backend.model_name)
    assert ch.models == s.state.models() and len(ch.models) == 2


def test_no_fingerprint_is_the_main_model():
    s = session()
    client = make_client(expect=Expect())
    pair(client, s)
    assert client.done and s.slot == 0 and client.challenge.fingerprint == fp(0)


def test_an_unknown_fingerprint_names_every_model_the_server_serves():
    s = session()
    client = make_client(expect=Expect("toy", 3, "ff" * 16))
    pair(client, s)
    (p,) = client.problems
    assert p.kind is ProblemKind.FINGERPRINT and p.fatal and isinstance(p.exception(), VersionMismatch)
    assert p.message.startswith(
        f"Daedalus at memory:1 holds none of its checkpoints' back-half weights (toy-8x64 {fp(0)[:12]}, "
        f"toy-8x64-seed1 {fp(1)[:12]}) than this ComfyUI's model (fingerprint ffffffffffff): load the same "
        "checkpoint file with the same weight dtype on both machines (or add it to that Daedalus: --weights "
        "once per checkpoint)"
    )


def test_challenge_models_are_optional_on_the_wire():
    """An older server sends no ``models``: the mismatch message names its one model, as before; entries
    that are not {fingerprint, model} strings are skipped; a header field an older client does not
    know is ignored by its decoder (protocol._build reads only its own fields)."""
    old = protocol.Challenge(
        package_version=PACKAGE_VERSION, torch_version=torch.__version__, arch="toy", model="m.st", n_blocks=3,
        fingerprint="aa" * 16,
    )  # fmt: skip
    (back,) = protocol.decode_all(protocol.encode_bytes(old))
    assert back.models == [] and handshake.served_models(back) == [("aa" * 16, "m.st")]
    (p,) = handshake.problems(back, Expect("toy", 3, "bb" * 16), handshake.local_versions(), False)
    assert "holds different back-half weights (m.st, fingerprint aaaaaaaaaaaa) than" in p.message
    assert "--weights once" not in p.message
    junk = protocol.Challenge(fingerprint="aa" * 16, model="m", models=[1, {"fingerprint": 2}, {"model": "x"}])
    assert handshake.served_models(junk) == [("aa" * 16, "m")]
    sent = protocol.Challenge(models=[{"fingerprint": "cc", "model": "x"}])
    assert protocol.decode_all(protocol.encode_bytes(sent)) == [sent]
    older = protocol._build(protocol.MsgKind.CHALLENGE, {"arch": "toy", "a_later_field": [{"x": 1}]}, ())
    assert older == protocol.Challenge(arch="toy")


# ---------------------------------------------------------------------------- real sessions on loopback


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 11, 64, generator=g), torch.randn(64, generator=g)


def _call(c: MeshClient, front, bias):
    return c.forward(arch="toy", n_blocks=3, coded={"x": front}, exact={}, consts={"bias": bias}, scalars={})


def test_two_models_on_one_server_each_answer_with_their_own_weights(server):
    srv, host, port = server
    x, bias = _inputs()
    models = [ToyModel(seed=0), ToyModel(seed=1)]
    cfg = ClientConfig(host=host, port=port, token=TOKEN)
    clients = [pooled_client(cfg, {"arch": "toy", "n_blocks": 3, "fingerprint": fp(s)}) for s in (0, 1)]
    assert clients[0] is not clients[1]
    for _ in range(2):  # alternately, like two KSamplerAdvanced: each keeps its session and its constants
        for seed in (0, 1):
            out, stats = _call(clients[seed], models[seed].run(x, bias, 0, 5), bias)
            assert torch.equal(out["out"], models[seed].run(x, bias))
            assert not torch.equal(out["out"], models[1 - seed].run(x, bias))
    assert srv.state.stats.clients == 2 and stats.consts_sent == 0


def test_reconfigure_moves_every_model_and_answers_with_the_sessions_own(server):
    srv, host, port = server
    c = MeshClient(ClientConfig(host=host, port=port, token=TOKEN), expect={"fingerprint": fp(1)})
    r = c.reconfigure(5)
    assert (r.n_blocks, r.fingerprint, r.no_op) == (5, fp(1, 5), False)
    assert [b.n_blocks for b in srv.state.backends] == [5, 5]
    assert [b.fingerprint for b in srv.state.backends] == [fp(0, 5), fp(1, 5)]
    c.close()
    x, bias = _inputs()
    for seed in (0, 1):
        m = MeshClient(ClientConfig(host=host, port=port, token=TOKEN), expect={"fingerprint": fp(seed, 5)})
        model = ToyModel(seed=seed)
        out, _ = m.forward(arch="toy", n_blocks=5, coded={"x": model.run(x, bias, 0, 3)}, exact={},
                           consts={"bias": bias}, scalars={})  # fmt: skip
        assert torch.equal(out["out"], model.run(x, bias))
        m.close()


# ---------------------------------------------------------------------------- the client pool


def test_pool_keeps_a_session_per_model_and_closes_the_least_recently_used():
    cfg = ClientConfig(host="192.0.2.7", port=7437)
    exp = [{"arch": "wan", "n_blocks": 4, "fingerprint": f"{i:02x}" * 16} for i in range(MAX_POOLED_MODELS + 1)]
    try:
        a, b = pooled_client(cfg, exp[0]), pooled_client(cfg, exp[1])
        assert a is not b and pooled_client(cfg, exp[0]) is a and pooled_client(cfg, dict(exp[1])) is b
        assert pooled_client(cfg, exp[0], lane=1) is not a, "lanes stay apart"
        assert pooled_client(ClientConfig(host="192.0.2.7", port=7438), exp[0]) is not a, "ports stay apart"
        assert pooled_client(cfg, exp[0]) is a  # now b is the least recently used
        for e in exp[2:]:  # one more model than kept: b goes
            pooled_client(cfg, e)
        assert pooled_client(cfg, exp[0]) is a
        assert pooled_client(cfg, exp[1]) is not b
    finally:
        drop_pooled("192.0.2.7", 7437)
        drop_pooled("192.0.2.7", 7438)


def test_pool_closes_the_sessions_of_another_n_blocks_on_the_same_server():
    cfg = ClientConfig(host="192.0.2.8", port=7437)
    other = ClientConfig(host="192.0.2.8", port=7438)
    try:
        a = pooled_client(cfg, {"arch": "wan", "n_blocks": 4, "fingerprint": "aa" * 16})
        lane = pooled_client(cfg, {"arch": "wan", "n_blocks": 4, "fingerprint": "aa" * 16}, lane=1)
        elsewhere = pooled_client(other, {"arch": "wan", "n_blocks": 4, "fingerprint": "aa" * 16})
        # the user set n_blocks_remote 6: the fingerprint changes with it, and the server serves only 6 now
        b = pooled_client(cfg, {"arch": "wan", "n_blocks": 6, "fingerprint": "bb" * 16})
        assert b is not a
        assert pooled_client(cfg, {"arch": "wan", "n_blocks": 4, "fingerprint": "aa" * 16}) is not a, "a was closed"
        assert pooled_client(other, {"arch": "wan", "n_blocks": 4, "fingerprint": "aa" * 16}) is elsewhere
        assert pooled_client(cfg, {"arch": "wan", "n_blocks": 6, "fingerprint": "bb" * 16}, lane=1) is not lane
    finally:
        drop_pooled("192.0.2.8", 7437)
        drop_pooled("192.0.2.8", 7438)
