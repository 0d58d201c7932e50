// Unit tests of the node UI's logic: node --test tests/js/
import assert from "node:assert/strict";
import { test } from "node:test";
import * as L from "../../web/mesh_logic.js";

const ICARUS = ["MeshSplitFlux", "MeshSplitLTX"]; // what mesh.js collects from /object_info

const green = { state: "green", reachable: true, n_blocks: 4, n_blocks_max: 8, model: "toy-8x64", arch: "toy",
  device: "cpu", auth_needed: true, server_version: "0.2.0" };
const node = (over = {}) => ({ n_blocks_remote: 4, remote_host: "127.0.0.1", remote_port: 7777, ...over });

test("addressOf validates host and port", () => {
  assert.deepEqual(L.addressOf(node()), { host: "127.0.0.1", port: 7777, key: "127.0.0.1:7777" });
  assert.equal(L.addressOf(node({ remote_host: "  " })), null);
  assert.equal(L.addressOf(node({ remote_port: 0 })), null);
  assert.equal(L.addressOf(node({ remote_port: 70000 })), null);
  assert.equal(L.addressOf(node({ remote_host: " GPU-Box " })).key, "gpu-box:7777");
  const [url, init] = L.statusRequest({ host: "a b", port: 1 }, true);
  assert.equal(url, "/mesh/status");
  assert.equal(init.method, "POST");
  assert.equal(init.headers["Content-Type"], "application/json");
  assert.deepEqual(JSON.parse(init.body), { host: "a b", port: 1, refresh: true });
});

test("light: grey when local, unknown or unaddressed; green; red with the reason", () => {
  assert.equal(L.lightFor(node({ n_blocks_remote: 0 }), green).state, "grey");
  assert.equal(L.lightFor(node({ remote_host: "" }), undefined).state, "grey");
  assert.match(L.lightFor(node(), undefined).text, /checking/);
  const g = L.lightFor(node(), green);
  assert.equal(g.state, "green");
  assert.equal(g.text, "127.0.0.1:7777 · server n=4/8");
  assert.match(g.title, /toy-8x64/);
  const r = L.lightFor(node(), { state: "red", reachable: false, error: "nothing listens on 127.0.0.1:7777" });
  assert.equal(r.state, "red");
  assert.match(r.text, /nothing listens/);
  const rr = L.lightFor(node(), { ...green, state: "red", error: "token needed" });
  assert.match(rr.text, /server n=4 · token needed/);
});

test("light: amber when the saved token is rejected", () => {
  const why = "token rejected: the saved token is not this server's";
  const a = L.lightFor(node(), { ...green, state: "amber", token_rejected: true, error: why });
  assert.equal(a.state, "amber");
  assert.equal(a.text, "127.0.0.1:7777 · token rejected");
  assert.equal(a.title, why);
});

test("mismatch: confirm when the server differs, range when the model is too small, none otherwise", () => {
  assert.equal(L.mismatch(node(), green), null);
  assert.equal(L.mismatch(node({ n_blocks_remote: 0 }), green), null);
  assert.equal(L.mismatch(node({ n_blocks_remote: 6 }), undefined), null);
  assert.equal(L.mismatch(node({ n_blocks_remote: 6 }), { state: "red", reachable: false }), null);
  assert.deepEqual(L.mismatch(node({ n_blocks_remote: 6 }), green), { kind: "confirm", wanted: 6, server: 4, max: 8 });
  assert.equal(L.mismatch(node({ n_blocks_remote: 9 }), green).kind, "range");
  // a red light with a known n_blocks (e.g. token missing) still shows the Confirm flow
  assert.equal(L.mismatch(node({ n_blocks_remote: 6 }), { ...green, state: "red" }).kind, "confirm");
  assert.match(L.mismatchText(L.mismatch(node({ n_blocks_remote: 6 }), green), "h:1"), /press Confirm.*set n_blocks_remote to 4/);
  assert.match(L.mismatchText(L.mismatch(node({ n_blocks_remote: 9 }), green)), /choose 1..8/);
});

test("blockingProblems judges only Icarus nodes with literal inputs and a fresh status", () => {
  const now = 1_000_000;
  const statuses = new Map([["127.0.0.1:7777", { status: green, at: now - 1000 }]]);
  const output = {
    "1": { class_type: "UNETLoader", inputs: { unet_name: "x" } },
    "2": { class_type: "MeshSplitFlux", inputs: { model: ["1", 0], ...node({ n_blocks_remote: 6 }) } },
    "3": { class_type: "MeshSplitFlux", inputs: { model: ["1", 0], ...node() } },
    "4": { class_type: "MeshSplitFlux", inputs: { model: ["1", 0], ...node({ n_blocks_remote: ["9", 0] }) } },
    "5:7": { class_type: "MeshSplitLTX", inputs: { ...node({ n_blocks_remote: 2 }) } },
    "6": { class_type: "MeshSplitFlux", inputs: { ...node({ remote_port: 7778, n_blocks_remote: 2 }) } },
  };
  const p = L.blockingProblems(output, statuses, ICARUS, now);
  assert.deepEqual(p.map((x) => x.nodeId), ["2", "5:7"]);
  assert.match(p[0].text, /^Icarus node 2: 127.0.0.1:7777 holds 4 blocks, this node asks for 6/);
  assert.deepEqual(L.blockingProblems(output, statuses, ICARUS, now + L.STALE_MS + 2000), []);
  assert.deepEqual(L.blockingProblems(undefined, statuses), []);
});

test("resolveExecutionId walks subgraph paths", () => {
  const inner = { id: 5, name: "inner" };
  const sub = { getNodeById: (id) => (id === 5 ? inner : null) };
  const outer = { id: 12, subgraph: sub };
  const plain = { id: 3 };
  const root = { getNodeById: (id) => ({ 12: outer, 3: plain })[id] ?? null };
  assert.equal(L.resolveExecutionId(root, "3"), plain);
  assert.equal(L.resolveExecutionId(root, 3), plain);
  assert.equal(L.resolveExecutionId(root, "12:5"), inner);
  assert.equal(L.resolveExecutionId(root, "12:6"), null);
  assert.equal(L.resolveExecutionId(root, "3:5"), null); // not a subgraph node
  assert.equal(L.resolveExecutionId(root, "99"), null);
  assert.equal(L.resolveExecutionId(null, "3"), null);
  assert.equal(L.resolveExecutionId(root, undefined), null);
});

test("stats and byte formatting", () => {
  assert.equal(L.formatBytes(512), "512 B");
  assert.equal(L.formatBytes(2048), "2.0 kB");
  assert.equal(L.formatBytes(5_240_000), "5.24 MB");
  assert.equal(L.formatBytes(3.2e9), "3.20 GB");
  const s = L.formatStats({ call: 3, codec: "raw", bytes_out: 5_240_000, bytes_in: 5_000_000, round_trip_ms: 131.4,
    server_forward_ms: 80.2, encode_ms: 1.2 });
  assert.equal(s, "step 3 · raw · ↑5.24 MB ↓5.00 MB · round trip 131 ms (server 80 ms) · encode 1 ms");
  assert.equal(L.formatStats(null), "");
  assert.equal(L.formatStats({ call: 3, status: "reconnecting to 10.0.0.2:7777…" }), "reconnecting to 10.0.0.2:7777…");
});

test("last-used values: only existing widgets, same type, allowed combo values", () => {
  assert.equal(L.lastUsedKey("MeshSplitFlux"), "comfyui-mesh.lastUsed.MeshSplitFlux");
  const v = { n_blocks_remote: 6, remote_host: "10.0.0.2", codec_mode: "int8", extra: 1 };
  assert.deepEqual(L.pickRemembered(v, ["n_blocks_remote", "remote_host", "codec_mode", "missing"]),
    { n_blocks_remote: 6, remote_host: "10.0.0.2", codec_mode: "int8" });
  const widgets = [
    { name: "n_blocks_remote", value: 4 },
    { name: "remote_host", value: "127.0.0.1" },
    { name: "codec_mode", value: "raw", options: { values: ["raw", "int8"] } },
    { name: "codec_tile_dim", value: 8, options: { values: [1, 2, 4, 8] } },
  ];
  const stored = { n_blocks_remote: "6", remote_host: "10.0.0.2", codec_mode: "int8", codec_tile_dim: 3, gone: 1 };
  assert.deepEqual(L.applicableRemembered(stored, widgets), { remote_host: "10.0.0.2", codec_mode: "int8" });
  assert.deepEqual(L.applicableRemembered(null, widgets), {});
  assert.equal(L.parseStored("{bad"), null);
  assert.equal(L.parseStored("[1]"), null);
  assert.deepEqual(L.parseStored('{"a":1}'), { a: 1 });
});

test("banner levels and help", () => {
  assert.equal(L.bannerLevel("error"), "error");
  assert.equal(L.bannerLevel("bogus"), "info");
  assert.equal(L.BANNER_LEVELS.error.persist, true);
  assert.equal(L.BANNER_LEVELS.ok.persist, false);
  const titles = L.HELP_SECTIONS.map(([t]) => t);
  assert.deepEqual(titles, ["Connection", "n_blocks_remote", "LoRA order", "Codecs"]);
});

test("Icarus node definitions are found by the flag on their model input", () => {
  assert.equal(L.isIcarusDef({ name: "X", input: { required: { model: ["MODEL", { [L.ICARUS_FLAG]: true }] } } }), true);
  assert.equal(L.isIcarusDef({ name: "MeshSplitFlux", input: { required: { model: ["MODEL"] } } }), false);
  assert.equal(L.isIcarusDef({ name: "KSampler", input: { required: { model: ["MODEL", {}] } } }), false);
  assert.equal(L.isIcarusDef(undefined), false);
});

test("the n_blocks_remote suggestion: a line of its own, shown while n_blocks_remote is the measured one", () => {
  const g = { current: 16, suggested: 22, changed: true, mode: "rows", calls: 40, range: [1, 32],
    text: "n_blocks_remote 16 -> 22: client 61 ms, server 48 ms, link 9 ms per step; est. 0.21 -> 0.18 s/step (rows)" };
  const line = L.suggestionLine({ node_id: "7", suggestion: g });
  assert.equal(line.text, "suggestion: " + g.text);
  assert.equal(line.changed, true);
  assert.equal(line.current, 16);
  assert.match(line.title, /set n_blocks_remote to 22 and press Confirm/);
  assert.match(line.title, /Allowed here: 1\.\.32/);
  assert.equal(L.suggestionApplies(line, { n_blocks_remote: 16 }), true);
  assert.equal(L.suggestionApplies(line, { n_blocks_remote: 22 }), false); // applied: stale until the next run
  assert.equal(L.suggestionApplies(null, { n_blocks_remote: 16 }), false);
  const stays = L.suggestionLine({ suggestion: { ...g, suggested: 16, changed: false, text: "n_blocks_remote 16 stays: x" } });
  assert.equal(stays.text, "n_blocks_remote 16 stays: x");
  assert.equal(stays.changed, false);
  assert.match(stays.title, /no other n_blocks_remote is clearly faster/);
  // a stats event is not a suggestion, and a suggestion event is not a stats line
  assert.equal(L.suggestionLine({ call: 3, codec: "raw" }), null);
  assert.equal(L.suggestionLine({ suggestion: { current: 4 } }), null);
  assert.equal(L.suggestionLine(null), null);
});

test("light: the family the node detected (/mesh/status splits) on its line and in its tooltip", () => {
  const splits = { 12: { family: "wan", family_display: "Wan", n_blocks: 20 } };
  const wan = { ...green, arch: "wan", model: "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", splits };
  assert.deepEqual(L.splitOf(wan, 12), splits[12]);
  assert.equal(L.splitOf(wan, undefined), undefined);
  const g = L.lightFor(node(), wan, 12);
  assert.equal(g.text, "127.0.0.1:7777 · server n=4/8 · Wan");
  assert.match(g.title, /This node splits a Wan model \(family wan, last run\)\.$/);
  // another node on the same server, not run yet: no family, the line as before
  assert.equal(L.lightFor(node(), wan, 13).text, "127.0.0.1:7777 · server n=4/8");
  assert.equal(L.lightFor(node(), wan, 13).title, L.lightFor(node(), { ...wan, splits: undefined }, 12).title);
  // a node whose model is not the server's: the tooltip says so and names the fix
  const other = L.lightFor(node(), { ...wan, arch: "flux1" }, 12);
  assert.match(other.title, /The server serves flux1: start Daedalus with this node's model file\./);
  const red = L.lightFor(node(), { ...wan, state: "red", error: "token needed" }, 12);
  assert.match(red.title, /^token needed This node splits a Wan model/);
});
