// The consent popup (/connect and /grant): origin handshake, funding source, approve or deny.
//
// The handshake (concepts.md, "The consent popup"): this window asks its opener who it
// is; the app's SDK answers with the session token. The browser stamps that answer with
// the opener's real origin (event.origin), which must be one of the app's registered
// origins before Approve is enabled; the result is posted back only to that origin.
import { activationGuard, api, fmtUsd } from "/static/ui.js";

const data = JSON.parse(document.getElementById("wg-data").textContent);
const $ = (id) => document.getElementById(id);
const flow = data.flow;
const app = data.app;
const policy = app.policy || {};
const maxCap = policy.maxCapUsd ?? null;  // the largest monthly cap the app allows
const withinMax = (usd) => (usd == null || maxCap == null || usd <= maxCap ? usd : maxCap);

let token = null;         // the session token: from the fragment or the handshake, never a query
let openerOrigin = null;  // the verified origin of the page that opened this window
let context = null;       // what the gateway says about this session (GET /consent/session)
let oauthKey = null;      // a key obtained through "Connect with OpenRouter"
let pkce = null;
let answered = false;     // the opener answered the hello (verified or not): ask no more
let finished = false;

for (const node of document.querySelectorAll("[data-flow-only]")) {
  node.hidden = node.dataset.flowOnly !== flow;
}
if (flow === "grant") {
  $("grant-requests").textContent = String(data.grant.requests);
  $("grant-requests").nextElementSibling.textContent =
    data.grant.requests === 1 ? "AI request, one time" : "AI requests, one time";
  $("grant-max").textContent = data.grant.maxUsd == null ? "no limit" : fmtUsd(data.grant.maxUsd);
}

// A token may ride in the fragment (never sent to a server); drop it from the address bar.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) token = fragment.get("token");
if (location.hash) history.replaceState(null, "", location.pathname + location.search);

const host = (origin) => origin.replace(/^https?:\/\//, "");

function setOrigin(state, text) {
  $("origin-dot").className = "dot " + state;
  $("origin-text").textContent = text;
}

// Approve accepts no click the user had no time to mean (ui.activationGuard): armed once
// this window has been visible and focused for ARM_MS after Approve became possible, and
// again after every change of the funding choice.
const ARM_MS = 800;
let approvable = false;  // Approve would be enabled (ready, not blocked, not in flight)
const guard = activationGuard(ARM_MS, () => { $("approve").disabled = !(approvable && guard.active); });

function setApprovable(on) {
  approvable = on;
  guard.rearm();
}

function block(message) {
  setOrigin("bad", $("origin-text").textContent.startsWith("Checking")
    ? "Could not verify who is asking" : $("origin-text").textContent);
  $("blocked").textContent = message;
  $("blocked").hidden = false;
  document.body.classList.add("blocked");
  $("deny").textContent = "Close";
  setApprovable(false);
  for (const input of document.querySelectorAll("#consent-form input")) input.disabled = true;
  $("oauth").disabled = true;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function send(message) {
  // Only ever to the verified origin: a page elsewhere that opened this window hears nothing.
  if (window.opener && openerOrigin) {
    window.opener.postMessage({ wattgate: 1, flow, ...message }, openerOrigin);
  }
}

function hello() {
  let tries = 0;
  const ping = () => {
    if (answered || !window.opener || tries++ > 40) return;
    // Nothing secret in a hello: any page may hear it, only a registered one can be trusted.
    window.opener.postMessage({ wattgate: 1, type: "hello", flow }, "*");
    setTimeout(ping, 250);
  };
  ping();
  setTimeout(() => {
    if (!answered && !finished) {
      block(`The page that opened this window did not identify itself. Close this window and start again from ${app.name}.`);
    }
  }, 12000);
}

let onFreshToken = null;  // set while waiting for the opener to send a new token

window.addEventListener("message", (event) => {
  if (event.source !== window.opener) return;
  const msg = event.data;
  if (!msg || msg.wattgate !== 1 || msg.type !== "session") return;
  if (answered) {
    // Only a verified opener may hand over a fresh token, and only when asked to.
    if (onFreshToken && openerOrigin && event.origin === openerOrigin && typeof msg.token === "string") {
      onFreshToken(msg.token);
    }
    return;
  }
  answered = true;
  openerOrigin = event.origin; // set by the browser, not by the sender
  if (typeof msg.token === "string" && msg.token) token = msg.token;
  verify();
});

async function verify() {
  if (!app.origins.includes(openerOrigin)) {
    setOrigin("bad", `Requested by ${host(openerOrigin)}`);
    const allowed = app.origins.map(host).join(", ") || "no site";
    block(`${host(openerOrigin)} is not a site of ${app.name} (registered: ${allowed}). ` +
      "For your safety this request cannot be approved.");
    openerOrigin = null; // never answer it
    return;
  }
  if (!token) {
    block(`${app.name} did not send a session. Close this window and try again.`);
    return;
  }
  try {
    context = await api("GET", `/api/v1/consent/session?pk=${encodeURIComponent(data.pk)}`, { token });
  } catch (e) {
    block(e.message);
    return;
  }
  setOrigin("ok", `Requested by ${host(openerOrigin)} · verified`);
  ready();
}

function ready() {
  const status = context.status;
  const returning = context.returning;
  if (flow === "connect") {
    const requested = context.requestedLimit ? context.requestedLimit.monthlyUsd : null;
    const current = status.connected && status.limits ? status.limits.monthlyUsd : null;
    // The app's own policy: its largest cap bounds the choice, its suggestion comes first
    // when the app asked for nothing (the gateway enforces the bound whatever is sent).
    const cap = current ?? withinMax(requested) ?? policy.suggestedCapUsd;
    $("cap").value = cap == null ? "" : String(cap);
    if (maxCap != null) $("cap").max = String(maxCap);
    $("cap").disabled = false;
    const parts = [];
    if (requested != null) parts.push(`${app.name} asked for ${fmtUsd(requested)} a month.`);
    if (maxCap != null) {
      parts.push(`Choose any amount up to ${fmtUsd(maxCap)}, the most ${app.name} allows; ` +
        "the app can never spend more in a calendar month.");
    } else {
      parts.push("You can choose any amount; the app can never spend more in a calendar month.");
    }
    $("cap-hint").textContent = parts.join(" ");
    if (returning) {
      $("returning").hidden = false;
      $("spent-now").textContent = fmtUsd(status.usage.monthlyUsd);
      $("cap-now").textContent = fmtUsd(current);
      $("approve").textContent = "Update cap";
    } else if (status.connected) {
      // Approved in another browser: only the key proves it is the same person here.
      $("returning").hidden = false;
      $("returning").querySelector(".note").textContent =
        `${app.name} is already connected from another browser. Enter your key to approve changes here.`;
    }
  }
  if (flow === "grant" && maxCap != null && (data.grant.maxUsd == null || data.grant.maxUsd > maxCap)) {
    block(`${app.name} asked for a grant ${data.grant.maxUsd == null ? "with no dollar cap" :
      "of " + fmtUsd(data.grant.maxUsd)}, beyond its own limit of ${fmtUsd(maxCap)}. ` +
      "This request cannot be approved.");
    return;
  }
  if (returning) {
    // Spending from the existing budget is a choice the user makes, never a default.
    $("use-existing-choice").hidden = false;
    $("use-new-choice").hidden = false;
    $("existing-hint").textContent = flow === "grant"
      ? `Paid from your ${app.name} budget; counts toward its monthly cap.`
      : "Keeps the key you connected before.";
    for (const r of document.querySelectorAll("input[name=source]")) {
      r.addEventListener("change", () => { syncSource(); guard.rearm(); });
    }
  }
  syncSource();
  $("key").disabled = false;
  if (data.oauth.authBase && !crypto.subtle) {
    // Plain http at a hostname other than localhost: no Web Crypto, so no PKCE challenge.
    $("oauth-insecure").hidden = false;
  } else if (data.oauth.authBase) {
    $("oauth").hidden = false;
    $("oauth").disabled = false;
    $("oauth-hint").hidden = flow !== "connect";
    $("or-divider").hidden = false;
    preparePkce();
  }
  setApprovable(true);
  (flow === "connect" ? $("cap") : returning ? $("use-existing") : $("key")).focus();
}

function syncSource() {
  // A returning user sees the key field only once they chose "Another OpenRouter key".
  $("new-source").hidden = Boolean(context && context.returning && !$("use-new").checked);
}

// ---- Connect with OpenRouter (OAuth PKCE) -------------------------------------------
const b64url = (bytes) => btoa(String.fromCharCode(...bytes))
  .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");

async function preparePkce() {
  // Made ahead of the click, so the sign-in window opens inside the gesture.
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const nonce = b64url(crypto.getRandomValues(new Uint8Array(12)));
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  pkce = { verifier, nonce, challenge: b64url(new Uint8Array(digest)) };
}

const channel = new BroadcastChannel("wattgate-oauth");
channel.addEventListener("message", async (event) => {
  const msg = event.data || {};
  if (!pkce || msg.nonce !== pkce.nonce || typeof msg.code !== "string") return;
  const verifier = pkce.verifier;
  preparePkce();
  $("oauth").disabled = true;
  $("oauth").textContent = "Connecting…";
  try {
    const { key, keyLimit } = await api("POST", "/api/v1/consent/oauth", { body: { code: msg.code, codeVerifier: verifier } });
    oauthKey = key;
    $("oauth").hidden = true;
    $("oauth-hint").hidden = true;
    $("or-divider").hidden = true;
    $("key").hidden = true;
    $("key-advice").hidden = true;
    $("oauth-done").hidden = false;
    describeKeyLimit(keyLimit);
    showError("");
    $("approve").focus();
  } catch (e) {
    $("oauth").disabled = false;
    $("oauth").textContent = "Connect with OpenRouter";
    showError(e.message);
  }
});

/** The monthly cap typed in the connect flow, in dollars (cents kept), or null if not a cap. */
function capUsd() {
  const raw = $("cap").value.trim();
  const cap = Number(raw);
  return raw === "" || !Number.isFinite(cap) || cap < 0 ? null : Math.round(cap * 100) / 100;
}

let oauthLimitUsd = null;  // the monthly limit the key was asked for (connect flow)

/** Say what the key OpenRouter made can spend on its own, as OpenRouter reports it. */
function describeKeyLimit(keyLimit) {
  const note = $("oauth-limit");
  const asked = keyLimit && oauthLimitUsd != null && keyLimit.limitUsd === oauthLimitUsd;
  if (asked && flow === "grant" && keyLimit.reset == null) {
    note.textContent = `OpenRouter itself also stops this key at ${fmtUsd(keyLimit.limitUsd)} in ` +
      "total, the most this grant may spend.";
  } else if (asked && keyLimit.reset === "monthly") {
    // The cap is now the key's own limit too: changing one here would not change the other.
    $("cap").disabled = true;
    note.textContent = `OpenRouter itself also stops this key at ${fmtUsd(keyLimit.limitUsd)} a ` +
      "month, even if this gateway failed. To change the cap later, connect with OpenRouter again.";
  } else if (keyLimit && keyLimit.limitUsd != null) {
    note.textContent = `OpenRouter limits this key to ${fmtUsd(keyLimit.limitUsd)}` +
      (keyLimit.reset ? ` (${keyLimit.reset})` : " in total") + "; your cap here applies too.";
  } else {
    note.textContent = "OpenRouter set no spending limit on this key: only the cap here protects " +
      "your balance. You can set one on OpenRouter's keys page.";
  }
  note.hidden = false;
}

$("oauth").addEventListener("click", () => {
  if (!pkce) return;
  const callback = `${data.publicOrigin}/connect/oauth-callback?n=${encodeURIComponent(pkce.nonce)}`;
  // OpenRouter makes the key with its own credit limit (POST /auth/keys/code's limit,
  // usage_limit_type and key_label, which its /auth page takes): the cap, every month.
  // A grant's key (sealed to that grant only) gets the grant's dollar cap, in total.
  let limit = "";
  oauthLimitUsd = null;
  if (flow === "connect") {
    oauthLimitUsd = capUsd();
    if (oauthLimitUsd == null) {
      showError("Choose your monthly cap first: OpenRouter makes your key with that limit.");
      $("cap").focus();
      return;
    }
    limit = `&limit=${oauthLimitUsd}&usage_limit_type=monthly`;
  } else if (data.grant.maxUsd != null) {
    oauthLimitUsd = data.grant.maxUsd;
    limit = `&limit=${oauthLimitUsd}`;
  }
  const url = `${data.oauth.authBase}/auth?callback_url=${encodeURIComponent(callback)}` +
    `&code_challenge=${encodeURIComponent(pkce.challenge)}&code_challenge_method=S256` +
    `${limit}&key_label=${encodeURIComponent(app.name.slice(0, 100))}`;
  const w = window.open(url, "wattgate-oauth", "popup,width=520,height=720");
  if (!w) showError("Your browser blocked the OpenRouter window. Allow popups, or paste a key.");
});

/** The session token outlived the popup (the user took a while): ask the app's page for a new one. */
function freshToken() {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { onFreshToken = null; reject(new Error("no answer")); }, 8000);
    onFreshToken = (fresh) => { clearTimeout(timer); onFreshToken = null; resolve(fresh); };
    window.opener.postMessage({ wattgate: 1, type: "hello", flow, refresh: true }, openerOrigin);
  });
}

async function post(path, body) {
  try {
    return await api("POST", path, { token, body });
  } catch (e) {
    if (e.status !== 401 || !window.opener || !openerOrigin) throw e;
    try { token = await freshToken(); } catch { throw e; }
    return api("POST", path, { token, body });
  }
}

// ---- approve / deny ----------------------------------------------------------------------
$("consent-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!context || !approvable || !guard.active) return;
  showError("");
  if (context.returning && !$("use-existing").checked && !$("use-new").checked) {
    showError("Choose how to pay: your existing budget, or another OpenRouter key.");
    $("use-existing").focus();
    return;
  }
  const useExisting = context.returning && $("use-existing").checked;
  const key = oauthKey || $("key").value.trim();
  if (!useExisting && !key) {
    showError("Paste your OpenRouter key, or use Connect with OpenRouter.");
    $("key").focus();
    return;
  }
  const body = {};
  if (!useExisting) body.fundingKey = key;
  let path;
  if (flow === "connect") {
    const cap = capUsd();
    if (cap == null) {
      showError("Enter a monthly cap in dollars, for example 5.");
      $("cap").focus();
      return;
    }
    const kept = context.status.connected && context.status.limits &&
      context.status.limits.monthlyUsd === cap;
    if (maxCap != null && cap > maxCap && !kept) {
      showError(`${app.name} allows a cap of at most ${fmtUsd(maxCap)} a month.`);
      $("cap").focus();
      return;
    }
    body.monthlyUsd = cap;
    path = "/api/v1/connections";
  } else {
    body.requests = data.grant.requests;
    if (data.grant.maxUsd != null) body.maxUsd = data.grant.maxUsd;
    path = "/api/v1/grants";
  }
  setApprovable(false);
  $("approve").textContent = "Approving…";
  try {
    const result = await post(path, body);
    finished = true;
    send(flow === "connect" ? { type: "result", approved: true, status: result }
      : { type: "result", approved: true, grant: result });
    $("approve").textContent = "Approved ✓";
    setTimeout(() => window.close(), 150);
  } catch (e) {
    showError(e.message);
    setApprovable(true);
    $("approve").textContent = flow === "connect" && context.returning ? "Update cap" : "Approve";
  }
});

$("deny").addEventListener("click", () => {
  finished = true;
  send({ type: "result", approved: false });
  window.close();
});

if (!window.opener) {
  block(`Open this window from ${app.name}: it was not opened by an app.`);
} else {
  hello();
}
