"""Daedalus's back half for the stand-in DiTs (tests/fake_dit.py), served on loopback.

``StandinBackend`` does what ``server/loader.ComfyBackend`` does, without ComfyUI: it builds the
slim model from the same seeded weights (block counts cut to the back half through the adapter's
``config_keys``, tensors renamed by ``Adapter.remote_key``, ``server_drops`` replaced by empty
modules), fingerprints it under the full-model names, applies a forwarded LoRA set to this request
only, and runs ``adapter.server_forward``. ``serve`` starts a real ``DaedalusServer`` on 127.0.0.1.

Run as a script (``python tests/seam_server.py --family flux2 --n-blocks 2``) it is a Daedalus
process of its own that prints ``READY <port>`` and serves until killed; ``--die-in-call K`` makes it
kill itself (SIGKILL) inside its K-th forward, a server crash in the middle of a request;
``--standby`` imports everything, prints ``STANDBY`` and starts only when a line ``serve <port>``
arrives on stdin (a restart that does not wait for torch to import on a loaded machine).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import fake_comfy
import fake_dit
import torch
from comfyui_mesh import arch, lora_io
from comfyui_mesh.config import ServerConfig
from comfyui_mesh.errors import RemoteProtocolError
from comfyui_mesh.fingerprint import fingerprint
from comfyui_mesh.server.core import DaedalusServer, ServerState
from comfyui_mesh.transport import drop_pooled

TOKEN = "0123456789abcdef0123456789abcdef"


class Empty(torch.nn.Module):
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a module the back half never runs was called on the server")


def comfy_version() -> str:
    """The version the client side sees (the fake's, or the real ComfyUI's), so the handshake agrees."""
    try:
        import comfyui_version  # type: ignore[import-not-found]

        return str(comfyui_version.__version__)
    except ImportError:
        return ""


class StandinBackend:
    def __init__(
        self, family: str, n_blocks: int, seed: int = 0, device: str = "cpu", version: str | None = None, **config: Any
    ):
        self.comfyui_version = comfy_version() if version is None else version
        self.adapter = arch.get(family)
        self.arch = family
        full = fake_dit.build(family, seed, **config)
        counts = self.adapter.count_blocks(full.state_dict())
        self.n_blocks_max = sum(counts.values())
        n = n_blocks if 0 < n_blocks <= self.n_blocks_max else self.n_blocks_max
        self.plan = self.adapter.plan(counts, n)
        self.n_blocks = n
        self.device = torch.device(device)
        self.model_name = f"stand-in {family} seed {seed}"
        slim_config = {**config, **{key: self.plan.remote[g] for g, key in self.adapter.config_keys.items()}}
        dm = fake_dit.STANDINS[family].build(**slim_config)
        for name in self.adapter.server_drops:
            if isinstance(getattr(dm, name, None), torch.nn.Module):
                setattr(dm, name, Empty())
        sd = {}
        for k, v in full.state_dict().items():
            new = self.adapter.remote_key(k, self.plan)
            if new is not None:
                sd[new] = v
        missing, unexpected = dm.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise AssertionError(f"slim load: missing {missing}, unexpected {unexpected}")
        self.dm = dm.to(self.device).eval()
        self.fingerprint = fingerprint(
            (self.adapter.original_key(k, self.plan), v)
            for k, v in self.dm.state_dict().items()
            if self.adapter.remote_key(self.adapter.original_key(k, self.plan), self.plan) is not None
        )
        self.lora_sets: list[dict[str, list[tuple[Any, ...]]]] = []  # every LoRA set received, for tests

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        blob = tensors.pop("lora", None)
        if not scalars.get("lora"):
            return self.adapter.server_forward(self.dm, self.plan, tensors, scalars)
        if blob is None:
            raise RemoteProtocolError("request names a LoRA set but carries none")
        patches, digest = lora_io.unpack(blob.cpu().numpy().tobytes(), fake_comfy.ADAPTERS, self.device)
        if digest != scalars["lora"]:
            raise RemoteProtocolError("forwarded LoRA set does not match its hash")
        self.lora_sets.append(patches)
        saved = []
        try:  # this request only: merged weights in, originals back afterwards
            for full_key, entries in patches.items():
                bare = full_key.removeprefix("diffusion_model.")
                slim = self.adapter.remote_key(bare, self.plan)
                if slim is None:
                    raise RemoteProtocolError(f"forwarded LoRA patches {full_key}, which this server does not hold")
                old = fake_comfy.get_attr(self.dm, slim)
                new = torch.nn.Parameter(fake_comfy.merge_patches(entries, old.data), requires_grad=False)
                saved.append((slim, fake_comfy.set_attr(self.dm, slim, new)))
            return self.adapter.server_forward(self.dm, self.plan, tensors, scalars)
        finally:
            for slim, old in reversed(saved):
                fake_comfy.set_attr(self.dm, slim, old)

    def close(self) -> None:
        pass


class DyingBackend(StandinBackend):
    """A ``StandinBackend`` whose process dies (SIGKILL, no cleanup) inside its ``die_in``-th forward."""

    def __init__(self, *args: Any, die_in: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.die_in = die_in
        self.forwards = 0

    def forward(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.forwards += 1
        if self.forwards == self.die_in:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(tensors, scalars)


@contextlib.contextmanager
def serve(
    family: str, n_blocks: int, seed: int = 0, token: str | None = TOKEN, version: str | None = None, **config: Any
) -> Iterator[Any]:
    """A loopback Daedalus serving the last ``n_blocks`` of the stand-in; yields the server
    (``.address``, ``.state.backend``). ``version``: the ComfyUI version it reports (default: ours)."""
    cfg = ServerConfig(port=0, device="cpu", n_blocks=n_blocks, auth=token is not None)
    backend = lambda n: StandinBackend(family, n, seed, version=version, **config)  # noqa: E731
    srv = DaedalusServer(ServerState(cfg, backend, token=token))
    host, port = srv.start()
    try:
        yield srv
    finally:
        drop_pooled(host, port)
        srv.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="a loopback Daedalus process serving a stand-in DiT's back half")
    ap.add_argument("--family", default="flux2")
    ap.add_argument("--n-blocks", type=int, default=2)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--die-in-call", type=int, default=0, help="SIGKILL itself inside this forward (0: never)")
    ap.add_argument("--standby", action="store_true", help="wait for 'serve <port>' on stdin, then start")
    args = ap.parse_args(argv)
    if args.standby:
        print("STANDBY", flush=True)
        args.port = int(sys.stdin.readline().split()[1])
    cfg = ServerConfig(port=args.port, device="cpu", n_blocks=args.n_blocks)
    backend = lambda n: DyingBackend(args.family, n, die_in=args.die_in_call)  # noqa: E731
    srv = DaedalusServer(ServerState(cfg, backend, token=TOKEN))
    _, port = srv.start()
    print(f"READY {port}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
