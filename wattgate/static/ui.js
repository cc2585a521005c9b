// Small helpers shared by the consent popup and the dashboard (same-origin pages only).

/**
 * Format dollars for people, as the server's money.format_usd does: $0.50 (never $0.5),
 * $1,234.56, and below a dollar the two significant digits that matter ($0.039, $0.0042).
 * @param {number|null|undefined} usd
 */
export function fmtUsd(usd) {
  if (usd === null || usd === undefined) return "unlimited";
  const amount = Math.abs(usd);
  let places = 2;
  if (amount > 0 && amount < 1) {
    places = Math.min(9, Math.max(2, 1 - Math.floor(Math.log10(amount))));
  }
  const [whole, decimals] = amount.toFixed(places).split(".");
  const cents = decimals.replace(/0+$/, "").padEnd(2, "0");
  return (usd < 0 ? "-$" : "$") + whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + "." + cents;
}

/** Create an element: el("p", {class: "x"}, "text", child). Text is never parsed as HTML. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "style") node.style.cssText = v; // CSSOM: allowed under the pages' CSP
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

export function initials(name) {
  const words = String(name).split(/[^\p{L}\p{N}]+/u).filter(Boolean);
  return (words.slice(0, 2).map((w) => w[0]).join("") || "?").toUpperCase();
}

export class ApiError extends Error {
  constructor(code, message, status) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

/** Call the gateway's JSON API from its own pages (the presence cookie rides along). */
export async function api(method, path, { token, body } = {}) {
  // Proves a same-origin call where the browser sends no Sec-Fetch-Site (plain http at a
  // hostname other than localhost): no other origin may send this header (CORS preflight).
  const headers = { "X-Wattgate-Page": "1" };
  if (token) headers.Authorization = "Bearer " + token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, {
      method, headers, credentials: "same-origin", cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError("network", "The gateway could not be reached. Check your connection.", 0);
  }
  if (res.status === 204) return null;
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) {
    const err = (data && data.error) || {};
    throw new ApiError(err.code || "internal", friendly(err.code, err.message), res.status);
  }
  return data;
}

const FRIENDLY = {
  funding_invalid: "OpenRouter refused this key. Check that it is correct and has credits.",
  upstream: "OpenRouter could not be reached to check the key. Try again in a moment.",
  consent_required: "This change needs a funding key.",
  rate_limited: "Too many attempts. Wait a moment and try again.",
};

function friendly(code, message) {
  if (code === "auth" && /expired/i.test(message || "")) {
    return "This request has expired. Close this window and start again from the app.";
  }
  return FRIENDLY[code] || message || "Something went wrong.";
}

export function fmtTime(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

/**
 * The permission-prompt rule: a page that opened this one (or any page that can open it)
 * can place a click, or the second half of a double-click, where a button is about to
 * appear. So a guarded button takes clicks only once this page has been visible and
 * focused for `ms`; hiding it, leaving it, or calling `rearm()` (the button's meaning
 * changed) starts the wait again. `onChange(active)` follows every change.
 * @param {number} ms @param {(active: boolean) => void} onChange
 */
export function activationGuard(ms, onChange) {
  let timer = null;
  let active = false;
  const set = (value) => { active = value; onChange(value); };
  const shown = () => document.visibilityState === "visible" && document.hasFocus();
  const rearm = () => {
    clearTimeout(timer);
    set(false);
    if (shown()) timer = setTimeout(() => { if (shown()) set(true); }, ms);
  };
  document.addEventListener("visibilitychange", rearm);
  window.addEventListener("focus", rearm);
  window.addEventListener("blur", rearm);
  return { rearm, get active() { return active; } };
}
