// ComfyUI-Mesh node UI, shared by every Icarus node type (isIcarusDef in mesh_logic.js):
// connection light, Confirm flow, banners and per-step stats from the Python side, token dialog,
// help panel, last-used values for new nodes. Talks to Python only through the pack's routes
// (/mesh/status, /mesh/reconfigure, /mesh/token) and its websocket events (mesh-banner, mesh-stats).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as L from "./mesh_logic.js";

const live = new Set(); // Icarus nodes currently in a graph
const statusByKey = new Map(); // "host:port" -> {status, at}
const inflight = new Set();

const CSS = `
.mesh-ui [hidden]{display:none!important}
.mesh-ui{font:12px/1.35 system-ui,sans-serif;color:var(--input-text,#ddd);padding:2px 4px;box-sizing:border-box;
  overflow:hidden}
.mesh-inner{display:flex;flex-direction:column;gap:4px}
.mesh-row{display:flex;align-items:center;gap:6px;min-height:22px}
.mesh-light{width:11px;height:11px;border-radius:50%;flex:none;background:#777;box-shadow:0 0 0 1px #0006}
.mesh-light[data-state=green]{background:#33c05a;box-shadow:0 0 6px #33c05a}
.mesh-light[data-state=red]{background:#e04848;box-shadow:0 0 6px #e04848}
.mesh-light[data-state=amber]{background:#e0a030;box-shadow:0 0 6px #e0a030}
.mesh-text{flex:1;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.mesh-btn{font:inherit;padding:1px 7px;border-radius:4px;border:1px solid #666;background:#333;color:#eee;cursor:pointer}
.mesh-btn:hover{background:#444}
.mesh-confirm{background:#5a3a05;border:1px solid #c98a1a;border-radius:4px;padding:4px 6px}
.mesh-confirm .mesh-btn{background:#d98b12;border-color:#f0b040;color:#111;font-weight:600;margin-top:3px}
.mesh-banner{border-radius:4px;padding:3px 6px;color:#fff;display:flex;gap:6px;align-items:flex-start}
.mesh-banner span{flex:1;overflow-wrap:anywhere}
.mesh-banner button{background:none;border:0;color:#fff;cursor:pointer;padding:0 2px}
.mesh-stats{color:#9ab;font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;min-height:14px}
.mesh-suggest{color:#9ab;font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.mesh-suggest.changed{color:#d8b45a}
.mesh-modal{position:fixed;inset:0;background:#0008;z-index:10000;display:flex;align-items:center;justify-content:center}
.mesh-modal>div{background:#222;color:#ddd;border:1px solid #555;border-radius:8px;padding:16px 20px;max-width:640px;
  max-height:80vh;overflow:auto;font:13px/1.5 system-ui,sans-serif}
.mesh-modal h3{margin:.2em 0 .6em}.mesh-modal h4{margin:.8em 0 .2em}
.mesh-modal input{width:100%;box-sizing:border-box;font:inherit;padding:4px;margin:6px 0;background:#111;color:#eee;
  border:1px solid #555}
`;

function injectCss() {
  if (document.getElementById("mesh-css")) return;
  const s = document.createElement("style");
  s.id = "mesh-css";
  s.textContent = CSS;
  document.head.appendChild(s);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function values(node) {
  const out = {};
  for (const w of node.widgets ?? []) if (w.name && w.name !== "mesh_status") out[w.name] = w.value;
  return out;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// ---------------------------------------------------------------- status polling
async function fetchStatus(addr, refresh = false) {
  if (inflight.has(addr.key)) return;
  inflight.add(addr.key);
  try {
    const r = await api.fetchApi(...L.statusRequest(addr, refresh));
    const body = await r.json();
    const status = r.ok ? body : { state: "red", reachable: false, error: body.error || `HTTP ${r.status}` };
    statusByKey.set(addr.key, { status, at: Date.now() });
  } catch (e) {
    statusByKey.set(addr.key, { status: { state: "red", reachable: false, error: `ComfyUI: ${e}` }, at: Date.now() });
  } finally {
    inflight.delete(addr.key);
  }
  for (const node of live) if (L.addressOf(values(node))?.key === addr.key) render(node);
}

function poll() {
  if (document.hidden) return;
  const seen = new Map();
  for (const node of [...live]) {
    if (!node.graph) {
      live.delete(node);
      continue;
    }
    const v = values(node);
    const addr = L.addressOf(v);
    if (addr && Number(v.n_blocks_remote) !== 0) seen.set(addr.key, addr);
    else render(node);
  }
  for (const addr of seen.values()) fetchStatus(addr);
}

// ---------------------------------------------------------------- per-node UI
function render(node) {
  const ui = node.__mesh;
  if (!ui) return;
  const v = values(node);
  const addr = L.addressOf(v);
  const status = addr ? statusByKey.get(addr.key)?.status : undefined;
  const light = L.lightFor(v, status, node.id);
  ui.light.dataset.state = light.state;
  ui.text.textContent = light.text;
  ui.row.title = light.title;
  const m = Number(v.n_blocks_remote) === 0 ? null : L.mismatch(v, status);
  ui.confirm.hidden = !m;
  if (m) {
    ui.confirmText.textContent = L.mismatchText(m, addr ? `${addr.host}:${addr.port}` : "the server");
    ui.confirmBtn.hidden = m.kind !== "confirm";
    ui.confirmBtn.textContent = `✓ Confirm: reconfigure the server to n_blocks=${m.wanted}`;
  }
  ui.suggest.hidden = !L.suggestionApplies(ui.suggestLine, v); // a run at another n makes it stale
  resize(node);
}

function resize(node) {
  const ui = node.__mesh;
  if (!ui.inner.offsetHeight) return; // not laid out (off screen, collapsed): keep the size
  const h = ui.inner.offsetHeight + 6; // layout px (the canvas zoom is a CSS transform above this)
  if (Math.abs(h - ui.height) < 2) return;
  ui.height = h;
  const want = node.computeSize?.();
  if (want && node.size) node.setSize([Math.max(node.size[0], want[0]), Math.max(want[1], 0)]);
  node.setDirtyCanvas?.(true, true);
}

function banner(node, level, text) {
  const ui = node.__mesh;
  if (!ui) return;
  const lv = L.bannerLevel(level);
  clearTimeout(ui.bannerTimer);
  ui.banner.hidden = !text;
  ui.banner.style.background = L.BANNER_LEVELS[lv].color;
  ui.bannerText.textContent = text ?? "";
  if (text && !L.BANNER_LEVELS[lv].persist) ui.bannerTimer = setTimeout(() => banner(node, "info", ""), 10000);
  resize(node);
}

async function confirm(node) {
  const v = values(node);
  const addr = L.addressOf(v);
  if (!addr) return;
  const ui = node.__mesh;
  ui.confirmBtn.disabled = true;
  ui.confirmBtn.textContent = "reconfiguring… (the server reloads its blocks)";
  try {
    const r = await api.fetchApi("/mesh/reconfigure", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ host: addr.host, port: addr.port, n_blocks: Number(v.n_blocks_remote) }),
    });
    const body = await r.json();
    if (!r.ok || !body.ok) throw new Error(body.error || `HTTP ${r.status}`);
    statusByKey.set(addr.key, { status: body.status, at: Date.now() });
    banner(node, "ok", `${addr.host}:${addr.port} now holds the last ${body.n_blocks} blocks`);
  } catch (e) {
    banner(node, "error", `reconfigure failed: ${e.message ?? e}`);
  } finally {
    ui.confirmBtn.disabled = false;
    for (const n of live) render(n);
  }
}

function modal(build) {
  const back = el("div", "mesh-modal");
  const box = el("div");
  back.appendChild(box);
  const close = () => back.remove();
  back.addEventListener("click", (e) => e.target === back && close());
  back.addEventListener("keydown", (e) => e.key === "Escape" && close());
  build(box, close);
  document.body.appendChild(back);
  return back;
}

function tokenDialog(node) {
  const addr = L.addressOf(values(node));
  if (!addr) return banner(node, "warn", "enter remote_host and remote_port first");
  modal((box, close) => {
    box.appendChild(el("h3", "", `Token for ${addr.host}:${addr.port}`));
    box.appendChild(el("div", "", "Paste the token the Daedalus window (or its console) shows. It is saved in " +
      "ComfyUI's user folder for this server only, never in workflows. Leave empty to remove it."));
    const input = el("input");
    input.type = "password";
    input.autocomplete = "off";
    input.placeholder = "token";
    const msg = el("div", "mesh-stats", "");
    const save = el("button", "mesh-btn", "Save");
    const cancel = el("button", "mesh-btn", "Close");
    save.onclick = async () => {
      save.disabled = true;
      msg.textContent = "saving and checking…";
      try {
        const r = await api.fetchApi("/mesh/token", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ host: addr.host, port: addr.port, token: input.value }),
        });
        const body = await r.json();
        msg.textContent = body.message || body.error || `HTTP ${r.status}`;
        if (r.ok) {
          input.value = "";
          fetchStatus(addr, true);
          if (body.verified !== false) setTimeout(close, 1200);
        }
      } catch (e) {
        msg.textContent = String(e);
      } finally {
        save.disabled = false;
      }
    };
    cancel.onclick = close;
    input.addEventListener("keydown", (e) => e.key === "Enter" && save.click());
    const row = el("div", "mesh-row");
    row.append(save, cancel);
    box.append(input, row, msg);
    setTimeout(() => input.focus(), 0);
  });
}

function helpPanel() {
  modal((box, close) => {
    box.appendChild(el("h3", "", "ComfyUI Mesh : Icarus"));
    for (const [title, text] of L.HELP_SECTIONS) {
      box.appendChild(el("h4", "", title));
      box.appendChild(el("div", "", text));
    }
    const ok = el("button", "mesh-btn", "Close");
    ok.style.marginTop = "12px";
    ok.onclick = close;
    box.appendChild(ok);
  });
}

function rememberValues(node) {
  try {
    const names = node.__mesh.remembered;
    localStorage.setItem(L.lastUsedKey(node.type), JSON.stringify(L.pickRemembered(values(node), names)));
  } catch {
    /* private mode or full storage: nothing to remember */
  }
}

function applyLastUsed(node) {
  // Runs when the node is created; a node loaded from a workflow gets its saved values right after.
  let stored = null;
  try {
    stored = L.parseStored(localStorage.getItem(L.lastUsedKey(node.type)));
  } catch {
    return;
  }
  const apply = L.applicableRemembered(stored, node.widgets);
  for (const [name, value] of Object.entries(apply)) widget(node, name).value = value;
}

function setupNode(node) {
  injectCss();
  const root = el("div", "mesh-ui");
  const inner = el("div", "mesh-inner"); // natural height: measured to size the node
  root.appendChild(inner);
  const row = el("div", "mesh-row");
  const light = el("span", "mesh-light");
  light.dataset.state = "grey";
  const text = el("span", "mesh-text", "…");
  const tokenBtn = el("button", "mesh-btn", "Token…");
  tokenBtn.title = "Save the Daedalus token for this server (kept in ComfyUI's user folder)";
  const helpBtn = el("button", "mesh-btn", "?");
  helpBtn.title = "How Icarus and Daedalus work together";
  row.append(light, text, tokenBtn, helpBtn);
  const confirmBox = el("div", "mesh-confirm");
  const confirmText = el("div");
  const confirmBtn = el("button", "mesh-btn");
  confirmBtn.title = "Ask Daedalus to reload holding this node's n_blocks_remote blocks";
  confirmBox.append(confirmText, confirmBtn);
  confirmBox.hidden = true;
  const bannerBox = el("div", "mesh-banner");
  const bannerText = el("span");
  const bannerClose = el("button", "", "✕");
  bannerBox.append(bannerText, bannerClose);
  bannerBox.hidden = true;
  const stats = el("div", "mesh-stats", "");
  stats.title = "Last remote step: codec, bytes sent/received, round trip (server forward time), encode time";
  const suggest = el("div", "mesh-suggest", "");
  suggest.hidden = true;
  inner.append(row, confirmBox, bannerBox, stats, suggest);
  for (const e of ["pointerdown", "mousedown", "wheel"]) root.addEventListener(e, (ev) => ev.stopPropagation());

  const remembered = (node.widgets ?? []).map((w) => w.name).filter(Boolean);
  node.__mesh = { root, inner, row, light, text, confirm: confirmBox, confirmText, confirmBtn, banner: bannerBox,
    bannerText, stats, suggest, remembered, height: 0 };
  const w = node.addDOMWidget("mesh_status", "mesh-status", root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => Math.max(node.__mesh.height, 48),
  });
  w.serialize = false; // not part of widgets_values: saved workflows keep the Python inputs' order
  confirmBtn.onclick = () => confirm(node);
  tokenBtn.onclick = () => tokenDialog(node);
  helpBtn.onclick = () => helpPanel();
  bannerClose.onclick = () => banner(node, "info", "");

  applyLastUsed(node);
  for (const wd of node.widgets ?? []) {
    if (wd === w) continue;
    const cb = wd.callback;
    wd.callback = function (...args) {
      const r = cb?.apply(this, args);
      rememberValues(node);
      const addr = L.addressOf(values(node));
      if (addr && !statusByKey.has(addr.key)) fetchStatus(addr);
      render(node);
      return r;
    };
  }
  live.add(node);
  setTimeout(() => {
    render(node);
    const addr = L.addressOf(values(node));
    if (addr) fetchStatus(addr);
  }, 0);
}

function onBanner({ detail }) {
  const node = L.resolveExecutionId(app.rootGraph ?? app.graph, detail?.node_id);
  if (node?.__mesh) banner(node, detail.level, detail.text);
}

function onStats({ detail }) {
  const node = L.resolveExecutionId(app.rootGraph ?? app.graph, detail?.node_id);
  if (!node?.__mesh) return;
  const line = L.suggestionLine(detail);
  if (line) {
    const ui = node.__mesh;
    ui.suggestLine = line;
    ui.suggest.textContent = line.text;
    ui.suggest.title = line.title;
    ui.suggest.classList.toggle("changed", line.changed);
    render(node);
    return;
  }
  node.__mesh.stats.textContent = L.formatStats(detail);
}

function guardQueue() {
  const original = api.queuePrompt;
  if (typeof original !== "function" || original.__meshGuard) return;
  const guarded = async function (number, data, ...rest) {
    const problems = L.blockingProblems(data?.output, statusByKey);
    if (problems.length) {
      for (const p of problems) {
        const node = L.resolveExecutionId(app.rootGraph ?? app.graph, p.nodeId);
        if (node?.__mesh) {
          banner(node, "warn", `Queue blocked: press Confirm, or set n_blocks_remote to ${p.server}.`);
        }
      }
      throw new Error("ComfyUI-Mesh: " + problems.map((p) => p.text).join("\n"));
    }
    return original.call(this, number, data, ...rest);
  };
  guarded.__meshGuard = true;
  api.queuePrompt = guarded;
}

// Served twice (a pack cloned under two names)? Register once.
if (!window.__comfyuiMeshIcarus) {
  window.__comfyuiMeshIcarus = true;
  register();
}

function register() {
  app.registerExtension({
    name: "comfyui-mesh.icarus",
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (!L.isIcarusDef(nodeData)) return;
      if (!L.MESH_NODE_TYPES.includes(nodeData.name)) L.MESH_NODE_TYPES.push(nodeData.name);
      const created = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function (...args) {
        const r = created?.apply(this, args);
        setupNode(this);
        return r;
      };
      const removed = nodeType.prototype.onRemoved;
      nodeType.prototype.onRemoved = function (...args) {
        live.delete(this);
        return removed?.apply(this, args);
      };
    },
    setup() {
      api.addEventListener("mesh-banner", onBanner);
      api.addEventListener("mesh-stats", onStats);
      api.addEventListener("execution_start", () => {
        for (const n of live) if (n.__mesh && !n.__mesh.banner.hidden) banner(n, "info", "");
      });
      guardQueue();
      setInterval(poll, L.POLL_MS);
    },
  });
}
