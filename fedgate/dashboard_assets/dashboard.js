// The fleet, live: polls api/fleet (fedgate.fleetview's object) every 2 s and redraws.
// Shows what `fedgate status` prints - tasks, gateways - plus each task's history as charts.
// <html data-api="ok|error" data-renders="N"> tell a test (and devtools) how polling goes.

import { h, isNumber, num, version, clock, ago, counts, metrics } from "./dom.js";
import { lineChart } from "./charts.js";

const POLL_MS = 2000;
const TIMEOUT_MS = 8000;
const WARN_ACTIVITIES = new Set(["waiting_for_data", "sitting_out"]);
const BAD_ACTIVITIES = new Set(["incompatible"]);
const PHASE_CLASS = { collecting: "ok", statistics: "info", waiting: "warn", finished: "muted" };

const root = document.documentElement;
let lastView = null;
let renders = 0;

const list = (items) => (Array.isArray(items) ? items : []);
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
// "a, b, c and 12 more": a fleet of hundreds must not push the charts off the screen
const names = (items, shown = 12) => {
  const all = list(items);
  return all.slice(0, shown).join(", ") + (all.length > shown ? ` and ${all.length - shown} more` : "");
};
const chip = (text, cls) => h("span", { class: "chip " + (cls || "") }, text);

async function fetchFleet() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const response = await fetch("api/fleet", { cache: "no-store", signal: abort.signal });
    if (!response.ok) throw new Error(`HTTP ${response.status} ${response.statusText}`.trim());
    return await response.json();
  } finally {
    clearTimeout(timer);
  }
}

function describe(failure) {
  if (failure && failure.name === "AbortError") return `no answer within ${TIMEOUT_MS / 1000} s`;
  return failure && failure.message ? failure.message : String(failure);
}

function showBanner(view, failure) {
  const banner = document.getElementById("banner");
  let text = "";
  let cls = "";
  if (failure) {
    cls = "bad";
    text = `Cannot reach the dashboard server (api/fleet): ${describe(failure)}. ` +
      (view ? `Showing the fleet as of ${clock(view.time, view.time)}; ` : "") + "retrying every 2 s.";
  } else if (view && view.dashboard && view.dashboard.connected === false) {
    cls = "warn";
    text = `Lost the connection to the broker ${view.dashboard.broker}: what is shown may be stale.`;
  }
  banner.hidden = !text;
  banner.className = "banner " + cls;
  banner.textContent = text;
}

function fact(key, label, value, cls) {
  return h("div", { class: "fact " + (cls || ""), "data-fact": key }, h("dt", {}, label), h("dd", {}, value));
}

function taskFacts(t, now) {
  const metric = t.metric || {};
  const better = metric.higher_is_better ? "higher is better" : "lower is better";
  const planned = isNumber(t.rounds_planned) && t.rounds_planned > 0 ? ` of ${t.rounds_planned}` : "";
  const online = list(t.online);
  const facts = [
    fact("lineage", "lineage", t.lineage || "\u2013"),
    fact("round", "round", (isNumber(t.round) ? String(t.round) : "\u2013") + planned),
    fact("model", "model", version(t.model_version)),
    fact("deployed", "deployed", version(t.deployed_version) + (t.deployment_mode ? ` (${t.deployment_mode})` : "")),
    fact("metric", `fleet ${metric.name || "metric"}`, `${num(metric.value)} (${better})`),
    fact("online", "online", `${online.length}` + (online.length ? `: ${names(online)}` : "")),
  ];
  if (t.waiting_for) facts.push(fact("waiting", "waiting for", t.waiting_for, "warn"));
  if (isNumber(t.next_round_at)) facts.push(fact("next", "next round", clock(t.next_round_at, now)));
  if (isNumber(t.candidate) && t.candidate >= 0) {
    facts.push(fact("canary", "canary", `candidate ${version(t.candidate)} on ${names(t.canary) || "\u2013"}`, "warn"));
  }
  if (list(t.quarantined).length) facts.push(fact("quarantined", "quarantined", names(t.quarantined, 40), "bad"));
  if (list(t.budget_spent).length) facts.push(fact("budget", "privacy budget spent", names(t.budget_spent), "warn"));
  const rejected = counts(t.rejected);
  facts.push(fact("rejected", "rejected", rejected || "none", rejected ? "warn" : ""));
  const alerts = list(t.last_round && t.last_round.alerts);
  if (alerts.length) facts.push(fact("alerts", "last round alerts", alerts.join("; "), "bad"));
  if (t.deployment) {
    const d = t.deployment;
    facts.push(fact("deployment", "deployment", `#${d.sequence} ${d.mode} ${version(d.version)}` + (d.reason ? ` \u2013 ${d.reason}` : "")));
  }
  facts.push(fact("updated", "state from", clock(t.updated_at, now)));
  return facts;
}

function taskCharts(t) {
  const history = list(t.history);
  const metric = t.metric || {};
  const series = (key) => history.map((p) => ({ x: p.round, y: p[key] }));
  return h("div", { class: "charts" },
    lineChart({ id: "metric", title: `fleet ${metric.name || "metric"}`,
      note: metric.higher_is_better ? "(higher is better)" : "(lower is better)", rows: series("metric") }),
    lineChart({ id: "participants", title: "participants", note: "per round", rows: series("participants"), counts: true }),
    lineChart({ id: "rows", title: "training rows", note: "per round", rows: series("rows"), counts: true }));
}

function task(t, now) {
  const heading = h("h2", {}, "task ", h("span", { class: "name" }, t.task), " ",
    t.phase ? chip(t.phase, PHASE_CLASS[t.phase]) : null);
  const card = h("section", { class: "card task", "data-task": t.task }, heading);
  if (t.phase === undefined) {
    card.append(h("p", { class: "empty warn" }, "No task state published yet for this task (is the aggregator running?)"));
  } else {
    card.append(h("dl", { class: "facts" }, taskFacts(t, now)));
  }
  card.append(taskCharts(t));
  return card;
}

function activity(g) {
  const name = g.activity || "";
  const cls = BAD_ACTIVITIES.has(name) ? "bad" : WARN_ACTIVITIES.has(name) ? "warn" : "";
  const refused = counts(g.rejected);
  return [
    name ? chip(name, cls) : "\u2013",
    g.activity_detail ? h("span", { class: "detail" }, ": " + g.activity_detail) : null,
    refused ? h("div", { class: "muted small" }, "refused: " + refused) : null,
  ];
}

function rowClass(g) {
  if (!g.online || g.quarantined || BAD_ACTIVITIES.has(g.activity)) return "bad";
  if (WARN_ACTIVITIES.has(g.activity) || g.budget_spent) return "warn";
  return "";
}

function gatewayRow(g, now, showTask) {
  const since = ago(g.since, now);
  return h("tr", { class: rowClass(g), "data-gateway": g.id, "data-state": g.online ? "online" : "offline" },
    h("th", { scope: "row", class: "id", title: g.software || null }, g.id),
    showTask ? h("td", {}, g.task) : null,
    h("td", { "data-col": "state" }, g.online ? chip("online", "ok") : chip("OFFLINE", "bad")),
    h("td", { "data-col": "since" }, clock(g.since, now), since ? h("span", { class: "muted" }, ` (${since} ago)`) : null),
    h("td", { class: "num", "data-col": "runs" }, version(g.model_version)),
    h("td", { class: "num", "data-col": "trains" }, version(g.trained_version)),
    h("td", { "data-col": "activity" }, activity(g)),
    h("td", { class: "num", "data-col": "rows" }, num(g.rows)),
    h("td", { class: "num", "data-col": "new" }, num(g.rows_new)),
    h("td", { class: "num", "data-col": "round" }, isNumber(g.last_round) && g.last_round >= 0 ? String(g.last_round) : "\u2013"),
    h("td", { "data-col": "holdout" }, metrics(g.last_eval)),
    h("td", { "data-col": "quarantined" }, g.quarantined ? chip("QUARANTINED", "bad") : "no"),
    h("td", { class: "num", "data-col": "epsilon" }, num(g.epsilon, 3), g.budget_spent ? chip("spent", "warn") : null));
}

function gateways(view) {
  const all = list(view.gateways);
  const section = h("section", { class: "card gateways" }, h("h2", {}, "gateways"));
  if (!all.length) {
    section.append(h("p", { class: "empty warn" }, "No gateway has reported on this fleet yet."));
    return section;
  }
  const showTask = new Set(all.map((g) => g.task)).size > 1;
  const columns = ["gateway", showTask ? "task" : null, "state", "since", "runs", "trains", "activity",
    "rows", "new", "last round", "holdout", "quarantined", "\u03b5"].filter(Boolean);
  section.append(h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, all.map((g) => gatewayRow(g, view.time, showTask))))));
  return section;
}

function summary(view) {
  const all = list(view.gateways);
  const offline = all.filter((g) => !g.online).length;
  const waiting = all.filter((g) => g.activity === "waiting_for_data").length;
  const quarantined = all.filter((g) => g.quarantined).length;
  return h("section", { class: "summary", "data-problems": offline + quarantined },
    chip(plural(all.length, "gateway"), ""),
    chip(`${all.length - offline} online`, "ok"),
    offline ? chip(`${offline} OFFLINE`, "bad") : null,
    waiting ? chip(`${waiting} waiting for data`, "warn") : null,
    quarantined ? chip(`${quarantined} quarantined`, "bad") : null,
    chip(plural(list(view.tasks).length, "task"), ""));
}

function refused(view) {
  const text = counts(view.rejected);
  return text ? h("p", { class: "banner warn" }, "Messages this dashboard could not decode or verify: " + text) : null;
}

function render(view, failure) {
  renders += 1;
  root.setAttribute("data-renders", String(renders));
  root.setAttribute("data-api", failure ? "error" : "ok");
  showBanner(view, failure);
  if (!view) return;
  const tasks = list(view.tasks);
  document.getElementById("fleet-name").textContent = `fleet ${view.fleet}`;
  document.getElementById("source").textContent =
    `from ${view.dashboard ? view.dashboard.broker : "?"} \u00b7 as of ${clock(view.time, view.time)}`;
  const main = document.getElementById("main");
  main.replaceChildren(
    summary(view),
    ...(tasks.length ? tasks.map((t) => task(t, view.time))
      : [h("section", { class: "card" }, h("p", { class: "empty warn" }, "No task state published yet (is the aggregator running?)"))]),
    gateways(view),
    refused(view) || "");
  const problems = list(view.gateways).filter((g) => !g.online || g.quarantined).length;
  document.title = (failure ? "\u26a0 no data \u00b7 " : problems ? `\u26a0 ${problems} \u00b7 ` : "") + `fedgate ${view.fleet}`;
}

async function poll() {
  let view = null;
  let failure = null;
  try {
    view = await fetchFleet();
  } catch (error) {
    failure = error;
  }
  try {
    if (view) lastView = view;
    render(view || lastView, failure);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
