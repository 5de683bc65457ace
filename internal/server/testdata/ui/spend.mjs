// Opens llproxy's status page in headless Chromium (Debian's chromium,
// through playwright-core) and reads its spend view: for each client, the
// dollars shown today and this month, and the days its chart draws. It
// prints one JSON line for the Go test to compare with /clients.
import { chromium } from "playwright-core";

const base = process.env.GATEWAY_URL;
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ httpCredentials: { username: "admin", password: process.env.ADMIN_KEY } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/ui");
  await page.locator("#spend tr[data-client]").first().waitFor({ timeout: 20000 });
  const rows = {};
  for (const tr of await page.locator("#spend tr[data-client]").all()) {
    const cell = (c) => tr.locator("td." + c);
    rows[await tr.getAttribute("data-client")] = {
      today: await cell("today").getAttribute("data-usd"),
      todayText: await cell("today").textContent(),
      month: await cell("month").getAttribute("data-usd"),
      monthText: await cell("month").textContent(),
      chartDays: Number(await tr.locator("canvas").getAttribute("data-days")),
    };
  }
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
  console.log(JSON.stringify(rows));
} finally {
  await browser.close();
}
process.exit(0);
