"""Daedalus window: ``python -m comfyui_mesh.server.gui`` (``--toy`` for a model-free server).

A thin Tkinter shell over the same library the CLI uses: ``ServerState`` + ``DaedalusServer``
run in this process, on worker threads. In-process rather than a CLI child because the
server's own events (clients, steps, a client's reconfigure, auth failures) arrive as data
through ``on_event`` instead of parsed log lines, and a reconfigure from a client is applied by
``ServerState.reconfigure`` in place, with no restart. The price: ComfyUI fixes its device per
process, so after a real model was loaded, changing the device or ComfyUI folder needs a new
window (the window says so).

Threading rule: only the Tk thread touches widgets. Worker threads, the server's callbacks and
the log handler put tuples on ``self.events``; ``_drain`` empties it every ``POLL_MS`` via
``after()``. The non-Tk half (settings, checkpoint inspection, the server runner) is gui_runner.py.
"""

from __future__ import annotations

import argparse
import logging
import queue
import sys
import threading
from pathlib import Path
from typing import Any

from .. import auth
from ..config import ServerConfig, default_state_dir
from ..constants import DEFAULT_BIND, DEFAULT_PORT, PACKAGE_VERSION
from ..errors import LocalError, MeshError
from .check import device_label
from .gui_runner import (
    SETTINGS_FILE,
    GuiSettings,
    ModelInfo,
    QueueLogHandler,
    ServerRunner,
    human_bytes,
    inspect_checkpoint,
    list_devices,
    listening_text,
)
from .tokens import NamedTokens, describe

NO_TK = (
    "the Daedalus window needs Tk, which this Python lacks: install it (Debian/Ubuntu: sudo apt-get "
    "install python3-tk; Fedora: sudo dnf install python3-tkinter) or run the server without a window: "
    "python -m comfyui_mesh.server --weights FILE --n-blocks N"
)
try:
    import tkinter as tk
    from tkinter import filedialog, messagebox, scrolledtext, simpledialog, ttk
except ImportError:
    if __name__ == "__main__":
        sys.exit(f"ComfyUI-Mesh: {NO_TK}")
    raise ImportError(NO_TK) from None

log = logging.getLogger("daedalus")

POLL_MS = 100  # queue drain period
MAX_LOG_LINES = 2000
DTYPES = ("auto", "bfloat16", "float16", "float32")
BINDS = ("127.0.0.1", "0.0.0.0")
# settings shown by a widget variable of the same name (the LoRA rows are handled on their own)
SETTING_VARS = (
    "weights", "n_blocks", "port", "bind", "device", "dtype", "comfyui_path", "auth", "encrypt", "gpu_entropy"
)  # fmt: skip
COLORS = {"stopped": "#8a8f98", "starting": "#e0a030", "running": "#2fa84f", "stopping": "#e0a030", "error": "#d64545"}


# ---------------------------------------------------------------------------- the window
class App:
    def __init__(self, root: tk.Tk, state_dir: Path, toy: bool = False):
        self.root = root
        self.state_dir = state_dir
        self.settings_path = state_dir / SETTINGS_FILE
        self.toy = toy
        self.events: queue.Queue = queue.Queue()
        self.runner = ServerRunner(self.events, toy)
        self.settings = GuiSettings.load(self.settings_path)
        if toy and not self.settings_path.exists():
            self.settings.device = "cpu"
        self.running_settings: GuiSettings | None = None
        self.model_info: ModelInfo | None = None
        self.peers: dict[str, str] = {}  # peer -> the name of the token it proved
        self.steps = 0
        self.bytes_in = self.bytes_out = 0
        self.auth_failures = 0
        self.last_step: dict[str, Any] | None = None
        self.ready: dict[str, Any] = {}
        self.handler = QueueLogHandler(self.events)
        logging.getLogger().addHandler(self.handler)
        logging.getLogger("daedalus").setLevel(logging.INFO)
        self.token = ""
        self.v: dict[str, tk.Variable] = {}
        self.lora_rows: list[tuple[ttk.Frame, tk.StringVar, tk.DoubleVar]] = []
        self._build()
        self._load_token()
        self._apply_settings(self.settings)
        self.root.protocol("WM_DELETE_WINDOW", self.close)
        self.refresh_devices()
        self.root.after(POLL_MS, self._drain)

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        r = self.root
        r.title(f"ComfyUI Mesh : Daedalus {PACKAGE_VERSION}" + ("  (toy model)" if self.toy else ""))
        r.geometry("860x760")
        r.minsize(720, 600)
        style = ttk.Style(r)
        if "clam" in style.theme_names():
            style.theme_use("clam")
        style.configure("Head.TLabel", font=("TkDefaultFont", 10, "bold"))
        style.configure("Accent.TButton", font=("TkDefaultFont", 10, "bold"))
        outer = ttk.Frame(r, padding=10)
        outer.pack(fill="both", expand=True)
        outer.columnconfigure(1, weight=1)
        v = self.v
        str_vars = ("weights", "bind", "device", "dtype", "comfyui_path")
        v.update({name: tk.StringVar() for name in str_vars})
        v.update(n_blocks=tk.IntVar(value=4), port=tk.IntVar(value=DEFAULT_PORT))
        v.update(auth=tk.BooleanVar(value=True), show_token=tk.BooleanVar(value=False))
        v.update(gpu_entropy=tk.BooleanVar(value=True), encrypt=tk.BooleanVar(value=True))
        row = 0

        def label(text: str) -> None:
            ttk.Label(outer, text=text).grid(row=row, column=0, sticky="w", pady=3, padx=(0, 8))

        label("Model file")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, columnspan=2, sticky="ew")
        f.columnconfigure(0, weight=1)
        self.weights_entry = ttk.Entry(f, textvariable=v["weights"])
        self.weights_entry.grid(row=0, column=0, sticky="ew")
        self.weights_entry.bind("<FocusOut>", lambda _e: self.inspect_model())
        self.weights_entry.bind("<Return>", lambda _e: self.inspect_model())
        ttk.Button(f, text="Browse…", command=self.browse_model).grid(row=0, column=1, padx=(6, 0))
        row += 1
        self.model_label = ttk.Label(outer, text="toy model: no file needed" if self.toy else "", foreground="#555")
        self.model_label.grid(row=row, column=1, columnspan=2, sticky="w")
        row += 1
        label("n_blocks")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, sticky="w")
        self.n_spin = ttk.Spinbox(f, from_=1, to=256, width=6, textvariable=v["n_blocks"])
        self.n_spin.grid(row=0, column=0)
        self.n_range = ttk.Label(f, text="  the last N blocks run here; Icarus's n_blocks_remote must match")
        self.n_range.grid(row=0, column=1)
        row += 1
        label("Port / bind")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, sticky="w")
        ttk.Spinbox(f, from_=0, to=65535, width=7, textvariable=v["port"]).grid(row=0, column=0)
        ttk.Combobox(f, values=BINDS, width=12, textvariable=v["bind"]).grid(row=0, column=1, padx=6)
        ttk.Label(f, text="127.0.0.1 = this PC only; 0.0.0.0 = LAN (open the firewall port)").grid(row=0, column=2)
        row += 1
        label("Device / dtype")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, columnspan=2, sticky="ew")
        f.columnconfigure(0, weight=1)
        self.device_box = ttk.Combobox(f, textvariable=v["device"], values=["cpu"])
        self.device_box.grid(row=0, column=0, sticky="ew")
        ttk.Button(f, text="↻", width=3, command=self.refresh_devices).grid(row=0, column=1, padx=4)
        ttk.Combobox(f, values=DTYPES, width=9, state="readonly", textvariable=v["dtype"]).grid(row=0, column=2)
        row += 1
        label("ComfyUI folder")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, columnspan=2, sticky="ew")
        f.columnconfigure(0, weight=1)
        ttk.Entry(f, textvariable=v["comfyui_path"]).grid(row=0, column=0, sticky="ew")
        ttk.Button(f, text="Browse…", command=self.browse_comfyui).grid(row=0, column=1, padx=(6, 0))
        row += 1
        label("Server LoRAs")
        self.lora_frame = ttk.Frame(outer)
        self.lora_frame.grid(row=row, column=1, columnspan=2, sticky="ew")
        self.lora_frame.columnconfigure(0, weight=1)
        self.add_lora_button = ttk.Button(self.lora_frame, text="+ Add LoRA", command=lambda: self.add_lora("", 1.0))
        self.add_lora_button.grid(row=99, column=0, sticky="w")
        row += 1
        label("Token")
        f = ttk.Frame(outer)
        f.grid(row=row, column=1, columnspan=2, sticky="ew")
        f.columnconfigure(0, weight=1)
        self.token_entry = ttk.Entry(f, state="readonly", show="•")
        self.token_entry.grid(row=0, column=0, sticky="ew")
        ttk.Checkbutton(f, text="show", variable=v["show_token"], command=self._show_token).grid(row=0, column=1)
        ttk.Button(f, text="Copy", command=self.copy_token).grid(row=0, column=2, padx=4)
        ttk.Button(f, text="Regenerate…", command=self.regenerate_token).grid(row=0, column=3)
        ttk.Button(f, text="Named…", command=self.open_tokens).grid(row=0, column=7, padx=(8, 0))
        ttk.Checkbutton(f, text="require token", variable=v["auth"]).grid(row=0, column=4, padx=(8, 0))
        # off = --no-encrypt: for a trusted same-host pair (clients accept it on loopback only)
        ttk.Checkbutton(f, text="encrypt", variable=v["encrypt"]).grid(row=0, column=5, padx=(8, 0))
        # nvCOMP does not validate its bitstreams: untrusted clients should send zstd (--no-gpu-entropy)
        ttk.Checkbutton(f, text="GPU-coded payloads", variable=v["gpu_entropy"]).grid(row=0, column=6, padx=(8, 0))
        row += 1
        f = ttk.Frame(outer)
        f.grid(row=row, column=0, columnspan=3, sticky="ew", pady=(10, 4))
        self.start_button = ttk.Button(f, text="▶ Start", style="Accent.TButton", command=self.start)
        self.stop_button = ttk.Button(f, text="■ Stop", command=self.stop)
        self.restart_button = ttk.Button(f, text="⟳ Restart", command=self.restart)
        for i, b in enumerate((self.start_button, self.stop_button, self.restart_button)):
            b.grid(row=0, column=i, padx=(0, 6))
        self.light = tk.Canvas(f, width=16, height=16, highlightthickness=0)
        self.light.grid(row=0, column=3, padx=(12, 4))
        self.dot = self.light.create_oval(2, 2, 14, 14, fill=COLORS["stopped"], outline="")
        self.status_label = ttk.Label(f, text="stopped", style="Head.TLabel", wraplength=440)
        self.status_label.grid(row=0, column=4, sticky="w")
        row += 1
        self.stats_label = ttk.Label(outer, text=self._stats_text(), foreground="#333")
        self.stats_label.grid(row=row, column=0, columnspan=3, sticky="w", pady=(0, 4))
        row += 1
        self.log_text = scrolledtext.ScrolledText(
            outer,
            height=14,
            state="disabled",
            wrap="word",
            font=("TkFixedFont", 9),
            background="#1e1f22",
            foreground="#d8d8d8",
        )
        self.log_text.grid(row=row, column=0, columnspan=3, sticky="nsew")
        self.log_text.tag_configure("warn", foreground="#f0c060")
        self.log_text.tag_configure("error", foreground="#ff7070")
        outer.rowconfigure(row, weight=1)
        for name in SETTING_VARS:
            v[name].trace_add("write", lambda *_a: self._settings_changed())
        v["n_blocks"].trace_add("write", lambda *_a: self.check_n_blocks())
        self._set_buttons()

    # ------------------------------------------------------------------ settings <-> widgets
    def _apply_settings(self, s: GuiSettings) -> None:
        for name in SETTING_VARS:
            self.v[name].set(getattr(s, name))
        for path, strength in s.loras:
            self.add_lora(path, strength)
        if s.weights and not self.toy:
            self.inspect_model()

    def collect(self) -> GuiSettings:
        """The settings as the widgets show them (LocalError on a value that is not a number)."""
        try:
            n, port = int(self.v["n_blocks"].get()), int(self.v["port"].get())
            loras = [[p.get().strip(), float(w.get())] for _f, p, w in self.lora_rows if p.get().strip()]
        except (tk.TclError, ValueError):
            raise LocalError("n_blocks, port and LoRA strengths must be numbers") from None
        return GuiSettings(
            weights=self.v["weights"].get().strip(),
            n_blocks=n,
            port=port,
            bind=self.v["bind"].get().strip() or DEFAULT_BIND,
            device=self.v["device"].get().split()[0] if self.v["device"].get().strip() else "cpu",
            dtype=self.v["dtype"].get() or "auto",
            comfyui_path=self.v["comfyui_path"].get().strip(),
            auth=bool(self.v["auth"].get()),
            gpu_entropy=bool(self.v["gpu_entropy"].get()),
            encrypt=bool(self.v["encrypt"].get()),
            loras=loras,
        )

    def _settings_changed(self) -> None:
        if self.runner.phase != "running" or self.running_settings is None:
            return
        try:
            changed = self.collect() != self.running_settings
        except LocalError:
            changed = True
        if changed:
            self._set_status("running", "settings changed: press Restart to apply them")

    def save_settings(self) -> None:
        try:
            self.collect().save(self.settings_path)
        except (LocalError, OSError) as e:
            log.warning("settings not saved: %s", e)

    def add_lora(self, path: str, strength: float) -> None:
        f = ttk.Frame(self.lora_frame)
        f.columnconfigure(0, weight=1)
        pv, wv = tk.StringVar(value=path), tk.DoubleVar(value=strength)
        ttk.Entry(f, textvariable=pv).grid(row=0, column=0, sticky="ew")
        ttk.Button(f, text="…", width=3, command=lambda: self._browse_into(pv, "LoRA")).grid(row=0, column=1, padx=4)
        ttk.Label(f, text="strength").grid(row=0, column=2)
        ttk.Spinbox(f, from_=-4.0, to=4.0, increment=0.05, width=6, textvariable=wv).grid(row=0, column=3, padx=4)
        entry = (f, pv, wv)
        ttk.Button(f, text="✕", width=3, command=lambda: self.remove_lora(entry)).grid(row=0, column=4)
        self.lora_rows.append(entry)
        self._grid_loras()
        for var in (pv, wv):
            var.trace_add("write", lambda *_a: self._settings_changed())

    def remove_lora(self, entry: tuple) -> None:
        self.lora_rows.remove(entry)
        entry[0].destroy()
        self._grid_loras()
        self._settings_changed()

    def _grid_loras(self) -> None:
        for i, (f, _p, _w) in enumerate(self.lora_rows):
            f.grid(row=i, column=0, sticky="ew", pady=1)

    # ------------------------------------------------------------------ model file, devices
    def _browse_into(self, var: tk.StringVar, what: str) -> None:
        p = filedialog.askopenfilename(title=f"Choose a {what} file", filetypes=[("safetensors", "*.safetensors")])
        if p:
            var.set(p)

    def browse_model(self) -> None:
        self._browse_into(self.v["weights"], "model")  # type: ignore[arg-type]
        self.inspect_model()

    def browse_comfyui(self) -> None:
        p = filedialog.askdirectory(title="Choose the ComfyUI folder (the one with main.py)")
        if p:
            self.v["comfyui_path"].set(p)

    def inspect_model(self) -> None:
        path = self.v["weights"].get().strip()
        if not path:
            self.model_label.configure(text="")
            return

        def work() -> None:
            try:
                self.events.put(("model", path, inspect_checkpoint(path)))
            except MeshError as e:
                self.events.put(("model", path, e))

        threading.Thread(target=work, name="inspect-model", daemon=True).start()

    def refresh_devices(self) -> None:
        threading.Thread(target=lambda: self.events.put(("devices", list_devices())), daemon=True).start()

    # ------------------------------------------------------------------ token
    def _load_token(self) -> None:
        try:
            self.token, created = auth.load_or_create_server_token(self.state_dir / "token")
            if created:
                log.info("first start: made a new token in %s", self.state_dir / "token")
        except (LocalError, OSError) as e:
            log.error("token: %s", e)
        self._show_token()

    def _show_token(self) -> None:
        self.token_entry.configure(state="normal", show="" if self.v["show_token"].get() else "•")
        self.token_entry.delete(0, "end")
        self.token_entry.insert(0, self.token)
        self.token_entry.configure(state="readonly")

    def copy_token(self) -> None:
        self.root.clipboard_clear()
        self.root.clipboard_append(self.token)
        log.info("token copied: paste it into the Icarus node (Token… button)")

    def regenerate_token(self, ask: bool = True) -> None:
        if ask and not messagebox.askyesno("New token", "Make a new token? Every Icarus node must get the new one."):
            return
        self.token = auth.regenerate_server_token(self.state_dir / "token")
        self.runner.set_token(self.token)
        self._show_token()
        log.info("new token made; clients connecting from now on need it")

    # ------------------------------------------------------------------ named tokens
    def add_named_token(self, name: str, max_sessions: int = 0, may_reconfigure: bool = False) -> auth.TokenEntry:
        """A token for one person or machine (``server.tokens``); a running server accepts it at once."""
        e = NamedTokens(self.state_dir).add(name, max_sessions, may_reconfigure)
        self.runner.reload_tokens()
        log.info("token for %s made (%s)", e.name, describe(e))
        return e

    def revoke_named_token(self, name: str) -> None:
        """Delete ``name``'s token; a running server closes its sessions at once."""
        NamedTokens(self.state_dir).revoke(name)
        self.runner.reload_tokens()
        log.info("token %s revoked", name)

    def open_tokens(self) -> None:
        """A small window: the named tokens, Add…, Copy, Revoke…."""
        top = tk.Toplevel(self.root)
        top.title("Named tokens")
        tree = ttk.Treeview(top, columns=("sessions", "reconfigure", "key"), height=8)
        for col, text, width in (("#0", "name", 140), ("sessions", "max sessions", 90),
                                 ("reconfigure", "may reconfigure", 110), ("key", "key id", 150)):  # fmt: skip
            tree.heading(col, text=text)
            tree.column(col, width=width)
        tree.grid(row=0, column=0, columnspan=4, sticky="nsew", padx=8, pady=8)
        entries: dict[str, auth.TokenEntry] = {}

        def refresh() -> None:
            tree.delete(*tree.get_children())
            entries.clear()
            try:
                named = NamedTokens(self.state_dir).read()
            except LocalError as err:
                messagebox.showerror("Named tokens", str(err), parent=top)
                return
            for e in named:
                entries[e.name] = e
                tree.insert("", "end", iid=e.name, text=e.name,
                            values=(e.max_sessions or "—", "yes" if e.may_reconfigure else "no", auth.key_id(e.token)))  # fmt: skip

        def add() -> None:
            name = simpledialog.askstring("New token", "Name (a person or machine):", parent=top)
            if not name:
                return
            n = simpledialog.askinteger("New token", "Sessions at once (0: no own limit):", parent=top, minvalue=0)
            may = messagebox.askyesno("New token", f"May {name} reconfigure the server (n_blocks)?", parent=top)
            try:
                e = self.add_named_token(name.strip(), n or 0, may)
            except LocalError as err:
                messagebox.showerror("New token", str(err), parent=top)
                return
            refresh()
            self.root.clipboard_clear()
            self.root.clipboard_append(e.token)
            messagebox.showinfo("New token", f"Token for {e.name} (copied to the clipboard):\n\n{e.token}", parent=top)

        def selected() -> str:
            sel = tree.selection()
            return sel[0] if sel else ""

        def copy() -> None:
            if selected():
                self.root.clipboard_clear()
                self.root.clipboard_append(entries[selected()].token)

        def revoke() -> None:
            name = selected()
            if name and messagebox.askyesno("Revoke", f"Revoke {name}'s token? Its open sessions close.", parent=top):
                try:
                    self.revoke_named_token(name)
                except LocalError as err:
                    messagebox.showerror("Revoke", str(err), parent=top)
                refresh()

        for i, (text, cmd) in enumerate(
            (("Add…", add), ("Copy token", copy), ("Revoke…", revoke), ("Close", top.destroy))
        ):
            ttk.Button(top, text=text, command=cmd).grid(row=1, column=i, padx=4, pady=(0, 8))
        refresh()

    # ------------------------------------------------------------------ start / stop
    def _config(self) -> tuple[GuiSettings, ServerConfig] | None:
        try:
            s = self.collect()
            problem = None if self.toy or self.model_info is None else self.model_info.n_blocks_problem(s.n_blocks)
            if problem:
                raise LocalError(problem)
            return s, s.server_config(self.state_dir)
        except LocalError as e:
            self._set_status("error", str(e))
            return None

    def start(self, restart: bool = False) -> None:
        got = self._config()
        if got is None:
            return
        s, cfg = got
        s.save(self.settings_path)
        self.running_settings = s
        launch = self.runner.restart if restart else self.runner.start
        launch(cfg, self.token if cfg.auth else None)

    def stop(self) -> None:
        self.runner.stop()

    def restart(self) -> None:
        self.start(restart=True)

    def close(self) -> None:
        self.save_settings()
        logging.getLogger().removeHandler(self.handler)
        server = self.runner.server
        if server is not None:
            server.shutdown()
        self.root.destroy()

    # ------------------------------------------------------------------ events (Tk thread only)
    def _drain(self) -> None:
        try:
            for _ in range(500):
                self._handle(self.events.get_nowait())
        except queue.Empty:
            pass
        if self.root.winfo_exists():
            self.root.after(POLL_MS, self._drain)

    def _handle(self, ev: tuple) -> None:
        kind = ev[0]
        if kind == "log":
            self._append_log(ev[1], ev[2])
        elif kind == "status":
            self._set_status(ev[1], ev[2])
        elif kind == "ready":
            self.peers.clear()
            self.ready = ev[1]
            self._update_stats()
        elif kind == "server":
            self._server_event(ev[1])
        elif kind == "model":
            self._model_result(ev[1], ev[2])
        elif kind == "devices":
            self._devices(ev[1])

    def _server_event(self, e: dict[str, Any]) -> None:
        k = e.get("kind")
        if k == "client":
            if e.get("connected"):
                self.peers[str(e.get("peer"))] = str(e.get("token") or "")
            else:
                self.peers.pop(str(e.get("peer")), None)
        elif k == "step":
            self.steps += 1
            self.bytes_in += int(e.get("bytes_in", 0))
            self.bytes_out += int(e.get("bytes_out", 0))
            self.last_step = e
        elif k == "auth_failed":
            self.auth_failures += 1
        elif k == "reconfigured":  # a client pressed Confirm: the server reloaded in place
            n = int(e["n_blocks"])
            if self.running_settings is not None:
                self.running_settings.n_blocks = n
            self.v["n_blocks"].set(n)
            self.save_settings()
            self.ready["n_blocks"] = n
            self._set_status("running", self._listening() + "  (reconfigured by a client)")
        self._update_stats()

    def _stats_text(self) -> str:
        names = sorted({t for t in self.peers.values() if t})
        text = (
            f"clients {len(self.peers)}{' (' + ', '.join(names) + ')' if names else ''}    steps {self.steps}    "
            f"received {human_bytes(self.bytes_in)}    sent {human_bytes(self.bytes_out)}"
        )
        if self.auth_failures:
            text += f"    rejected logins {self.auth_failures}"
        last = self.last_step
        text += "\nlast step: " + (
            f"in {human_bytes(last.get('bytes_in', 0))}, out {human_bytes(last.get('bytes_out', 0))} | "
            f"decode {last.get('decode', 0):.1f} ms, forward {last.get('forward', 0):.1f} ms, "
            f"encode {last.get('encode', 0):.1f} ms  (from {last.get('peer', '?')}"
            f"{', token ' + last['token'] if last.get('token') else ''})"
            if last
            else "—"
        )
        return text

    def _listening(self) -> str:
        return listening_text(self.ready)

    def _update_stats(self) -> None:
        self.stats_label.configure(text=self._stats_text())

    def _model_result(self, path: str, info: Any) -> None:
        if path != self.v["weights"].get().strip():
            return  # an older answer
        if isinstance(info, ModelInfo):
            self.model_info = info
            self.n_spin.configure(to=info.total)
            self.model_label.configure(text=info.describe(), foreground="#2a6")
        else:
            self.model_info = None
            self.model_label.configure(text=str(info), foreground="#c33")
        self.check_n_blocks()

    def check_n_blocks(self) -> bool:
        """Check the n_blocks field against the chosen model's range; the message shows next to it."""
        try:
            n: int | None = int(self.v["n_blocks"].get())
        except (tk.TclError, ValueError):
            n = None
        info = None if self.toy else self.model_info
        if n is None:
            problem: str | None = "n_blocks must be a whole number"
        else:
            problem = info.n_blocks_problem(n) if info is not None else None
        if problem:
            self.n_range.configure(text="  " + problem, foreground="#c33")
        elif info is not None:
            self.n_range.configure(text=f"  1..{info.total} ({info.display}): the last N blocks run here "
                                   "(Icarus's n_blocks_remote)", foreground="")  # fmt: skip
        else:
            self.n_range.configure(text="  the last N blocks run here; Icarus's n_blocks_remote must match",
                                   foreground="")  # fmt: skip
        return problem is None

    def _devices(self, devs: list[dict[str, Any]]) -> None:
        labels = [device_label(d) for d in devs]
        self.device_box.configure(values=labels)
        cur = self.v["device"].get().split()[0] if self.v["device"].get().strip() else ""
        match = next((lab for d, lab in zip(devs, labels, strict=True) if d["id"] == cur), None)
        if match:
            self.v["device"].set(match)
        elif cur and cur != "cpu":
            log.warning("device %s is not present here; choose one of: %s", cur, ", ".join(d["id"] for d in devs))

    def _set_status(self, phase: str, text: str) -> None:
        self.status_label.configure(text=text)
        self.light.itemconfigure(self.dot, fill=COLORS.get(phase, COLORS["stopped"]))
        if phase == "stopped":
            self.peers.clear()
            self._update_stats()
        self._set_buttons()

    def _set_buttons(self) -> None:
        phase = self.runner.phase
        busy = phase in ("starting", "stopping")
        self.start_button.state(["disabled"] if busy or phase == "running" else ["!disabled"])
        self.stop_button.state(["!disabled"] if phase == "running" else ["disabled"])
        self.restart_button.state(["!disabled"] if phase == "running" else ["disabled"])

    def _append_log(self, level: int, text: str) -> None:
        t = self.log_text
        t.configure(state="normal")
        tag = "error" if level >= logging.ERROR else "warn" if level >= logging.WARNING else ""
        t.insert("end", text + "\n", tag)
        lines = int(t.index("end-1c").split(".")[0])
        if lines > MAX_LOG_LINES:
            t.delete("1.0", f"{lines - MAX_LOG_LINES}.0")
        t.configure(state="disabled")
        t.see("end")


def main(argv: list[str] | None = None) -> int:
    from .__main__ import _guard_sys_path

    _guard_sys_path()
    p = argparse.ArgumentParser(prog="python -m comfyui_mesh.server.gui", description="Daedalus window")
    p.add_argument("--toy", action="store_true", help="serve a model-free toy back half (tests, demos)")
    p.add_argument("--state-dir", default="", help="folder for the token and the window's settings")
    p.add_argument("--start", action="store_true", help="start the server as soon as the window opens")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[daedalus] %(message)s", stream=sys.stdout)
    from .budget import tune_allocator

    logging.getLogger("daedalus").debug("%s", tune_allocator())
    state_dir = Path(a.state_dir) if a.state_dir else default_state_dir()
    try:
        root = tk.Tk()
    except tk.TclError as e:
        print(
            f"cannot open a window ({e}); run the headless server instead: python -m comfyui_mesh.server",
            file=sys.stderr,
        )
        return 2
    app = App(root, state_dir, toy=a.toy)
    if a.start:
        root.after(200, app.start)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
