"""Error kinds.

Two families, so a message can say whose fault it is:

* ``LocalError``: we (or the user's settings) misused something: a bad argument, an
  unsupported model, a tensor we cannot encode, a wrong token typed into the node.
* ``RemoteProtocolError``: the peer sent bytes that break the protocol: bad magic, a
  length over the limits, a checksum that does not match, a payload a codec cannot
  decode. We stop reading that connection; the process stays up.

``RemoteFailure`` is neither: the peer understood us and reported an error of its own
(an error frame). ``ConnectFailed`` covers the socket never coming up.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error raised by ComfyUI-Mesh."""


class LocalError(MeshError):
    """Our misuse: wrong argument, unsupported model or dtype, bad configuration."""


class RemoteProtocolError(MeshError):
    """The peer sent bytes that violate the protocol."""


class CodecError(RemoteProtocolError):
    """A payload that does not decode (truncated, corrupted, inconsistent header)."""


class StreamStateError(CodecError):
    """A temporal (P-frame) payload whose reference state this side does not hold.

    Not corruption: the peers' codec state diverged (reconnect, eviction, restart). The
    server answers ``stream_reset``; the client drops its state and resends keyframes."""


class BackendUnavailable(CodecError):
    """A payload coded with an entropy backend this side cannot run (e.g. nvCOMP ANS on a CPU).

    The server answers ``codec_unavailable`` with ``detail.backend``; the client re-encodes
    with the CPU backend (zstd) for the rest of the connection."""

    def __init__(self, message: str, backend: str = ""):
        super().__init__(message)
        self.backend = backend


class OverBudget(MeshError):
    """Neither side's fault: a server-wide memory budget (server/budget.py) has no room for what a
    peer asked. The server answers ``busy``; ``transient`` is False when the request could never fit
    (it is bigger than the whole budget), True when other clients hold the memory now."""

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class VersionMismatch(LocalError):
    """Both sides work, but they disagree on a version, model or configuration."""


class AuthError(MeshError):
    """The token check failed (wrong or missing token)."""


class ConnectFailed(MeshError):
    """The TCP connection could not be opened or broke mid-request."""


class RemoteFailure(MeshError):
    """The peer answered with an error frame."""

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = dict(detail or {})  # the error frame's ``detail`` (e.g. ``transient`` for busy)
