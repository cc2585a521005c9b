// The dashboard (/account): the apps this browser connected, their budget, last calls,
// change cap, revoke. Keyed by the presence cookie; no account system.
import { activationGuard, api, el, fmtTime, fmtUsd, initials } from "/static/ui.js";

const list = document.getElementById("list");
const notes = new Map();  // connection id → a warning that outlives the list's reload
const host = (origin) => (origin || "").replace(/^https?:\/\//, "");

// Any page can open this one and place clicks where its buttons appear (a double-click on
// Revoke would confirm it): they take clicks only after the page has been seen (ui.js).
const guard = activationGuard(800, (active) => {
  for (const b of list.querySelectorAll("button[data-guarded]")) b.disabled = !active;
});

async function load() {
  let data;
  try {
    data = await api("GET", "/api/v1/account");
  } catch (e) {
    list.replaceChildren(el("div", { class: "alert error" }, e.message));
    return;
  }
  if (!data.connections.length) {
    list.replaceChildren(el("div", { class: "empty" },
      el("p", {}, el("strong", {}, "No connected apps in this browser.")),
      el("p", {}, "When you approve an app's request for an AI budget, it shows up here.")));
    return;
  }
  list.replaceChildren(...data.connections.map(card));
  guard.rearm();
}

function budget(status) {
  const cap = status.limits ? status.limits.monthlyUsd : null;
  const spent = status.usage.monthlyUsd;
  const pct = cap ? Math.min(100, (spent / cap) * 100) : 0;
  const bar = el("div", { class: "bar" + (pct >= 80 ? " high" : ""), role: "progressbar",
    "aria-valuemin": 0, "aria-valuemax": cap ?? 0, "aria-valuenow": spent,
    "aria-label": "Spent this month" }, el("span", { style: `width:${pct.toFixed(2)}%` }));
  return el("div", { class: "budget" },
    el("div", { class: "budget-numbers" },
      el("span", {}, el("strong", { class: "spent" }, fmtUsd(spent)), " spent this month"),
      el("span", { class: "cap" }, cap == null ? "no cap" : `of ${fmtUsd(cap)} cap`)),
    bar);
}

function calls(rows) {
  if (!rows.length) return el("p", { class: "hint" }, "No calls yet.");
  return el("table", { class: "calls" },
    el("thead", {}, el("tr", {}, el("th", {}, "Time"), el("th", {}, "Model"),
      el("th", { class: "num" }, "Cost"))),
    el("tbody", {}, ...rows.map((c) => el("tr", {},
      el("td", {}, fmtTime(c.at)),
      el("td", {}, el("code", {}, c.model)),
      el("td", { class: "num" }, fmtUsd(c.costUsd) + (c.provisional ? " (est.)" : ""))))));
}

function card(conn) {
  const active = conn.state === "active";
  const label = { active: "Connected", revoked: "Revoked", needs_reconnect: "Needs a new key" }[conn.state] || conn.state;
  const message = el("div", { class: "alert", role: "status", hidden: true });
  const capInput = el("input", { type: "number", min: "0", step: "0.01", "aria-label": `Monthly cap for ${conn.app.name}`,
    value: conn.status.limits && conn.status.limits.monthlyUsd != null ? conn.status.limits.monthlyUsd : "" });
  const say = (kind, text) => { message.className = "alert " + kind; message.textContent = text; message.hidden = false; };

  const save = el("button", { class: "btn secondary small", type: "button", "data-guarded": true, onclick: async () => {
    if (!guard.active) return;
    const value = Number(capInput.value);
    if (capInput.value.trim() === "" || !Number.isFinite(value) || value < 0) {
      say("error", "Enter a cap in dollars."); return;
    }
    save.disabled = true;
    try {
      const cap = Math.round(value * 100) / 100;
      const saved = await api("POST", `/api/v1/account/connections/${conn.id}`, { body: { monthlyUsd: cap } });
      // This gateway cannot change a key's own limit at OpenRouter: say when it is below the cap.
      const own = saved.keyLimit && saved.keyLimit.limitUsd;
      if (own != null && own < cap) {
        notes.set(conn.id, `OpenRouter itself limits this key to ${fmtUsd(own)}` +
          (saved.keyLimit.reset ? ` (${saved.keyLimit.reset})` : " in total") + ": calls past it are " +
          "refused. Raise the key's limit on OpenRouter's keys page (openrouter.ai/settings/keys), " +
          `or reconnect from ${conn.app.name} with Connect with OpenRouter.`);
      } else {
        notes.delete(conn.id);
      }
      await load();
    } catch (e) { say("error", e.message); save.disabled = false; }
  } }, "Save cap");

  const revoke = el("button", { class: "btn danger small", type: "button", "data-guarded": true }, "Revoke");
  const cancel = el("button", { class: "btn secondary small", type: "button", hidden: true }, "Keep");
  revoke.addEventListener("click", async () => {
    if (!guard.active) return;
    if (!revoke.classList.contains("confirm")) {
      revoke.classList.add("confirm");
      revoke.textContent = `Revoke ${conn.app.name}'s access`;
      cancel.hidden = false;
      guard.rearm(); // the confirmation takes no click that was meant for the first step
      return;
    }
    revoke.disabled = true;
    try {
      await api("DELETE", `/api/v1/account/connections/${conn.id}`);
      await load();
    } catch (e) { say("error", e.message); revoke.disabled = false; }
  });
  cancel.addEventListener("click", () => {
    revoke.classList.remove("confirm"); revoke.textContent = "Revoke"; cancel.hidden = true;
  });

  if (active && notes.has(conn.id)) say("warn", notes.get(conn.id));

  const actions = active
    ? el("div", { class: "conn-actions" },
      el("div", { class: "money-input" }, el("span", {}, "$"), capInput, el("span", { class: "suffix" }, "/ month")),
      save, el("span", { class: "spacer" }), cancel, revoke)
    : el("p", { class: "hint" }, "This app can no longer spend. Connect again from the app to restore access.");

  return el("article", { class: "conn " + conn.state, "data-connection": conn.id },
    el("div", { class: "conn-head" },
      el("div", { class: "avatar", "aria-hidden": "true" }, initials(conn.app.name)),
      el("div", { class: "conn-title" },
        el("h2", {}, conn.app.name),
        el("p", { class: "origin" }, host(conn.app.origin))),
      el("span", { class: "badge " + conn.state }, label)),
    active ? budget(conn.status) : null,
    actions,
    active && conn.app.maxCapUsd != null
      ? el("p", { class: "hint max-cap" }, `${conn.app.name} allows a cap of at most ${fmtUsd(conn.app.maxCapUsd)} a month.`)
      : null,
    message,
    calls(conn.calls));
}

load();
document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); });
