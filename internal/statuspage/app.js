"use strict";
// The page fetches /ui/state every second and redraws. Everything from the
// server is set as text (never as HTML).
const $ = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") e.textContent = v; else if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
};
const secs = s => s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(1) + " s";
function bar(remaining, limit) {
  const pct = limit > 0 ? Math.max(0, Math.min(100, 100 * remaining / limit)) : 0;
  const b = $("span", { class: "bar", title: `${Math.floor(remaining)} of ${limit} left` }, $("span"));
  b.firstChild.style.width = pct + "%";
  return $("span", {}, b, $("span", { class: "small num", text: ` ${Math.floor(Math.max(0, remaining))}/${limit}` }));
}
// batchText sums up the batch class: how many wait, the oldest wait, a
// newcomer's predicted wait, and the headroom it leaves.
function batchText(m) {
  const b = (m.classes || []).find(c => c.class === "batch");
  if (!b) return "–";
  const head = `headroom ${Math.round(100 * (m.batchHeadroom || 0))}%`;
  const rate = `${b.admittedPerSecond.toFixed(1)}/s`;
  if (!b.waiting) return `none waiting, ${rate}, ${head}`;
  return `${b.waiting} waiting, ${rate}, oldest ${secs(b.oldestWait)}, a newcomer ${secs(b.predictedWait)}, ${head}`;
}
// tokenBars draws the model's token buckets: one, or input and output
// apart (an Anthropic model), each labelled when it is not the only one.
function tokenBars(m) {
  const bs = m.buckets && m.buckets.length ? m.buckets : [{ name: "tokens", ...m.tokens }];
  return $("span", {}, ...bs.map(b => $("div", { "data-bucket": b.name },
    bs.length > 1 || b.name !== "tokens" ? $("span", { class: "small", text: b.name + " " }) : null,
    bar(b.remaining, b.limit))));
}
function chart(admitted, rejected) {
  const c = $("canvas", { width: 300, height: 48, title: "admitted (blue) and refused (red) per second, last 5 minutes" });
  const g = c.getContext("2d");
  const n = 300, max = Math.max(1, ...admitted, ...rejected);
  const line = (data, color) => {
    g.strokeStyle = color; g.lineWidth = 1.5; g.beginPath();
    data.forEach((v, i) => {
      const x = (n - data.length + i) * (c.width / n), y = c.height - 2 - v / max * (c.height - 4);
      i ? g.lineTo(x, y) : g.moveTo(x, y);
    });
    g.stroke();
  };
  line(admitted, "#4c7bd9"); line(rejected, "#d64545");
  return c;
}
async function unload(model, button) {
  button.disabled = true;
  try {
    // A header no form can send: the gateway refuses a mutating admin
    // call made with a browser's saved login without it (cross-site forms).
    const r = await fetch("/unload/" + encodeURIComponent(model),
      { method: "POST", headers: { "x-llproxy-admin": "1" } });
    if (!r.ok) throw new Error((await r.text()) || r.statusText);
  } catch (e) { document.getElementById("error").textContent = "unload: " + e.message; }
  button.disabled = false;
}
function render(state) {
  const main = document.getElementById("routes");
  const sections = [];
  for (const rt of state.routes) {
    const s = $("section", { class: "route", "data-route": rt.name }, $("h2", { text: "/" + rt.name + "/" }));
    const t = $("table", {}, $("tr", {},
      ...["model", "queue", "by client", "wait for a newcomer", "batch", "requests", "tokens", "in flight", "upstream", "last 5 minutes"].map(h => $("th", { text: h }))));
    for (const m of rt.models) {
      const clients = Object.entries(m.byClient).map(([c, n]) => `${c} ${n}`).join(", ");
      const waitClass = m.maxQueueWait > 0 && m.predictedWait > 0.8 * m.maxQueueWait ? "warn num" : "num";
      t.append($("tr", { "data-model": m.model },
        $("td", { text: m.model }),
        $("td", { class: "num depth", text: String(m.depth) }),
        $("td", { class: "small", text: clients || "–" }),
        $("td", { class: waitClass, text: `${secs(m.predictedWait)} / ${secs(m.maxQueueWait)}` }),
        $("td", { class: "small batch", text: batchText(m) }),
        $("td", {}, bar(m.requests.remaining, m.requests.limit)),
        $("td", {}, tokenBars(m)),
        $("td", { class: "num", text: String(m.inFlight) }),
        $("td", { class: "num", text: m.latencyMs ? m.latencyMs.toFixed(0) + " ms" : "–" }),
        $("td", {}, chart(m.admitted, m.rejected))));
    }
    s.append(t);
    if (rt.backends && rt.backends.length) {
      const bt = $("table", {}, $("tr", {}, ...["backend", "url", "health", "in flight", "state", "idle", "models", ""].map(h => $("th", { text: h }))));
      for (const b of rt.backends) {
        let action = null;
        if (b.managed && b.state !== "stopped" && b.models.length) {
          action = $("button", { text: "Unload", "data-unload": b.name });
          action.addEventListener("click", () => unload(b.models[0], action));
        }
        bt.append($("tr", { "data-backend": b.name },
          $("td", { text: b.name }), $("td", { class: "small", text: b.url }),
          $("td", { class: b.healthy ? "ok" : "bad", text: b.healthy ? "healthy" : "down" }),
          $("td", { class: "num", text: String(b.inFlight) }),
          $("td", { class: "state", text: b.managed ? b.state : "–" }),
          $("td", { class: "small", text: b.idleFor || "–" }),
          $("td", { class: "small", text: b.models.join(", ") }),
          $("td", {}, action)));
      }
      s.append($("h2", { text: "backends" }), bt);
    }
    sections.push(s);
  }
  main.replaceChildren(...sections);
  document.getElementById("updated").textContent = "updated " + new Date(state.time).toLocaleTimeString();
}
// money is a dollar amount as the spend view shows it: whole cents when
// it is a dollar or more (or whole cents anyway), to a hundredth of a cent below.
const money = v => "$" + (v >= 1000 ? v.toFixed(0) : v >= 1 || Number.isInteger(Math.round(v * 1e6) / 1e4) ? v.toFixed(2) : v.toFixed(4));
// spent draws a client's spend in a period against its budget (if any):
// a bar of the budget used, the amount, and what is left.
function spent(amount, budget, left) {
  const a = Number(amount);
  if (budget === undefined) return $("span", { class: "num", text: money(a) });
  const b = Number(budget);
  const used = $("span", { class: "bar", title: `${money(a)} of ${money(b)} spent` }, $("span"));
  used.firstChild.style.width = Math.min(100, b > 0 ? 100 * a / b : 100) + "%";
  return $("span", {}, used,
    $("span", { class: Number(left) > 0 ? "num" : "num over", text: ` ${money(a)} of ${money(b)}` }));
}
// dayChart draws a client's spend per day of the month, a bar a day.
function dayChart(month, days) {
  const [y, m] = month.split("-").map(Number);
  const n = new Date(Date.UTC(y, m, 0)).getUTCDate();
  const perDay = new Array(n).fill(0);
  for (const d of days) perDay[Number(d.day.slice(8, 10)) - 1] += Number(d.costUsd);
  const c = $("canvas", { width: 300, height: 48, "data-days": String(days.length),
    title: "spend per day this month: " + perDay.map((v, i) => v ? `${i + 1}: ${money(v)}` : "").filter(Boolean).join(", ") });
  const g = c.getContext("2d"), max = Math.max(...perDay), w = c.width / n;
  g.fillStyle = "#4c7bd9";
  perDay.forEach((v, i) => {
    if (!v) return;
    const h = Math.max(1, v / max * (c.height - 4));
    g.fillRect(i * w + 1, c.height - h, Math.max(1, w - 2), h);
  });
  return c;
}
// renderSpend draws the spend view: per client, today and this month
// against its budget, in flight, and a chart per day.
function renderSpend(v) {
  const s = document.getElementById("spend");
  s.hidden = !v.clients.length;
  const t = $("table", {}, $("tr", {},
    ...["client", "today (UTC)", "this month", "reserved in flight", "per day this month"].map(h => $("th", { text: h }))));
  for (const c of v.clients) {
    t.append($("tr", { "data-client": c.name },
      $("td", { text: c.name }),
      $("td", { class: "today", "data-usd": c.todayUsd }, spent(c.todayUsd, c.usdPerDay, c.leftTodayUsd)),
      $("td", { class: "month", "data-usd": c.monthUsd }, spent(c.monthUsd, c.usdPerMonth, c.leftMonthUsd)),
      $("td", { class: "num reserved", text: money(Number(c.reservedUsd)) }),
      $("td", {}, v.days ? dayChart(v.month, v.days.filter(d => d.client === c.name)) : $("span", { class: "small", text: "no usage ledger" }))));
  }
  s.replaceChildren($("h2", { text: "spend, " + v.month }), t);
  if (v.error) s.append($("p", { class: "bad small", text: v.error }));
}
let spendDue = 0;
async function tickSpend() {
  if (Date.now() < spendDue) return;
  spendDue = Date.now() + 5000; // the ledger's sums, every five seconds
  const r = await fetch("/ui/spend", { cache: "no-store" });
  if (!r.ok) throw new Error(r.status + " " + r.statusText);
  renderSpend(await r.json());
}
async function tick() {
  try {
    const r = await fetch("/ui/state", { cache: "no-store" });
    if (!r.ok) throw new Error(r.status + " " + r.statusText);
    render(await r.json());
    await tickSpend();
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "cannot reach llproxy: " + e.message;
  }
  setTimeout(tick, 1000);
}
tick();
