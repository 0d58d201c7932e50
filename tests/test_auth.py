"""HMAC challenge-response, token files, the client's TokenStore, and typed configuration."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from comfyui_mesh import auth, config, constants, errors

HEX64 = re.compile(r"[0-9a-f]{64}")
TOKEN = "a3f1" * 16
CN = "11" * 32
SN = "22" * 32


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def no_env_token(monkeypatch):
    monkeypatch.delenv(constants.TOKEN_ENV, raising=False)


# ---------------------------------------------------------------------------- HMAC proofs


def test_new_token_and_nonce_are_random_hex():
    toks = {auth.new_token() for _ in range(8)}
    nonces = {auth.new_nonce() for _ in range(8)}
    assert len(toks) == 8 and len(nonces) == 8
    assert all(HEX64.fullmatch(t) for t in toks | nonces)
    assert len(auth.new_token()) == 2 * constants.TOKEN_BYTES
    assert len(auth.new_nonce()) == 2 * constants.NONCE_BYTES


SID = "5e" * 16


def T(cn: str = CN, sn: str = SN, **kw) -> auth.Transcript:
    fields = {"server_id": SID, "key_id": auth.key_id(TOKEN), "client_name": "icarus", "link": "aes-256-gcm", **kw}
    return auth.Transcript(cn, sn, **fields)


def test_proofs_are_hex_sha256_and_deterministic():
    c = auth.client_proof(TOKEN, T())
    s = auth.server_proof(TOKEN, T())
    assert HEX64.fullmatch(c) and HEX64.fullmatch(s)
    assert c == auth.client_proof(TOKEN, T())
    assert s == auth.server_proof(TOKEN, T())


def test_client_and_server_proofs_differ():
    assert auth.client_proof(TOKEN, T()) != auth.server_proof(TOKEN, T())
    # a server proof can't be replayed as a client proof even with the nonces swapped
    assert auth.client_proof(TOKEN, T()) != auth.server_proof(TOKEN, T(SN, CN))


@pytest.mark.parametrize("proof", [auth.client_proof, auth.server_proof], ids=["client", "server"])
def test_proof_depends_on_token_nonces_and_both_identities(proof):
    base = proof(TOKEN, T())
    assert proof("b" + TOKEN[1:], T()) != base
    assert proof(TOKEN, T("33" + CN[2:])) != base
    assert proof(TOKEN, T(CN, SN[:-2] + "33")) != base
    assert proof(TOKEN, T(SN, CN)) != base  # order of the nonces matters
    assert proof(TOKEN, T(CN + SN[:2], SN[2:])) != base  # the field boundaries matter
    assert proof(TOKEN, T(server_id="6f" * 16)) != base  # another server
    assert proof(TOKEN, T(client_name="mallory")) != base  # another client
    assert proof(TOKEN, T(key_id="0" * 16)) != base
    assert proof(TOKEN, T(link="none")) != base  # a downgrade of the link changes both proofs
    assert proof(TOKEN, T(client_name="icarus|x")) != proof(TOKEN, T(client_name="icarus", link="x|aes-256-gcm"))


@pytest.mark.parametrize("proof", [auth.client_proof, auth.server_proof], ids=["client", "server"])
def test_surrounding_whitespace_in_token_is_ignored(proof):
    # token files end with a newline; users paste with spaces
    assert proof(TOKEN + "\n", T()) == proof(TOKEN, T())
    assert proof("  " + TOKEN + " ", T()) == proof(TOKEN, T())


def test_check_accepts_right_proof_and_rejects_wrong_token():
    expected = auth.client_proof(TOKEN, T())
    assert auth.check(expected, auth.client_proof(TOKEN, T())) is True
    assert auth.check(expected, auth.client_proof(auth.new_token(), T())) is False
    assert auth.check(expected, auth.server_proof(TOKEN, T())) is False
    assert auth.check(expected, "") is False
    assert auth.check(expected, expected.upper()) is False
    assert auth.check(expected, expected[:-1]) is False
    assert auth.check(expected, "é" * 64) is False


def test_key_id_names_a_token_without_revealing_it():
    kid = auth.key_id(TOKEN)
    assert re.fullmatch(r"[0-9a-f]{16}", kid) and TOKEN[:16] not in kid
    assert auth.key_id(" " + TOKEN + "\n") == kid and auth.key_id(auth.new_token()) != kid
    assert auth.key_id("") == auth.key_id(None) == ""


def test_server_id_file_is_made_once_private_and_checked(tmp_path):
    path = tmp_path / "state" / "server_id"
    sid = auth.load_or_create_server_id(path)
    assert re.fullmatch(r"[0-9a-f]{32}", sid) and mode(path) == 0o600
    assert auth.load_or_create_server_id(path) == sid  # persistent
    path.write_text("not hex\n")
    with pytest.raises(errors.LocalError, match="delete it"):
        auth.load_or_create_server_id(path)


def test_pins_live_beside_the_tokens_and_saving_a_token_forgets_the_pin(tmp_path, no_env_token):
    store = auth.TokenStore(tmp_path / "tokens.json")
    store.set("Gpu.Lan", 7777, TOKEN)
    assert store.pinned_id("gpu.lan", 7777) == ""
    store.pin("gpu.lan", 7777, SID)
    store.pin("other", 7777, "6f" * 16)
    assert store.pinned_id("GPU.lan", 7777) == SID and store.get("gpu.lan", 7777) == TOKEN
    assert mode(store.path) == 0o600
    assert json.loads(store.path.read_text())["server_ids"]["gpu.lan:7777"] == SID
    store.set("gpu.lan", 7777, TOKEN)  # saved again: the next connection pins what it sees
    assert store.pinned_id("gpu.lan", 7777) == "" and store.pinned_id("other", 7777) == "6f" * 16
    assert auth.TokenStore(None).pinned_id("gpu.lan", 7777) == ""  # no file: nothing pinned
    auth.TokenStore(None).pin("gpu.lan", 7777, SID)


# ---------------------------------------------------------------------------- server token file


def test_load_or_create_server_token(tmp_path):
    path = tmp_path / "state" / "daedalus" / "token"
    token, created = auth.load_or_create_server_token(path)
    assert created is True
    assert HEX64.fullmatch(token)
    assert path.read_text() == token + "\n"
    assert mode(path) == 0o600
    assert not path.with_name("token.tmp").exists()
    again, created2 = auth.load_or_create_server_token(path)
    assert (again, created2) == (token, False)
    assert mode(path) == 0o600


def test_existing_token_file_is_read_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  my-own-secret-token-1234 \n\n")
    assert auth.load_or_create_server_token(path) == ("my-own-secret-token-1234", False)


@pytest.mark.parametrize("content", ["", "\n", "short", "x" * 15, "   " + "y" * 15 + "   \n"])
def test_too_short_token_file(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(errors.LocalError, match=re.escape(str(path)) + ".*fewer than 16"):
        auth.load_or_create_server_token(path)
    assert path.read_text() == content  # never silently replaced


def test_token_of_exactly_16_chars_is_accepted(tmp_path):
    path = tmp_path / "token"
    path.write_text("z" * 16)
    assert auth.load_or_create_server_token(path) == ("z" * 16, False)


def test_regenerate_server_token(tmp_path):
    path = tmp_path / "token"
    old, _ = auth.load_or_create_server_token(path)
    new = auth.regenerate_server_token(path)
    assert new != old and HEX64.fullmatch(new)
    assert mode(path) == 0o600
    assert auth.load_or_create_server_token(path) == (new, False)


def test_token_file_is_private_even_with_stale_tmp(tmp_path):
    path = tmp_path / "token"
    stale = tmp_path / "token.tmp"
    stale.write_text("leftover")
    os.chmod(stale, 0o644)
    auth.load_or_create_server_token(path)
    assert mode(path) == 0o600


# ---------------------------------------------------------------------------- TokenStore


def test_token_store_get_set_clear(tmp_path, no_env_token):
    path = tmp_path / "user" / "mesh_tokens.json"
    store = auth.TokenStore(path)
    assert store.get("10.0.0.2", 7777) is None
    assert store.has("10.0.0.2", 7777) is False
    store.set("10.0.0.2", 7777, " tok-a\n")
    store.set("10.0.0.2", 7778, "tok-b")
    store.set("gpu-box", 7777, "tok-c")
    assert store.get("10.0.0.2", 7777) == "tok-a"
    assert store.get("10.0.0.2", 7778) == "tok-b"
    assert store.get("gpu-box", 7777) == "tok-c"
    assert store.get("gpu-box", 7778) is None
    assert store.has("10.0.0.2", 7777) is True
    assert mode(path) == 0o600
    # persisted for a fresh store on the same file
    assert auth.TokenStore(path).get("10.0.0.2", 7778) == "tok-b"
    assert json.loads(path.read_text()) == {"10.0.0.2:7777": "tok-a", "10.0.0.2:7778": "tok-b", "gpu-box:7777": "tok-c"}
    # clearing one entry leaves the others
    store.set("10.0.0.2", 7777, "")
    assert store.get("10.0.0.2", 7777) is None
    assert store.get("10.0.0.2", 7778) == "tok-b"
    assert store.get("gpu-box", 7777) == "tok-c"
    store.set("never-set", 1, "")  # clearing a missing entry is fine
    assert "never-set:1" not in json.loads(path.read_text())


def test_token_store_host_is_case_insensitive(tmp_path, no_env_token):
    store = auth.TokenStore(tmp_path / "t.json")
    store.set("GPU-Box.LAN", 7777, "tok")
    assert store.get("gpu-box.lan", 7777) == "tok"
    assert store.get("GPU-BOX.lan", 7777) == "tok"
    assert store.get(" gpu-box.lan ", 7777) == "tok"
    store.set("gpu-box.LAN", 7777, "tok2")
    assert store.get("GPU-Box.LAN", 7777) == "tok2"
    assert json.loads((tmp_path / "t.json").read_text()) == {"gpu-box.lan:7777": "tok2"}
    assert auth.TokenStore.key("  A.b ", "42") == "a.b:42"


def test_token_store_env_overrides(tmp_path, monkeypatch):
    store = auth.TokenStore(tmp_path / "t.json")
    monkeypatch.delenv(constants.TOKEN_ENV, raising=False)
    store.set("host", 7777, "from-file")
    monkeypatch.setenv(constants.TOKEN_ENV, "  from-env \n")
    assert store.get("host", 7777) == "from-env"
    assert store.get("any-other-host", 1) == "from-env"
    assert store.has("unknown", 2) is True
    assert auth.TokenStore(None).get("x", 1) == "from-env"
    # a blank variable does not override
    monkeypatch.setenv(constants.TOKEN_ENV, "   ")
    assert store.get("host", 7777) == "from-file"
    assert store.get("any-other-host", 1) is None


def test_token_store_corrupt_file(tmp_path, no_env_token):
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    store = auth.TokenStore(path)
    with pytest.raises(errors.LocalError, match=re.escape(str(path))):
        store.get("h", 1)
    with pytest.raises(errors.LocalError, match="fix or delete the file"):
        store.set("h", 1, "tok")
    assert path.read_text() == "{not json"  # not overwritten


def test_token_store_undecodable_file(tmp_path, no_env_token):
    path = tmp_path / "tokens.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(errors.LocalError, match=re.escape(str(path))):
        auth.TokenStore(path).get("h", 1)


def test_token_store_without_path(no_env_token):
    store = auth.TokenStore(None)
    assert store.get("h", 1) is None
    with pytest.raises(errors.LocalError, match="no token store path"):
        store.set("h", 1, "tok")


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("port", [-1, 65536, 10**6, "7777", 7777.0, None])
def test_client_config_rejects_bad_port(port):
    with pytest.raises(errors.LocalError, match="must be an integer 0..65535"):
        config.ClientConfig(host="10.0.0.2", port=port)


def test_client_config_rejects_bool_port():
    try:
        cfg = config.ClientConfig(port=True)
    except errors.LocalError:
        return
    raise AssertionError(f"accepted port=True: {cfg.address}")


@pytest.mark.parametrize("host", ["", "   ", "\t\n"])
def test_client_config_rejects_empty_host(host):
    with pytest.raises(errors.LocalError, match="remote_host is empty"):
        config.ClientConfig(host=host)


def test_client_config_valid():
    cfg = config.ClientConfig(host="192.168.0.18", port=0)
    assert cfg.address == "192.168.0.18:0"
    assert config.ClientConfig(port=65535).address == f"{constants.DEFAULT_HOST}:65535"
    assert config.ClientConfig().port == constants.DEFAULT_PORT


def test_server_config_from_dict_rejects_unknown_keys():
    with pytest.raises(errors.LocalError, match=r"unknown server settings \['blocks', 'gpu'\]"):
        config.ServerConfig.from_dict({"n_blocks": 4, "blocks": 4, "gpu": 0})


def test_server_config_from_dict_valid(tmp_path):
    cfg = config.ServerConfig.from_dict(
        {"weights": "/m/flux.safetensors", "n_blocks": 0, "port": 0, "dtype": "bfloat16", "state_dir": str(tmp_path)}
    )
    assert (cfg.weights, cfg.n_blocks, cfg.port, cfg.dtype) == ("/m/flux.safetensors", 0, 0, "bfloat16")
    assert cfg.auth is True
    assert cfg.token_path == tmp_path / "token"
    assert config.ServerConfig.from_dict({}) == config.ServerConfig()


@pytest.mark.parametrize("dtype", ["int8", "fp16", "float64", "", "BFLOAT16"])
def test_server_config_rejects_bad_dtype(dtype):
    with pytest.raises(errors.LocalError, match="must be auto, bfloat16, float16 or float32"):
        config.ServerConfig(dtype=dtype)


@pytest.mark.parametrize("dtype", ["auto", "bfloat16", "float16", "float32"])
def test_server_config_accepts_dtypes(dtype):
    assert config.ServerConfig(dtype=dtype).dtype == dtype


@pytest.mark.parametrize("n", [-1, -100])
def test_server_config_rejects_negative_n_blocks(n):
    with pytest.raises(errors.LocalError, match=f"n_blocks must be >= 0, got {n}"):
        config.ServerConfig(n_blocks=n)


@pytest.mark.parametrize("port", [-5, 70000, "80"])
def test_server_config_rejects_bad_port(port):
    with pytest.raises(errors.LocalError, match="port"):
        config.ServerConfig(port=port)


def test_server_config_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    if os.name == "nt":
        pytest.skip("XDG only")
    assert config.ServerConfig().token_path == tmp_path / "comfyui-mesh" / "daedalus" / "token"


# ---------------------------------------------------------------------------- errors


def test_error_hierarchy():
    assert issubclass(errors.LocalError, errors.MeshError)
    assert issubclass(errors.RemoteProtocolError, errors.MeshError)
    assert issubclass(errors.CodecError, errors.RemoteProtocolError)
    assert issubclass(errors.VersionMismatch, errors.LocalError)
    assert not issubclass(errors.RemoteProtocolError, errors.LocalError)
    assert not issubclass(errors.AuthError, (errors.LocalError, errors.RemoteProtocolError))
    e = errors.RemoteFailure("oom", "out of memory")
    assert (e.code, e.message, str(e)) == ("oom", "out of memory", "out of memory")
