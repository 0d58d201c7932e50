"""ComfyUI routes and websocket events behind the Icarus node UI (``web/mesh.js``).

Node-side glue: registered from ``__init__.py`` only when ComfyUI's ``PromptServer.instance``
exists, so importing the pack anywhere else registers nothing. Every Icarus node type shares
these routes; nothing here is specific to one model family.

``POST /mesh/status``                ``{host, port, refresh}``: probe a Daedalus (cached ``STATUS_TTL_S``, one probe per
                                      address in flight): light state, the server's model and
                                      n_blocks, whether a token is needed / saved, ``problems``
                                      (handshake.problems + auth_problems) and the first as ``error``;
                                      ``splits``: node id -> {family, family_display, n_blocks} of each
                                      Icarus node's last split against that address (the family it
                                      detected in its MODEL).
``POST /mesh/reconfigure``           ``{host, port, n_blocks}``: ask that Daedalus to hold
                                      ``n_blocks`` (the node's Confirm button).
``POST /mesh/token``                 ``{host, port, token}``: save (or, empty, delete) the token for
                                      host:port in ComfyUI's user folder; tokens are never returned.

The websocket events sent during a run (banners, per-step stats) are in ``ui_events.py``.

The probe reads the server's model and n_blocks from the Challenge (Hello -> Challenge -> Bye).
When a token is saved for that server it also answers the challenge with it, so a wrong token shows
as "token rejected" (amber) before a run fails on it; Daedalus keeps these logins (client name
``STATUS_CLIENT_NAME``) out of its log and client list, so polling leaves no trace there.

Security (SSRF): these routes make ComfyUI open TCP connections to a host:port named in the
request, like the original's reconfigure route did. What limits it: the address is validated
(a host name or IP and a port, no URL), only ComfyUI-Mesh frames are sent, nothing a non-Daedalus
peer answers is passed back (only "not a Daedalus server"), probes are rate-limited by the cache
and a small worker pool, and reconfiguring needs the token saved for that server. Whoever can
reach ComfyUI's HTTP port can already queue arbitrary workflows, so ComfyUI must not be exposed
to untrusted networks anyway; to pin the reachable servers set ``COMFYUI_MESH_ALLOWED_HOSTS``
(comma-separated host names/IPs) and every other address is refused.

Security (cross-origin): every route acts (even the status probe opens a connection), so every
route is a POST that takes only ``application/json`` and refuses a browser request from another
origin itself (``write_problem``: the ``Origin`` must be this ComfyUI's scheme://host:port;
without ``Origin``, ``Sec-Fetch-Site`` must be same-origin), whatever ComfyUI's own origin
middleware or ``--enable-cors-header`` let through. A page elsewhere (another port of the same
LAN name included) can then neither probe ports through ComfyUI nor save a token nor reconfigure.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import re
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import codec, handshake, ui_events
from .auth import key_id, new_nonce
from .constants import PRE_AUTH_MAX_BODY, STATUS_CLIENT_NAME, TOKEN_ENV
from .errors import AuthError, LocalError, MeshError
from .host import client_config, comfyui_version, token_store
from .netio import recv_message, send_message
from .protocol import Bye, Challenge, Error, ErrorCode, FrameDecoder, Hello, Welcome
from .securelink import LINK_AES_GCM, SecureLink
from .transport import MeshClient, drop_pooled

log = logging.getLogger("comfyui_mesh")

STATUS_TTL_S = 3.0  # a status answer is reused this long (the UI polls every 3 s per address)
PROBE_TIMEOUT_S = 2.0  # connect + Hello/Challenge; the UI must not hang on a dead host
MAX_CACHED = 64  # distinct addresses remembered (bounds memory whatever the requests name)
ALLOWED_HOSTS_ENV = "COMFYUI_MESH_ALLOWED_HOSTS"
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_EXECUTOR = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mesh-ui")


# ---------------------------------------------------------------------------- validation
def parse_address(host: Any, port: Any) -> tuple[str, int]:
    """A host name or IP and a port, or LocalError. No URLs, paths, user@ or whitespace."""
    h = str(host or "").strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        raise LocalError("remote_host is empty: enter the Daedalus machine's address, e.g. 192.168.0.18")
    try:
        ipaddress.ip_address(h)
    except ValueError:
        if not _HOSTNAME_RE.match(h) or ".." in h:
            raise LocalError(f"remote_host {h[:80]!r} is not a host name or IP address") from None
    try:
        p = int(str(port).strip())
    except ValueError:
        raise LocalError(f"remote_port {str(port)[:20]!r} is not a number") from None
    if not 1 <= p <= 65535:
        raise LocalError(f"remote_port {p} must be 1..65535")
    allowed = [a.strip().lower() for a in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if a.strip()]
    if allowed and h.lower() not in allowed:
        raise LocalError(f"{h} is not in {ALLOWED_HOSTS_ENV} ({', '.join(allowed)})")
    return h, p


# ---------------------------------------------------------------------------- probe
def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """Hello -> Challenge (-> Auth with the saved token) -> Bye against host:port; a JSON-able status
    (never raises)."""
    address = f"{host}:{port}"
    out: dict[str, Any] = {"address": address, "state": "red", "reachable": False, "error": None}
    try:
        store = token_store()
        out["token_saved"] = store.has(host, port)
        out["token_env"] = bool(os.environ.get(TOKEN_ENV, "").strip())
    except MeshError as e:
        out["token_saved"], out["token_env"] = False, False
        out["error"] = str(e)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        out["error"] = f"nothing listens on {address}: is Daedalus running?"
        return out
    except TimeoutError:
        out["error"] = f"no answer from {address} within {timeout:.0f} s: check the address and firewall"
        return out
    except OSError as e:
        out["error"] = f"cannot reach {address}: {e.strerror or e}"
        return out
    token_rejected = ""
    try:
        sock.settimeout(timeout)
        versions = handshake.local_versions(comfyui_version())
        token = (store.get(host, port) or "") if out["token_saved"] else ""
        hello = handshake.make_hello(
            handshake.Expect(),
            versions,
            nonce=new_nonce(),
            codecs=codec.available_ids(),
            client_name=STATUS_CLIENT_NAME,
            key_id=key_id(token),
        )
        send_message(sock, hello)
        dec = FrameDecoder(max_body=PRE_AUTH_MAX_BODY)
        ch, _ = recv_message(sock, dec)
        link = None
        if isinstance(ch, Challenge) and ch.auth != handshake.AUTH_NONE and token:
            token_rejected, link = _try_token(sock, dec, ch, hello, token, store.pinned_id(host, port), address)
        try:
            send_message(sock, Bye(reason="status probe"), link)
        except OSError:
            pass
    except (MeshError, OSError, ValueError) as e:
        out["error"] = f"{address} did not answer like a Daedalus server ({type(e).__name__})"
        return out
    finally:
        sock.close()
    if isinstance(ch, Error):
        out["reachable"] = True
        out["error"] = f"{address}: {ch.message}"
        return out
    if not isinstance(ch, Challenge):
        out["error"] = f"{address} answered hello with {type(ch).__name__}"
        return out
    out.update(
        reachable=True,
        arch=ch.arch,
        model=ch.model,
        n_blocks=ch.n_blocks,
        n_blocks_max=ch.n_blocks_max,
        device=ch.device,
        auth=ch.auth,
        auth_needed=ch.auth != handshake.AUTH_NONE,
        server_version=ch.package_version,
    )
    # Why a run against this server would fail at once (n_blocks aside: the Confirm flow handles it).
    found = handshake.problems(ch, handshake.Expect(), versions, handshake.allow_skew())
    found += handshake.auth_problems(ch, out["token_saved"] or out["token_env"])
    out["problems"] = [p.brief for p in found]
    out["token_rejected"] = bool(token_rejected)
    if token_rejected:  # reachable and usable once the right token is saved: amber, not red
        out["problems"].insert(0, token_rejected)
    out["error"] = out["problems"][0] if out["problems"] else None
    out["state"] = "amber" if token_rejected else "red" if out["error"] else "green"
    return out


def _try_token(
    sock: socket.socket, dec: FrameDecoder, ch: Challenge, hello: Hello, token: str, pinned: str, address: str
) -> tuple[str, SecureLink | None]:
    """Complete the handshake with the saved token: ("", the link to say BYE over) when the server
    accepts it, else (why not, None). The server proves it knows the token first (``check_server``)."""
    source = f"{TOKEN_ENV} (set in ComfyUI's environment)" if os.environ.get(TOKEN_ENV, "").strip() else "saved"
    rejected = (
        f"token rejected: the {source} token is not this server's; paste the token Daedalus prints "
        "with the node's Token… button"
    )
    try:
        handshake.check_server(ch, hello, token, f"Daedalus at {address}", pinned)
    except AuthError as e:
        return (rejected if not ch.mac else str(e)), None
    send_message(sock, handshake.auth_reply(ch, hello, token))
    reply, _ = recv_message(sock, dec)
    if isinstance(reply, Error) and ErrorCode.of(reply.code) is ErrorCode.AUTH_FAILED:
        return rejected, None
    if isinstance(reply, Welcome) and ch.link == LINK_AES_GCM:
        return "", SecureLink.for_client(token, handshake.transcript(hello, ch))
    return "", None


class Prober:
    """Cached, deduplicated probes: at most one in flight per address, answers reused for ``ttl``."""

    def __init__(self, ttl: float = STATUS_TTL_S, max_cached: int = MAX_CACHED, probe_fn=probe):
        self.ttl = ttl
        self.max_cached = max_cached
        self.probe_fn = probe_fn
        self._cache: dict[tuple[str, int], tuple[float, dict[str, Any]]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}

    def forget(self, host: str, port: int) -> None:
        self._cache.pop((host.lower(), port), None)

    async def status(self, host: str, port: int, refresh: bool = False) -> dict[str, Any]:
        key = (host.lower(), port)
        hit = self._cache.get(key)
        if hit and not refresh and time.monotonic() - hit[0] < self.ttl:
            return {**hit[1], "cached": True}
        fut = self._inflight.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().run_in_executor(_EXECUTOR, self.probe_fn, host, port)
            self._inflight[key] = fut
            fut.add_done_callback(functools.partial(self._done, key))
        result = await asyncio.shield(fut)  # a client that goes away must not cancel the others' probe
        return {**result, "cached": False}

    def _done(self, key: tuple[str, int], fut: asyncio.Future) -> None:
        self._inflight.pop(key, None)
        if fut.cancelled() or fut.exception() is not None:
            return
        self._cache[key] = (time.monotonic(), fut.result())
        while len(self._cache) > self.max_cached:  # drop the oldest
            oldest = min(self._cache, key=lambda k: self._cache[k][0])
            del self._cache[oldest]


# ---------------------------------------------------------------------------- actions
def _client(host: str, port: int) -> MeshClient:
    return MeshClient(client_config(host, port, client_name="icarus-ui"), comfyui_version=comfyui_version())


def reconfigure(host: str, port: int, n_blocks: int) -> dict[str, Any]:
    """Ask Daedalus at host:port to hold ``n_blocks``; the node's pooled connection is dropped."""
    c = _client(host, port)
    try:
        r = c.reconfigure(n_blocks)
    finally:
        c.close("reconfigured from the node UI")
    drop_pooled(host, port)  # the next run re-handshakes and sees the new n_blocks
    log.info("ComfyUI-Mesh: %s:%d now holds %d blocks (from the node's Confirm button)", host, port, r.n_blocks)
    return {"ok": True, "n_blocks": r.n_blocks, "no_op": r.no_op}


def save_token(host: str, port: int, token: str) -> dict[str, Any]:
    """Save (or delete, when empty) the token for host:port, then try it if the server is up."""
    token = token.strip()
    if len(token) > 512 or any(c.isspace() for c in token):
        raise LocalError("that does not look like a Daedalus token (one line of letters and digits)")
    token_store().set(host, port, token)
    drop_pooled(host, port)
    out: dict[str, Any] = {"ok": True, "saved": bool(token), "verified": None, "message": "token removed"}
    if os.environ.get(TOKEN_ENV, "").strip():
        out["message"] = f"saved, but {TOKEN_ENV} is set in ComfyUI's environment and overrides it"
        return out
    if not token:
        return out
    c = _client(host, port)
    try:
        c.connect()
        out.update(verified=True, message=f"saved; {host}:{port} accepted it")
    except MeshError as e:
        out.update(verified=False, message=f"saved, but the check failed: {e}")
    finally:
        c.close("token check")
    return out


# ---------------------------------------------------------------------------- request guard
CROSS_ORIGIN = "cross-origin request refused"


class Refused(LocalError):
    """A request our routes refuse, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def write_problem(content_type: str, headers: Any, host: str) -> Refused | None:
    """Why a request to one of our routes (all of them act: probe a host, save a token,
    reconfigure a server) must be refused, or None. Our own checks, whatever ComfyUI's origin
    middleware or ``--enable-cors-header`` let through: the body must be JSON (a cross-origin page
    can send ``text/plain`` without a preflight, not ``application/json``), and a browser's
    ``Origin`` must name this ComfyUI's own host and port (a page on another port of the same
    LAN name is another origin); without ``Origin``, ``Sec-Fetch-Site`` must not say the
    request came from another site."""
    if content_type != "application/json":
        return Refused(
            400, f"the request body must be JSON (Content-Type: application/json), not {content_type or 'none'}"
        )
    origin = headers.get("Origin")
    if origin is not None:
        # host:port only, as ComfyUI's own check: behind a TLS proxy the scheme differs (https
        # page, http request), and a proxy that rewrites Host must pass it through anyway
        netloc = urllib.parse.urlsplit(origin).netloc.lower()
        if not netloc or netloc != host.lower():
            return Refused(403, f"{CROSS_ORIGIN}: Origin {origin} is not this ComfyUI ({host})")
    elif headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return Refused(403, f"{CROSS_ORIGIN}: Sec-Fetch-Site {headers.get('Sec-Fetch-Site')}")
    return None


# ---------------------------------------------------------------------------- registration
_REGISTERED = False
PROBER = Prober()


def register(prompt_server: Any) -> bool:
    """Add the routes to ComfyUI's table (at import time: ComfyUI adds the table to its app later)."""
    global _REGISTERED
    if _REGISTERED:
        return False
    from aiohttp import web

    routes = prompt_server.routes

    def fail(status: int, message: str) -> web.Response:
        return web.json_response({"ok": False, "error": message}, status=status)

    async def body(request: web.Request) -> dict[str, Any]:
        refused = write_problem(request.content_type, request.headers, request.host)
        if refused:
            raise refused
        try:
            data = await request.json()
        except ValueError:
            raise LocalError("the request body must be JSON") from None
        if not isinstance(data, dict):
            raise LocalError("the request body must be a JSON object")
        return data

    @routes.post("/mesh/status")
    async def status(request: web.Request) -> web.Response:
        try:
            data = await body(request)
            host, port = parse_address(data.get("host"), data.get("port"))
        except LocalError as e:
            return fail(getattr(e, "status", 400), str(e))
        out = dict(await PROBER.status(host, port, data.get("refresh") is True))  # a copy: the cache keeps its own
        out["splits"] = ui_events.splits_for(f"{host}:{port}")  # not cached: a node's run updates it at once
        return web.json_response(out)

    @routes.post("/mesh/reconfigure")
    async def reconfigure_route(request: web.Request) -> web.Response:
        try:
            data = await body(request)
            host, port = parse_address(data.get("host"), data.get("port"))
            n = data.get("n_blocks")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise LocalError("n_blocks must be a whole number >= 1")
        except LocalError as e:
            return fail(getattr(e, "status", 400), str(e))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(_EXECUTOR, reconfigure, host, port, n)
        except MeshError as e:
            return fail(502, str(e))
        PROBER.forget(host, port)
        result["status"] = await PROBER.status(host, port, refresh=True)
        return web.json_response(result)

    @routes.post("/mesh/token")
    async def token_route(request: web.Request) -> web.Response:
        try:
            data = await body(request)
            host, port = parse_address(data.get("host"), data.get("port"))
            token = data.get("token", "")
            if not isinstance(token, str):
                raise LocalError("token must be a string")
        except LocalError as e:
            return fail(getattr(e, "status", 400), str(e))
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(_EXECUTOR, save_token, host, port, token)
        except MeshError as e:
            return fail(400, str(e))
        PROBER.forget(host, port)
        return web.json_response(result)

    _REGISTERED = True
    log.info("ComfyUI-Mesh: node UI routes registered (/mesh/status, /mesh/reconfigure, /mesh/token)")
    return True


__all__ = ["PROBER", "Prober", "parse_address", "probe", "register", "write_problem"]
