// Drives llproxy's status page in headless Chromium (Debian's chromium,
// through playwright-core): the page loads, shows a queue fill and drain
// while the Go test sends a burst, and unloads a managed backend. It talks
// to the Go test on stdin/stdout, a line per step.
import { chromium } from "playwright-core";
import * as readline from "node:readline";

const base = process.env.GATEWAY_URL;
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (msg) => console.log(msg);
const waitFor = async (what, check, ms = 20000) => {
  const end = Date.now() + ms;
  for (;;) {
    if (await check()) return;
    if (Date.now() > end) throw new Error("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 50));
  }
};

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ httpCredentials: { username: "admin", password: process.env.ADMIN_KEY } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/ui");
  const depth = page.locator('section[data-route="slow"] tr[data-model="slow-model"] td.depth');
  await depth.waitFor({ timeout: 20000 });
  say("ready");
  await lines.next(); // the burst is on its way
  let seen = 0;
  await waitFor("the queue to fill", async () => (seen = Math.max(seen, Number(await depth.textContent()))) >= 2);
  say("filled " + seen);
  await waitFor("the queue to drain", async () => Number(await depth.textContent()) === 0);
  say("drained");
  // The chart has drawn what was admitted.
  const charted = await page.locator('section[data-route="slow"] tr[data-model="slow-model"] canvas').count();
  say("charts " + charted);
  const button = page.locator('section[data-route="local"] tr[data-backend="a"] button[data-unload]');
  await button.waitFor({ timeout: 20000 });
  await button.click();
  const state = page.locator('section[data-route="local"] tr[data-backend="a"] td.state');
  await waitFor("the backend to unload", async () => (await state.textContent()) === "stopped");
  say("unloaded");
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  await page.screenshot({ path: process.env.SCREENSHOT || "status.png", fullPage: true });
  say("done");
} finally {
  await browser.close();
}
process.exit(0);
