// ComfyUI-Mesh node UI: the logic, with no DOM and no ComfyUI imports (unit-tested with
// `node --test tests/js/`). web/mesh.js does the drawing and the wiring.
//
// ComfyUI loads every .js file of the pack's web folder as an extension module; this one only
// exports, so loading it on its own does nothing.

// Icarus node types are found in /object_info: their model input carries this option
// (ICARUS_FLAG in mesh_node.py), so a new node type needs no change here.
export const ICARUS_FLAG = "comfyui_mesh_icarus";

/** Whether a node definition from /object_info is an Icarus node. */
export function isIcarusDef(nodeData) {
  return nodeData?.input?.required?.model?.[1]?.[ICARUS_FLAG] === true;
}

// Every Icarus node type the UI decorates: filled by mesh.js as ComfyUI registers node definitions.
export const MESH_NODE_TYPES = [];

export const POLL_MS = 3000; // status poll period per server address
export const STALE_MS = 30000; // an older status no longer blocks queueing
const LAST_USED_PREFIX = "comfyui-mesh.lastUsed.";

/** {host, port} from the node's widget values, or null when they don't name a server. */
export function addressOf(values) {
  const host = String(values?.remote_host ?? "").trim();
  const port = Number(values?.remote_port);
  if (!host || !Number.isInteger(port) || port < 1 || port > 65535) return null;
  return { host, port, key: `${host.toLowerCase()}:${port}` };
}

/** The status probe request: a JSON POST (the routes refuse anything else, so other origins cannot probe). */
export function statusRequest(addr, refresh = false) {
  return [
    "/mesh/status",
    {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ host: addr.host, port: addr.port, refresh }),
    },
  ];
}

/** The split this node last configured, from the status's per-node ``splits`` (family it detected in its MODEL). */
export function splitOf(status, nodeId) {
  if (nodeId === undefined || nodeId === null) return undefined;
  return status?.splits?.[String(nodeId)];
}

function familyNote(split, status) {
  if (!split) return "";
  let note = ` This node splits a ${split.family_display} model (family ${split.family}, last run).`;
  if (status?.arch && status.arch !== split.family) {
    note += ` The server serves ${status.arch}: start Daedalus with this node's model file.`;
  }
  return note;
}

/** The light: {state: grey|green|amber|red, text, title} for a node's values, its server's status and its id. */
export function lightFor(values, status, nodeId) {
  const n = Number(values?.n_blocks_remote);
  if (n === 0) {
    return { state: "grey", text: "local: n_blocks_remote is 0", title: "The whole model runs in this ComfyUI." };
  }
  const addr = addressOf(values);
  if (!addr) return { state: "grey", text: "no server address", title: "Enter remote_host and remote_port." };
  const where = `${addr.host}:${addr.port}`;
  if (!status) return { state: "grey", text: `${where} · checking…`, title: "Asking the server…" };
  const split = splitOf(status, nodeId);
  const family = split ? ` · ${split.family_display}` : "";
  const note = familyNote(split, status);
  if (status.state === "green") {
    const text = `${where} · server n=${status.n_blocks}/${status.n_blocks_max}${family}`;
    const title = `Daedalus ${status.server_version ?? ""} serves ${status.model} (${status.arch}) on ${status.device}` +
      `, holding the last ${status.n_blocks} of ${status.n_blocks_max} blocks.` +
      (status.auth_needed ? " Token saved." : " No authentication.") + note;
    return { state: "green", text, title };
  }
  if (status.state === "amber" && status.token_rejected) {
    return { state: "amber", text: `${where} · token rejected`, title: (status.error || "token rejected") + note };
  }
  const error = status.error || "unreachable";
  const text = status.reachable && Number.isInteger(status.n_blocks)
    ? `${where} · server n=${status.n_blocks} · ${error}`
    : `${where} · ${error}`;
  return { state: "red", text, title: error + note };
}

/**
 * What n_blocks_remote vs the server needs, or null when they agree (or nothing is known):
 * {kind: "confirm", wanted, server, max} — a Confirm click reconfigures the server;
 * {kind: "range", wanted, server, max}   — the server's model has fewer blocks than wanted.
 */
export function mismatch(values, status) {
  const wanted = Number(values?.n_blocks_remote);
  if (!status?.reachable || !Number.isInteger(wanted) || wanted <= 0) return null;
  const server = Number(status.n_blocks);
  if (!Number.isInteger(server) || server === wanted) return null;
  const max = Number(status.n_blocks_max) || 0;
  return { kind: max && wanted > max ? "range" : "confirm", wanted, server, max };
}

export function mismatchText(m, where = "the server") {
  if (!m) return "";
  if (m.kind === "range") {
    return `n_blocks_remote is ${m.wanted} but ${where}'s model has only ${m.max} blocks: choose 1..${m.max}.`;
  }
  return `${where} holds ${m.server} blocks, this node asks for ${m.wanted}. Queueing is blocked until you ` +
    `press Confirm (the server reloads with ${m.wanted}) or set n_blocks_remote to ${m.server}.`;
}

/**
 * Reasons to refuse a queued prompt: Icarus nodes in the API prompt `output` whose literal
 * n_blocks_remote differs from what their server (last status, if fresh) holds.
 * statusByKey: Map "host:port" -> {status, at}. Inputs fed by links are not judged here (Python checks).
 */
export function blockingProblems(output, statusByKey, nodeTypes = MESH_NODE_TYPES, now = Date.now()) {
  const problems = [];
  for (const [id, node] of Object.entries(output ?? {})) {
    if (!nodeTypes.includes(node?.class_type)) continue;
    const inputs = node.inputs ?? {};
    if ([inputs.remote_host, inputs.remote_port, inputs.n_blocks_remote].some(Array.isArray)) continue;
    const addr = addressOf(inputs);
    if (!addr) continue;
    const entry = statusByKey.get(addr.key);
    if (!entry || now - entry.at > STALE_MS) continue;
    const m = mismatch(inputs, entry.status);
    if (m) problems.push({ nodeId: id, ...m, text: `Icarus node ${id}: ${mismatchText(m, `${addr.host}:${addr.port}`)}` });
  }
  return problems;
}

/**
 * The node an execution id names. ComfyUI's ids for nodes inside subgraphs are paths of node
 * ids, "12:5" = node 5 inside the subgraph of node 12. `graph` is duck-typed: getNodeById(id),
 * and a subgraph node's `.subgraph` graph.
 */
export function resolveExecutionId(graph, executionId) {
  if (!graph || executionId === undefined || executionId === null) return null;
  const parts = String(executionId).split(":").filter((p) => p !== "");
  let g = graph;
  let node = null;
  for (let i = 0; i < parts.length; i++) {
    if (!g?.getNodeById) return null;
    const raw = parts[i];
    node = g.getNodeById(/^\d+$/.test(raw) ? Number(raw) : raw) ?? g.getNodeById(raw) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) g = node.subgraph;
  }
  return node;
}

export function formatBytes(n) {
  const v = Number(n) || 0;
  if (v >= 1e9) return `${(v / 1e9).toFixed(2)} GB`;
  if (v >= 1e6) return `${(v / 1e6).toFixed(2)} MB`;
  if (v >= 1e3) return `${(v / 1e3).toFixed(1)} kB`;
  return `${v} B`;
}

/** One line of per-step stats from a mesh-stats event (or the call's state while it is held up). */
export function formatStats(s) {
  if (!s) return "";
  if (s.status) return String(s.status);
  const ms = (x) => `${Math.round(Number(x) || 0)} ms`;
  return `step ${s.call} · ${s.codec} · ↑${formatBytes(s.bytes_out)} ↓${formatBytes(s.bytes_in)} · ` +
    `round trip ${ms(s.round_trip_ms)} (server ${ms(s.server_forward_ms)}) · encode ${ms(s.encode_ms)}`;
}

/**
 * The n_blocks_remote suggestion of a mesh-stats event ({suggestion} at a generation's end, balance.py),
 * or null when the event carries none: {text, title, changed, current}. Advice only: nothing changes by
 * itself; the line is shown while the node's n_blocks_remote is still the measured one (`current`).
 */
export function suggestionLine(s) {
  const g = s?.suggestion;
  if (!g || typeof g !== "object") return null;
  const changed = g.changed === true && Number.isInteger(g.suggested) && g.suggested !== g.current;
  const text = String(g.text ?? "");
  if (!text) return null;
  const title = changed
    ? `Estimated from the last run (${g.calls} remote calls, ${g.mode}): set n_blocks_remote to ${g.suggested} ` +
      `and press Confirm to try it. Allowed here: ${(g.range ?? []).join("..")}. Nothing changes by itself.`
    : `Estimated from the last run (${g.calls} remote calls, ${g.mode}): no other n_blocks_remote is clearly faster.`;
  return { text: changed ? `suggestion: ${text}` : text, title, changed, current: Number(g.current) };
}

/** Whether a suggestion line (from suggestionLine) still speaks of the node's n_blocks_remote. */
export function suggestionApplies(line, values) {
  return !!line && Number(values?.n_blocks_remote) === line.current;
}

export const BANNER_LEVELS = {
  ok: { color: "#1f7a3a", persist: false },
  info: { color: "#28589c", persist: false },
  warn: { color: "#9a6a00", persist: true },
  error: { color: "#a32b2b", persist: true },
};

export function bannerLevel(level) {
  return BANNER_LEVELS[level] ? level : "info";
}

export function lastUsedKey(nodeType) {
  return LAST_USED_PREFIX + nodeType;
}

/** The values worth remembering for new nodes: the named widgets' current values. */
export function pickRemembered(values, names) {
  const out = {};
  for (const name of names) {
    if (values[name] !== undefined) out[name] = values[name];
  }
  return out;
}

/**
 * Stored last-used values, kept only where the widget still exists with a value of the same
 * type (and, for combos, an allowed option). `widgets` is [{name, value, options?: {values}}].
 */
export function applicableRemembered(stored, widgets) {
  const out = {};
  if (!stored || typeof stored !== "object") return out;
  for (const w of widgets ?? []) {
    if (!(w.name in stored)) continue;
    const v = stored[w.name];
    if (typeof v !== typeof w.value) continue;
    const allowed = w.options?.values;
    if (Array.isArray(allowed) && !allowed.includes(v)) continue;
    out[w.name] = v;
  }
  return out;
}

export function parseStored(text) {
  try {
    const v = JSON.parse(text ?? "null");
    return v && typeof v === "object" && !Array.isArray(v) ? v : null;
  } catch {
    return null;
  }
}

export const HELP_SECTIONS = [
  ["Connection", "Icarus (this node) runs the first blocks of the model here and sends the state at the seam to " +
    "Daedalus, which runs the last n_blocks_remote blocks and the output layer. remote_host/remote_port name the " +
    "Daedalus machine (127.0.0.1 for a second GPU in this PC). The light: green = reachable and usable, amber = the " +
    "saved token is rejected (save the one Daedalus prints), red = " +
    "not (the text says why), grey = local or not checked yet. Daedalus prints a token at its first start: paste it " +
    "with Token… (it is kept in ComfyUI's user folder, never in the workflow)."],
  ["n_blocks_remote", "How many blocks, counted from the END of the model, run on Daedalus. It must equal the " +
    "server's n_blocks: when they differ, press Confirm and the server reloads with this node's value (queueing is " +
    "blocked until then), or set n_blocks_remote to the server's value. 0 runs everything here. More blocks remote " +
    "= less VRAM here, more work there; the bytes per step do not change. After a run, a line under the node " +
    "may suggest another value: estimated from the times measured on both sides and the link in that run, so " +
    "both GPUs do similar work. It is advice: nothing changes until you set it and press Confirm."],
  ["LoRA order", "A LoRA loaded BEFORE Icarus changes the whole model: with forward_client_loras on, its weights " +
    "for the remote blocks are sent to Daedalus once per change. A LoRA loaded AFTER Icarus stays local (front " +
    "half only). For big LoRAs (over ~500 MB) load them on both sides instead: in the Daedalus window's LoRA slots " +
    "and in a LoraLoader placed after Icarus; then only activations cross the wire."],
  ["Codecs", "raw sends exact bytes: the output is bit-identical to a single-GPU run; best on fast links and on " +
    "the same PC. int8 sends about half the bytes with a tiny error: use it on gigabit Ethernet. The stats line " +
    "under the node shows the codec, bytes each way and the round-trip time of the last step."],
];
