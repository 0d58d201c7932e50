"""The handshake's two sans-IO halves paired in memory (no sockets): the client's ClientHandshake
against the server's Session, every frame through the real encoder and decoder; and the version,
model and token policy that the client raises and the status route shows."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from comfyui_mesh import auth, handshake, protocol
from comfyui_mesh.config import ServerConfig
from comfyui_mesh.constants import ALLOW_UNENCRYPTED_ENV, PACKAGE_VERSION, SKEW_ENV
from comfyui_mesh.errors import AuthError, RemoteFailure, RemoteProtocolError, VersionMismatch
from comfyui_mesh.handshake import ClientHandshake, Expect, ProblemKind, Versions
from comfyui_mesh.server.core import ServerState, Session
from comfyui_mesh.server.toy import ToyBackend

TOKEN = "0123456789abcdef0123456789abcdef"
HERE = Versions(PACKAGE_VERSION, "", torch.__version__)


def wire(msg: protocol.Message) -> protocol.Message:
    (back,) = protocol.decode_all(protocol.encode_bytes(msg))
    return back


def make_session(token: str | None = TOKEN, events: list | None = None) -> Session:
    st = ServerState(ServerConfig(port=0, device="cpu", n_blocks=3, auth=token is not None), ToyBackend, token)
    st.on_event = (events if events is not None else []).append
    return Session(st, "memory:1")


def make_client(
    token: str | None = TOKEN,
    expect: Expect | None = None,
    versions: Versions = HERE,
    skew=False,
    pinned_id: str = "",
    plaintext_ok: bool = False,
):
    return ClientHandshake(
        expect or Expect("toy", 3),
        versions,
        token,
        codecs=[0, 1],
        client_name="test",
        allow_skew=skew,
        where="Daedalus at memory:1",
        pinned_id=pinned_id,
        plaintext_ok=plaintext_ok,
    )


def pair(client: ClientHandshake, session: Session) -> list[protocol.Message]:
    """Drive both halves until neither has anything to send; returns every frame, in order."""
    log: list[protocol.Message] = []
    to_server: list[protocol.Message] = [client.hello()]
    while to_server:
        to_client = []
        for m in to_server:
            log.append(m)
            to_client += session.handle(wire(m))
        to_server = []
        for m in to_client:
            log.append(m)
            to_server += client.receive(wire(m))
    return log


def kinds(log):
    return [type(m).__name__ for m in log]


def test_paired_handshake_with_a_token_opens_the_session():
    events: list = []
    client, session = make_client(), make_session(events=events)
    log = pair(client, session)
    assert kinds(log) == ["Hello", "Challenge", "Auth", "Welcome"]
    assert client.done and session.phase == "ready" and not session.closed
    ch = client.challenge
    assert (ch.auth, ch.arch, ch.n_blocks, ch.model, ch.package_version) == (
        "hmac-sha256",
        "toy",
        3,
        "toy-8x64",
        PACKAGE_VERSION,
    )
    assert ch.nonce == session.handshake.nonce and log[0].nonce == client.nonce != ch.nonce
    assert client.problems == [] and client.error is None
    assert events == [{"kind": "client", "peer": "memory:1", "connected": True, "token": "default"}]
    assert session.handle(protocol.Ping(seq=7)) == [protocol.Pong(seq=7)]  # the session is open


def test_paired_handshake_without_auth():
    client, session = make_client(token=None), make_session(token=None)
    log = pair(client, session)
    assert kinds(log) == ["Hello", "Challenge", "Auth", "Welcome"]
    assert log[1].auth == "none" and log[1].link == "none" and log[1].mac == "" and log[2].mac == ""
    assert client.done and session.phase == "ready"
    assert client.link is None and session.link is None  # no token, no keys: nothing is sealed


def test_a_token_the_server_does_not_hold_gets_no_proof_and_the_client_proves_nothing():
    events: list = []
    client, session = make_client(token="f" * 32), make_session(events=events)
    log = pair(client, session)
    assert kinds(log) == ["Hello", "Challenge", "Bye"]  # no AUTH: nothing computed from the token goes out
    assert log[0].key_id == auth.key_id("f" * 32) and log[1].mac == ""
    assert isinstance(client.error, AuthError) and "rejected the token this ComfyUI uses" in str(client.error)
    assert session.closed and not client.done
    assert events == [{"kind": "auth_failed", "peer": "memory:1"}]


def test_a_wrong_client_proof_is_an_auth_failed_frame_and_an_auth_error():
    events: list = []
    client, session = make_client(), make_session(events=events)
    ch = session.handle(wire(client.hello()))[0]
    client.receive(wire(ch))  # the client's honest AUTH is replaced by a forged one
    (err,) = session.handle(wire(protocol.Auth(mac="0" * 64)))
    assert isinstance(err, protocol.Error) and (err.code, err.message) == ("auth_failed", "wrong token")
    with pytest.raises(AuthError, match="Daedalus at memory:1 rejected the token: wrong token"):
        client.receive(wire(err))
    assert session.closed and session.phase == "auth" and session.link is None
    assert events == [{"kind": "auth_failed", "peer": "memory:1"}]


@pytest.mark.parametrize(
    ("client_token", "server_token", "bye", "match"),
    [
        (None, TOKEN, "no token", "requires a token"),
        (TOKEN, None, "auth downgrade refused", "runs without authentication"),
    ],
)
def test_token_policy_says_bye_then_fails(client_token, server_token, bye, match):
    client, session = make_client(token=client_token), make_session(token=server_token)
    log = pair(client, session)
    assert kinds(log) == ["Hello", "Challenge", "Bye"] and log[-1].reason == bye
    assert isinstance(client.error, AuthError) and match in str(client.error)
    assert session.closed and not client.done


@pytest.mark.parametrize(
    "tamper",
    [
        {"mac": "0" * 64},  # a server without the token
        {"link": "none"},  # a man in the middle stripping the encryption
        {"server_id": "6f" * 16},  # ... or passing off another server's identity
        {"nonce": "33" * 32},
    ],
    ids=["forged-mac", "link-downgrade", "other-id", "other-nonce"],
)
def test_a_server_proof_that_does_not_cover_what_was_sent_is_refused_before_auth(tamper):
    client, session = make_client(), make_session()
    ch = session.handle(wire(client.hello()))[0]
    with pytest.raises(AuthError, match="could not prove it knows the token"):
        client.receive(wire(dataclasses.replace(ch, **tamper)))
    assert client.phase == "failed" and client.link is None


def test_the_server_id_is_pinned_and_a_changed_one_refused():
    session = make_session()
    sid = session.state.server_id
    assert re.fullmatch(r"[0-9a-f]{32}", sid)
    client = make_client(pinned_id=sid)
    pair(client, session)
    assert client.done and client.authenticated and client.challenge.server_id == sid
    other = make_session()  # another Daedalus that knows the same token, answering at the pinned address
    client = make_client(pinned_id=sid)
    ch = other.handle(wire(client.hello()))[0]
    with pytest.raises(AuthError) as e:
        client.receive(wire(ch))
    msg = str(e.value)
    assert "memory:1" in msg and sid in msg and other.state.server_id in msg and "Token…" in msg
    assert client.link is None  # refused before the client proved anything


def test_both_sides_derive_the_same_per_direction_keys():
    client, session = make_client(), make_session()
    pair(client, session)
    assert session.link is not None and client.link is not None
    assert session.token_name == "default"
    frame = protocol.encode(protocol.Ping(seq=7))
    for tx, rx in ((client.link, session.link), (session.link, client.link)):
        for header, sealed in tx.sealer.seal(frame):
            assert protocol.MAGIC not in sealed  # encrypted
            rx.opener.feed(header + sealed)
        got = bytes(rx.opener.take(1 << 20))
        assert protocol.decode_all(got) == [protocol.Ping(seq=7)]
    # one key per direction: what the client seals, the client itself cannot open
    c2, s2 = make_client(), make_session()
    pair(c2, s2)
    (h, sealed), *_ = list(c2.link.sealer.seal(frame))
    c2.link.opener.feed(h + sealed[:-1])
    with pytest.raises(RemoteProtocolError, match="failed authentication"):
        c2.link.opener.feed(sealed[-1:])


@pytest.mark.parametrize("plaintext_ok", [False, True])
def test_no_encrypt_is_accepted_only_where_allowed(plaintext_ok):
    st = ServerState(ServerConfig(port=0, device="cpu", n_blocks=3, encrypt=False), ToyBackend, TOKEN)
    session = Session(st, "memory:1")
    client = make_client(plaintext_ok=plaintext_ok)
    log = pair(client, session)
    assert log[1].link == "none" and log[1].auth == "hmac-sha256"
    if plaintext_ok:
        assert client.done and client.link is None and session.link is None and session.phase == "ready"
    else:
        assert kinds(log) == ["Hello", "Challenge", "Bye"] and log[-1].reason == "unencrypted link refused"
        assert isinstance(client.error, AuthError)
        assert "--no-encrypt" in str(client.error) and ALLOW_UNENCRYPTED_ENV in str(client.error)


def test_unknown_auth_scheme_and_wrong_messages_are_protocol_errors():
    ch = protocol.Challenge(nonce="ab", auth="rot13", package_version=PACKAGE_VERSION)
    client = make_client()
    client.hello()
    with pytest.raises(RemoteProtocolError, match="unknown auth scheme 'rot13'"):
        client.receive(ch)
    client = make_client()
    client.hello()
    with pytest.raises(RemoteProtocolError, match="answered hello with Pong"):
        client.receive(protocol.Pong())
    client = make_client()
    client.hello()
    with pytest.raises(RemoteFailure, match="busy: full") as e:
        client.receive(protocol.Error(code="busy", message="busy: full"))
    assert e.value.code == "busy"


@pytest.mark.parametrize(("first", "second"), [(protocol.Ping(), None), (None, protocol.Ping())])
def test_server_half_refuses_out_of_order_frames_and_closes(first, second):
    session = make_session()
    if first is None:
        session.handle(make_client().hello())
        got, want = session.handle(second), "expected auth, got Ping"
    else:
        got, want = session.handle(first), "expected hello, got Ping"
    assert got == [protocol.Error(code="bad_request", message=want)] and session.closed


def test_version_and_model_mismatches_raise_through_the_paired_handshake():
    session = make_session()
    session.state.backend.comfyui_version = "0.9.0"
    client = make_client(versions=Versions(PACKAGE_VERSION, "0.8.0", torch.__version__))
    pair(client, session)
    assert [p.kind for p in client.problems] == [ProblemKind.COMFYUI_VERSION]
    p = client.problems[0]
    assert p.fatal and isinstance(p.exception(), VersionMismatch)
    assert str(p.exception()).startswith(
        "Daedalus at memory:1 loads its model with ComfyUI 0.9.0, this ComfyUI is 0.8.0"
    )
    client = make_client(expect=Expect("flux2", 4, "ff" * 16), versions=Versions(PACKAGE_VERSION, "", "1.0.0"))
    pair(client, make_session())
    assert [p.kind for p in client.problems] == [
        ProblemKind.TORCH_VERSION,
        ProblemKind.ARCH,
        ProblemKind.N_BLOCKS,
        ProblemKind.FINGERPRINT,
    ]
    assert all(p.fatal for p in client.problems)
    assert "holds the last 3 blocks but n_blocks_remote is 4" in client.problems[2].message


def _challenge(**kw):
    base = dict(nonce="ab", package_version=PACKAGE_VERSION, comfyui_version="0.9.0", torch_version="2.7.1+cu128",
                arch="toy", model="m", n_blocks=3, fingerprint="aa" * 16)  # fmt: skip
    return protocol.Challenge(**{**base, **kw})


def test_skew_relaxes_comfyui_torch_and_fingerprint_only():
    ours = Versions("0.0.1", "0.8.0", "2.6.0")
    expect = Expect("toy", 3, "bb" * 16)
    strict = handshake.problems(_challenge(), expect, ours, allow_skew=False)
    assert [p.kind.value for p in strict] == ["package_version", "comfyui_version", "torch_version", "fingerprint"]
    assert all(p.fatal for p in strict) and strict[-1].message.endswith(f"(or set {SKEW_ENV}=1 to accept it)")
    relaxed = handshake.problems(_challenge(), expect, ours, allow_skew=True)
    assert [(p.kind.value, p.fatal) for p in relaxed] == [("package_version", True), ("fingerprint", False)]
    assert SKEW_ENV not in relaxed[-1].message
    assert (
        handshake.problems(
            _challenge(torch_version="2.7.0"), Expect(), Versions(PACKAGE_VERSION, "", "2.7.1+cpu"), False
        )
        == []
    )
    assert handshake.major_minor("2.7.1+cu128") == "2.7" and handshake.major_minor("2.10") == "2.10"


def test_accepted_fingerprint_skew_lets_the_handshake_finish():
    client = make_client(expect=Expect("toy", 3, "bb" * 16), skew=True)
    pair(client, make_session())
    assert client.done and [(p.kind, p.fatal) for p in client.problems] == [(ProblemKind.FINGERPRINT, False)]


def test_auth_problems_for_the_status_route():
    assert handshake.auth_problems(_challenge(auth="hmac-sha256"), have_token=True) == []
    assert handshake.auth_problems(_challenge(auth="none"), have_token=False) == []
    (p,) = handshake.auth_problems(_challenge(auth="hmac-sha256"), have_token=False)
    assert p.kind is ProblemKind.TOKEN_MISSING and p.brief.startswith("token needed") and p.bye == "no token"
    (p,) = handshake.auth_problems(_challenge(auth="none"), have_token=True)
    assert p.kind is ProblemKind.AUTH_DOWNGRADE and p.error is AuthError


def test_expect_of_a_mapping():
    assert Expect.of(None) == Expect()
    assert Expect.of({"arch": "flux2", "n_blocks": 4, "fingerprint": "ab", "other": 1}) == Expect("flux2", 4, "ab")
