"""A GPU that can be shared (issue 14, item 6): named tokens with limits of their own, added and revoked
from the command line while the server runs, the token's name in the log, reconfigure only where the
operator allows it, and the single token file of before still working as the "default" token."""

from __future__ import annotations

import logging
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from comfyui_mesh import auth
from comfyui_mesh.config import ClientConfig, ServerConfig
from comfyui_mesh.constants import STATUS_CLIENT_NAME
from comfyui_mesh.errors import AuthError, LocalError, MeshError, RemoteFailure
from comfyui_mesh.server.__main__ import main as server_main
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.server.tokens import NamedTokens
from comfyui_mesh.server.toy import ToyBackend, ToyModel
from comfyui_mesh.transport import MeshClient

BOUND_S = 10.0  # a change is picked up within TOKEN_RELOAD_S (1 s); generous for a loaded CI machine


@contextmanager
def serve(state_dir: Path, **cfg: object) -> Iterator[DaedalusServer]:
    """A server as the CLI starts one: the default token from <state>/token, named tokens beside it."""
    token, _ = auth.load_or_create_server_token(state_dir / "token")
    settings: dict = {"port": 0, "device": "cpu", "n_blocks": 3, "state_dir": str(state_dir), **cfg}
    st = ServerState(ServerConfig(**settings), ToyBackend, token, named=NamedTokens(state_dir))
    srv = DaedalusServer(st)
    srv.start()
    try:
        yield srv
    finally:
        srv.shutdown()


def client(srv: DaedalusServer, token: str, **kw) -> MeshClient:
    host, port = srv.address
    return MeshClient(ClientConfig(host=host, port=port, token=token, **kw), expect={"arch": "toy", "n_blocks": 3})


def step(c: MeshClient) -> None:
    model, g = ToyModel(), torch.Generator().manual_seed(0)
    x, bias = torch.randn(1, 5, 64, generator=g), torch.randn(64, generator=g)
    out, _ = c.forward(
        arch="toy", n_blocks=3, coded={"x": model.run(x, bias, 0, 5)}, exact={}, consts={"bias": bias}, scalars={}
    )
    assert torch.equal(out["out"], model.run(x, bias))


def eventually(cond, what: str) -> None:
    end = time.monotonic() + BOUND_S
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {BOUND_S} s: {what}")


def cli(state_dir: Path, *args: str, capsys) -> str:
    assert server_main(["tokens", *args, "--state-dir", str(state_dir)]) == 0
    return capsys.readouterr().out


def added_token(out: str, name: str) -> str:
    line = next(ln for ln in out.splitlines() if ln.startswith(f"token for {name}: "))
    return line.split(": ", 1)[1]


def connects(srv: DaedalusServer, token: str) -> bool:
    c = client(srv, token)
    try:
        c.connect()
        return True
    except AuthError:
        return False
    except RemoteFailure as e:  # busy: the server has not yet seen a just-closed session go
        if e.code != "busy":
            raise
        return False
    finally:
        c.close()


def test_cli_adds_lists_and_revokes_tokens_in_a_private_file(tmp_path, capsys):
    out = cli(tmp_path, "add", "alice", "--max-sessions", "2", capsys=capsys)
    tok = added_token(out, "alice")
    assert len(tok) == 64
    path = tmp_path / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cli(tmp_path, "add", "render-box", "--may-reconfigure", capsys=capsys)
    auth.load_or_create_server_token(tmp_path / "token")
    listed = cli(tmp_path, "list", capsys=capsys)
    assert "default: key id" in listed and "may reconfigure" in listed
    assert f"alice: key id {auth.key_id(tok)}, at most 2 sessions, may not reconfigure" in listed
    assert "render-box" in listed and tok not in listed  # names and key ids, never the tokens
    cli(tmp_path, "revoke", "alice", capsys=capsys)
    assert [e.name for e in NamedTokens(tmp_path).read()] == ["render-box"]
    for bad in (["add", "render-box"], ["revoke", "alice"], ["revoke", "default"], ["add", "no spaces"]):
        assert server_main(["tokens", *bad, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "exists already" in err and "no token named 'alice'" in err and "--regenerate-token" in err


def test_tokens_added_and_revoked_while_the_server_runs(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="daedalus")
    with serve(tmp_path) as srv:
        bob = added_token(cli(tmp_path, "add", "bob", capsys=capsys), "bob")
        eventually(lambda: connects(srv, bob), "bob's new token accepted without a restart")
        c = client(srv, bob)
        step(c)
        assert srv.state.stats.clients == 1
        assert any(r.getMessage().startswith("step ") and "[bob]" in r.getMessage() for r in caplog.records)
        assert any("client 'icarus' connected (token 'bob')" in r.getMessage() for r in caplog.records)

        cli(tmp_path, "revoke", "bob", capsys=capsys)
        eventually(lambda: srv.state.stats.clients == 0, "bob's open session closed by the revocation")
        with pytest.raises(AuthError, match="rejected the token"):  # its next call reconnects and is refused
            step(c)
        assert not connects(srv, bob)
        default = (tmp_path / "token").read_text().strip()
        assert connects(srv, default)  # everyone else is unaffected


def test_a_token_limited_to_one_session_and_probes_beside_it(tmp_path):
    named = NamedTokens(tmp_path)
    e = named.add("carol", max_sessions=1)
    with serve(tmp_path) as srv:
        first = client(srv, e.token)
        first.connect()
        with pytest.raises(RemoteFailure) as err:
            client(srv, e.token).connect()
        assert err.value.code == "busy" and "token 'carol' has 1 sessions open, its limit" in err.value.message
        probe = client(srv, e.token, client_name=STATUS_CLIENT_NAME)  # the node's status light still works
        probe.connect()
        probe.close()
        first.close()
        eventually(lambda: connects(srv, e.token), "the slot free again once the first session closed")


def test_reconfigure_only_where_the_operator_allows_it(tmp_path):
    named = NamedTokens(tmp_path)
    guest, trusted = named.add("guest"), named.add("ops", may_reconfigure=True)
    with serve(tmp_path) as srv:
        c = client(srv, guest.token)
        with pytest.raises(RemoteFailure) as err:
            c.reconfigure(5)
        assert err.value.code == "not_allowed"
        assert "token 'guest' may not reconfigure" in err.value.message and "--may-reconfigure" in err.value.message
        assert srv.state.backend.n_blocks == 3
        step(c)  # the session stays usable
        c.close()
        for tok, n in ((trusted.token, 5), ((tmp_path / "token").read_text().strip(), 3)):  # ops, then default
            c = MeshClient(ClientConfig(host=srv.address[0], port=srv.address[1], token=tok))
            assert c.reconfigure(n).n_blocks == n == srv.state.backend.n_blocks
            c.close()


def test_the_old_single_token_file_is_the_default_token(tmp_path):
    token, _ = auth.load_or_create_server_token(tmp_path / "token")
    assert not (tmp_path / "tokens.json").exists()
    with serve(tmp_path) as srv:
        c = client(srv, token)
        c.connect()
        assert srv.state.keyring is not None
        assert [e.name for e in srv.state.keyring.entries()] == ["default"]
        assert c.reconfigure(4).n_blocks == 4
        c.close()
    # and a server built as before (a token, no state folder) serves it the same way
    st = ServerState(ServerConfig(port=0, device="cpu", n_blocks=3), ToyBackend, token)
    assert st.keyring is not None and st.keyring.lookup(auth.key_id(token)) == auth.TokenEntry("default", token)


def test_a_broken_tokens_file_keeps_the_tokens_in_use(tmp_path, caplog):
    e = NamedTokens(tmp_path).add("dave")
    with serve(tmp_path) as srv:
        assert connects(srv, e.token)
        (tmp_path / "tokens.json").write_text("{not json")
        assert srv.state.reload_tokens() is False
        assert connects(srv, e.token)
        assert any("cannot read the named tokens" in r.getMessage() for r in caplog.records)


def test_names_and_values_are_checked(tmp_path):
    named = NamedTokens(tmp_path)
    for bad in ("", "a b", "x" * 33, "-lead", "default"):
        with pytest.raises(LocalError):
            named.add(bad)
    with pytest.raises(LocalError, match="max_sessions"):
        named.add("eve", max_sessions=-1)
    assert named.read() == []


def test_regenerating_the_default_token_closes_its_sessions(tmp_path):
    with serve(tmp_path) as srv:
        old = (tmp_path / "token").read_text().strip()
        c = client(srv, old)
        c.connect()
        srv.state.set_token(auth.new_token())
        eventually(lambda: srv.state.stats.clients == 0, "the old token's session closed")
        with pytest.raises(MeshError):
            c.ping()
