// wattgate browser client SDK (the "wattfare/client" surface). One ES module, no build step,
// no dependencies: served by the gateway at /sdk/client.js and packaged as "./client".
//
//   import { createWattfare } from "https://your-gateway.example/sdk/client.js";
//   const wf = createWattfare({ publishableKey: "pk_live_…", session: "/api/wattfare-token" });
//   connectButton.onclick = async () => { const status = await wf.connect(); … };
//
// connect() and requestGrant() open the consent popup synchronously, so call them straight
// from a click handler with no await before them. Closing the popup is a denial.

/**
 * @typedef {{ connected: boolean, limits: { monthlyUsd: number | null } | null,
 *   usage: { monthlyUsd: number }, remainingUsd: number | null, heldUsd: number }}
 *   ConnectionStatus `heldUsd` (a wattgate extension): held at their worst case by this
 *   month's calls in flight; a new call fits in `remainingUsd - heldUsd`.
 * @typedef {{ grantToken: string, expiresAt: number, requests: number }} GrantResult
 * @typedef {{ token: string, expiresAt: number }} CreatedSession
 * @typedef {string | (() => CreatedSession | Promise<CreatedSession>)} SessionSource
 *   The app's token route (POSTed to, answers `{ token, expiresAt }`), or a function
 *   returning that object.
 * @typedef {object} WattfareClientOptions
 * @property {string} publishableKey `pk_live_…`: names the app to the consent popup.
 * @property {SessionSource} session Where session tokens come from.
 * @property {string} [baseURL] The gateway's URL. Defaults to the origin this module was
 *   loaded from when it is the gateway's `/sdk/client.js`.
 * @property {typeof fetch} [fetch] A custom fetch (tests, unusual runtimes).
 * @property {() => number} [now] Clock in milliseconds (tests); defaults to `Date.now`.
 */

/** Seconds before a token's expiry at which a cached token is no longer used. */
export const TOKEN_REFRESH_MARGIN_SECONDS = 30;

/** @type {Readonly<ConnectionStatus>} */
export const NOT_CONNECTED = Object.freeze({
  connected: false, limits: null, usage: Object.freeze({ monthlyUsd: 0 }), remainingUsd: 0,
  heldUsd: 0,
});

// ---- errors ------------------------------------------------------------------------------
// WattfareError (code, status, message)
// ├── WattfareAuthError           auth              401
// ├── WattfareInvalidRequestError invalid_request   400
// ├── WattfareConsentError        consent_required  403
// ├── WattfareNotConnectedError   not_connected     402
// ├── WattfareBudgetError         budget_exceeded   402
// ├── WattfareGrantError          grant_invalid     402
// ├── WattfareFundingError        funding_invalid   402
// ├── WattfareRateLimitError      rate_limited      429 (retryAfter seconds)
// ├── WattfareUpstreamError       upstream, upstream_timeout  502/504
// ├── WattfarePopupError          popup_blocked     (client only: the browser blocked it)
// └── WattfareNetworkError        network           (client only: no answer at all)

export class WattfareError extends Error {
  /** @param {string} message @param {{ code?: string, status?: number, cause?: unknown }} [info] */
  constructor(message, info = {}) {
    super(message, info.cause === undefined ? undefined : { cause: info.cause });
    this.name = new.target.name;
    /** @type {string} */ this.code = info.code ?? new.target.code ?? "internal";
    /** @type {number} */ this.status = info.status ?? new.target.status ?? 500;
  }
}
export class WattfareAuthError extends WattfareError { static code = "auth"; static status = 401; }
export class WattfareInvalidRequestError extends WattfareError { static code = "invalid_request"; static status = 400; }
export class WattfareConsentError extends WattfareError { static code = "consent_required"; static status = 403; }
export class WattfareNotConnectedError extends WattfareError { static code = "not_connected"; static status = 402; }
export class WattfareBudgetError extends WattfareError { static code = "budget_exceeded"; static status = 402; }
export class WattfareGrantError extends WattfareError { static code = "grant_invalid"; static status = 402; }
export class WattfareFundingError extends WattfareError { static code = "funding_invalid"; static status = 402; }
export class WattfareRateLimitError extends WattfareError {
  static code = "rate_limited"; static status = 429;
  /** @param {string} message @param {{ status?: number, retryAfter?: number, cause?: unknown }} [info] */
  constructor(message, info = {}) {
    super(message, info);
    /** @type {number | null} seconds to wait, from Retry-After */
    this.retryAfter = info.retryAfter ?? null;
  }
}
export class WattfareUpstreamError extends WattfareError { static code = "upstream"; static status = 502; }
export class WattfarePopupError extends WattfareError { static code = "popup_blocked"; static status = 0; }
export class WattfareNetworkError extends WattfareError { static code = "network"; static status = 0; }

const BY_CODE = {
  auth: WattfareAuthError, invalid_request: WattfareInvalidRequestError,
  consent_required: WattfareConsentError, not_connected: WattfareNotConnectedError,
  budget_exceeded: WattfareBudgetError, grant_invalid: WattfareGrantError,
  funding_invalid: WattfareFundingError, rate_limited: WattfareRateLimitError,
  upstream: WattfareUpstreamError, upstream_timeout: WattfareUpstreamError,
  popup_blocked: WattfarePopupError, network: WattfareNetworkError,
};

/**
 * The typed error for a server's error answer `{ error: { code, message } }`.
 * @param {number} status @param {unknown} body @param {{ get(name: string): string | null }} [headers]
 * @returns {WattfareError}
 */
export function errorFromResponse(status, body, headers) {
  const err = body && typeof body === "object" && "error" in body ? /** @type {any} */ (body).error : null;
  const code = err && typeof err.code === "string" ? err.code : codeForStatus(status);
  const message = err && typeof err.message === "string" ? err.message : `Request failed with status ${status}.`;
  const Class = BY_CODE[code] ?? WattfareError;
  const retryAfter = Number(headers?.get("retry-after"));
  return new Class(message, { code, status, ...(Number.isFinite(retryAfter) && retryAfter > 0 ? { retryAfter } : {}) });
}

function codeForStatus(status) {
  return { 400: "invalid_request", 401: "auth", 403: "consent_required", 429: "rate_limited",
    502: "upstream", 504: "upstream_timeout" }[status] ?? "internal";
}

/**
 * A WattfareError for anything thrown by this SDK or wrapping a gateway answer
 * (e.g. an AI SDK APICallError with `statusCode` and `responseBody`), else null.
 * @param {unknown} err @returns {WattfareError | null}
 */
export function toWattfareError(err) {
  for (let e = /** @type {any} */ (err), depth = 0; e && depth < 5; e = e.cause, depth++) {
    if (e instanceof WattfareError) return e;
    if (typeof e === "object" && typeof e.statusCode === "number" && typeof e.responseBody === "string") {
      try {
        const body = JSON.parse(e.responseBody);
        if (body && body.error && typeof body.error.code === "string") return errorFromResponse(e.statusCode, body);
      } catch { /* not a gateway answer */ }
    }
  }
  return null;
}

// ---- the client ----------------------------------------------------------------------------
function defaultBaseURL() {
  try {
    const here = new URL(import.meta.url);
    if (/^https?:$/.test(here.protocol) && here.pathname.endsWith("/sdk/client.js")) return here.origin;
  } catch { /* not loaded from a URL */ }
  return null;
}

/**
 * Create the browser client.
 * @param {WattfareClientOptions} options
 */
export function createWattfare(options) {
  const { publishableKey, session } = options ?? /** @type {any} */ ({});
  if (typeof publishableKey !== "string" || !publishableKey.startsWith("pk_")) {
    throw new WattfareAuthError("publishableKey must be the app's publishable key (pk_…).");
  }
  if (typeof session !== "string" && typeof session !== "function") {
    throw new WattfareInvalidRequestError("session must be your token route's URL or a function returning { token, expiresAt }.");
  }
  const base = (options.baseURL ?? defaultBaseURL() ?? "").replace(/\/+$/, "");
  if (!/^https?:\/\//.test(base)) {
    throw new WattfareInvalidRequestError("baseURL is required: the URL of your wattgate.");
  }
  const gatewayOrigin = new URL(base).origin;
  const doFetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
  const now = options.now ?? (() => Date.now());

  /** @type {CreatedSession | null} */ let cached = null;
  /** @type {Promise<string> | null} */ let pending = null;

  async function call(url, init) {
    try {
      return await doFetch(url, init);
    } catch (cause) {
      throw new WattfareNetworkError(`Could not reach ${new URL(url, gatewayOrigin).origin}.`, { cause });
    }
  }

  async function readError(res) {
    let body = null;
    try { body = await res.json(); } catch { /* not JSON */ }
    return errorFromResponse(res.status, body, res.headers);
  }

  async function mintToken() {
    let created;
    if (typeof session === "function") {
      created = await session();
    } else {
      const res = await call(session, {
        method: "POST", credentials: "same-origin", headers: { Accept: "application/json" },
      });
      if (!res.ok) throw await readError(res);
      created = await res.json().catch(() => null);
    }
    if (!created || typeof created.token !== "string" || !created.token) {
      throw new WattfareAuthError("The session route did not answer { token, expiresAt }.");
    }
    return { token: created.token, expiresAt: Number(created.expiresAt) || 0 };
  }

  /** A session token: cached until about 30 s before it expires; concurrent callers share one mint. */
  function token() {
    if (cached && now() / 1000 < cached.expiresAt - TOKEN_REFRESH_MARGIN_SECONDS) {
      return Promise.resolve(cached.token);
    }
    if (!pending) {
      pending = mintToken().then((created) => {
        cached = created;
        return created.token;
      }).finally(() => { pending = null; });
    }
    return pending;
  }

  async function api(method, path, body, retried = false) {
    const bearer = await token();
    const res = await call(base + path, {
      method, credentials: "omit",
      headers: { Authorization: `Bearer ${bearer}`, ...(body ? { "Content-Type": "application/json" } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    if (res.status === 401 && !retried) {
      // The token may have been revoked or the clock skewed: mint a fresh one once.
      cached = null;
      return api(method, path, body, true);
    }
    if (!res.ok) throw await readError(res);
    return res.status === 204 ? null : res.json();
  }

  function openPopup(path) {
    const w = 460, h = 720;
    const left = Math.max(0, (window.screenX ?? 0) + ((window.outerWidth ?? w) - w) / 2);
    const top = Math.max(0, (window.screenY ?? 0) + ((window.outerHeight ?? h) - h) / 3);
    const popup = window.open(`${base}${path}`, "", `popup,width=${w},height=${h},left=${left},top=${top}`);
    if (!popup) {
      throw new WattfarePopupError("The browser blocked the consent popup: call connect() or requestGrant() directly from a click handler.");
    }
    return popup;
  }

  /**
   * The origin handshake, from the SDK's side: answer the popup's hello with the session
   * token (only to the gateway's origin), then wait for its result or its closing.
   * @returns {Promise<any | null>} the approved result message, or null on denial/close
   */
  function handshake(popup, flow) {
    token().catch(() => {}); // start minting at the click; surfaced when the popup asks
    return new Promise((resolve, reject) => {
      let settled = false;
      const settle = (value, error) => {
        if (settled) return;
        settled = true;
        window.removeEventListener("message", onMessage);
        clearInterval(watch);
        if (error) reject(error); else resolve(value);
      };
      const onMessage = async (event) => {
        if (event.source !== popup || event.origin !== gatewayOrigin) return;
        const msg = event.data;
        if (!msg || msg.wattgate !== 1 || msg.flow !== flow) return;
        if (msg.type === "hello") {
          let bearer;
          try {
            // A popup left open past the token's life asks again with refresh: mint anew.
            if (msg.refresh) cached = null;
            bearer = await token();
          } catch (error) {
            try { popup.close(); } catch { /* already gone */ }
            settle(null, toWattfareError(error) ?? error);
            return;
          }
          popup.postMessage({ wattgate: 1, type: "session", token: bearer }, gatewayOrigin);
        } else if (msg.type === "result") {
          settle(msg.approved ? msg : null);
        }
      };
      window.addEventListener("message", onMessage);
      // Closing the popup is a denial; give a result posted just before closing time to land.
      const watch = setInterval(() => {
        if (popup.closed) setTimeout(() => settle(null), 120);
      }, 250);
    });
  }

  const pkQuery = `pk=${encodeURIComponent(publishableKey)}`;
  /** @returns {Promise<ConnectionStatus>} */
  const status = () => api("GET", "/api/v1/connections");

  return {
    publishableKey,
    baseURL: base,

    /**
     * Open the consent popup; resolves to the status after the user's choice. A denial or a
     * closed popup resolves to the current (normally not-connected) status; a blocked popup
     * (WattfarePopupError) or a failing token route rejects with a typed error.
     * @returns {Promise<ConnectionStatus>}
     */
    async connect() {
      const popup = openPopup(`/connect?${pkQuery}`); // synchronously, inside the click
      const result = await handshake(popup, "connect");
      if (result && result.status) return result.status;
      try { return await status(); } catch { return { ...NOT_CONNECTED, usage: { monthlyUsd: 0 } }; }
    },

    /** @returns {Promise<ConnectionStatus>} */
    status,

    /** Revoke this user's connection to the app. @returns {Promise<void>} */
    async disconnect() {
      await api("DELETE", "/api/v1/connections");
    },

    /**
     * Ask the user for a one-time grant of `requests` calls (optionally dollar-capped).
     * @param {{ requests: number, maxUsd?: number | null }} request
     * @returns {Promise<GrantResult | null>} null when the user denies or closes the popup
     */
    async requestGrant(request) {
      const requests = request?.requests;
      if (!Number.isInteger(requests) || requests < 1) {
        throw new WattfareInvalidRequestError("requests must be a positive whole number.");
      }
      const maxUsd = request.maxUsd;
      if (maxUsd != null && !(typeof maxUsd === "number" && maxUsd > 0)) {
        throw new WattfareInvalidRequestError("maxUsd must be a positive number when given.");
      }
      let path = `/grant?${pkQuery}&requests=${requests}`;
      if (maxUsd != null) path += `&maxUsd=${encodeURIComponent(String(maxUsd))}`;
      const popup = openPopup(path);
      const result = await handshake(popup, "grant");
      if (!result || !result.grant) return null;
      const { grantToken, expiresAt, requests: granted } = result.grant;
      return { grantToken, expiresAt, requests: granted };
    },
  };
}
