// Drives the Icarus node UI in Debian's chromium (playwright-core) against a running ComfyUI.
// Run by tests/test_comfyui_ui.py, which starts ComfyUI and a toy Daedalus and passes:
//   COMFY_URL, DAEDALUS_PORT, WORKFLOW (example workflow JSON), BANNER_PROMPT (API prompt whose
//   "ICARUS" node id is replaced by the loaded Icarus node's id), ARTIFACTS (screenshot folder).
// Prints progress lines, then one JSON line with what it saw.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = process.env;
const port = Number(env.DAEDALUS_PORT);
const shots = [];
const log = (...a) => console.log("[browser]", ...a);

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const result = {};
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => log("page error:", e.message));
  page.on("console", (m) => m.type() === "error" && log("console error:", m.text()));
  await page.goto(env.COMFY_URL, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager, null, { timeout: 90000 });
  await page.waitForFunction(() => window.LiteGraph?.registered_node_types?.MeshSplitFlux, null, { timeout: 60000 });
  log("frontend up");

  // Load the example workflow, pointed at the toy server (it holds 3 of 8 blocks).
  const wf = JSON.parse(readFileSync(env.WORKFLOW, "utf8"));
  const icarus = wf.nodes.find((n) => n.type === "MeshSplitFlux");
  icarus.widgets_values[0] = 3;
  icarus.widgets_values[2] = port;
  await page.evaluate(async (w) => {
    await window.app.loadGraphData(w);
    document.querySelectorAll(".p-dialog-mask, .p-toast").forEach((d) => d.remove());
  }, wf);
  const id = icarus.id;
  // Frame the Icarus node.
  await page.evaluate((nid) => {
    const app = window.app;
    const node = app.graph.getNodeById(nid);
    const ds = app.canvas.ds;
    ds.scale = 1.1;
    ds.offset = [-node.pos[0] + 80, -node.pos[1] + 110];
    app.canvas.setDirty(true, true);
  }, id);
  await page.waitForSelector('.mesh-light[data-state="green"]', { timeout: 30000 });
  result.light = await page.$eval(".mesh-light", (e) => e.dataset.state);
  result.text = await page.$eval(".mesh-text", (e) => e.textContent);
  log("light", result.light, result.text);
  await page.waitForTimeout(500);
  shots.push(join(env.ARTIFACTS, "icarus_node_green.png"));
  await page.screenshot({ path: shots.at(-1) });

  // n_blocks_remote 5 != server 3: Confirm appears, queueing is refused.
  await page.evaluate((nid) => {
    const node = window.app.graph.getNodeById(nid);
    const w = node.widgets.find((x) => x.name === "n_blocks_remote");
    w.value = 5;
    w.callback?.(5);
  }, id);
  await page.waitForSelector(".mesh-confirm:not([hidden])", { timeout: 10000 });
  result.confirm_visible = true;
  result.confirm_button = await page.$eval(".mesh-confirm button", (e) => e.textContent);
  result.queue_error = await page.evaluate(async () => {
    const { api } = window.comfyAPI.api;
    const { output } = await window.app.graphToPrompt();
    try {
      await api.queuePrompt(0, { output, workflow: {} });
      return "queued (not blocked)";
    } catch (e) {
      return String(e.message ?? e);
    }
  });
  log("queue:", result.queue_error);
  await page.waitForTimeout(300);
  shots.push(join(env.ARTIFACTS, "icarus_node_confirm.png"));
  await page.screenshot({ path: shots.at(-1) });

  await page.click(".mesh-confirm button");
  await page.waitForSelector(".mesh-confirm", { state: "hidden", timeout: 30000 });
  await page.waitForFunction(() => document.querySelector(".mesh-text")?.textContent.endsWith("server n=5/8"));
  result.after_confirm_text = await page.$eval(".mesh-text", (e) => e.textContent);
  result.confirm_visible_after = await page.$eval(".mesh-confirm", (e) => !e.hidden);
  log("after confirm:", result.after_confirm_text);

  // A banner from Python: run a prompt whose Icarus node (same id as on the canvas) meets a server
  // of another model family; the node sends mesh-banner before failing.
  const prompt = JSON.parse(env.BANNER_PROMPT.replaceAll('"ICARUS"', JSON.stringify(String(id))));
  prompt[String(id)].inputs.n_blocks_remote = 2;
  const queued = await page.evaluate(async (p) => {
    const { api } = window.comfyAPI.api;
    const r = await api.fetchApi("/prompt", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: p, client_id: api.clientId }),
    });
    return [r.status, await r.text()];
  }, prompt);
  log("prompt:", queued[0], queued[1].slice(0, 200));
  await page.waitForSelector(".mesh-banner:not([hidden])", { timeout: 60000 });
  result.banner = await page.$eval(".mesh-banner span", (e) => e.textContent);
  result.banner_level_color = await page.$eval(".mesh-banner", (e) => e.style.background);
  log("banner:", result.banner);
  await page.evaluate(() => document.querySelectorAll(".p-dialog-mask, .p-toast, [role=dialog]").forEach((d) => d.remove()));
  await page.waitForTimeout(500);
  shots.push(join(env.ARTIFACTS, "icarus_node_banner.png"));
  await page.screenshot({ path: shots.at(-1) });
  result.screenshots = shots;
} finally {
  await browser.close();
}
console.log(JSON.stringify(result));
