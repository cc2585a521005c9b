// wattgate server SDK for JavaScript (the "wattfare/server" surface). One ES module, no build
// step. Runs on your backend: holds the app's secret key, mints session tokens for the
// browser, and gives AI SDK models billed to one of your users or to a one-time grant.
//
//   import { Wattfare } from "wattgate/server";
//   import { generateText } from "ai";
//   const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: "https://gw.example" });
//   const { text } = await generateText({ model: wf.user("user_123").model("openai/gpt-4o-mini"), prompt: "Say hello." });
//
// model() is built on @ai-sdk/openai-compatible (a peer dependency: install it beside `ai`).
// The error classes are the client SDK's (one hierarchy for the whole package), re-exported.

/**
 * The provider factory this module finds for itself, or null. A path install (`npm install
 * ./js`) is a symlink, and Node resolves a symlinked package's imports from its real place:
 * the checkout, which may hold no provider (or another copy than the app's). So a missing
 * provider is not fatal here: the app can pass its own (`createOpenAICompatible` option).
 * @type {typeof import("@ai-sdk/openai-compatible").createOpenAICompatible | null}
 */
let ownProviderFactory = null;
try {
  ({ createOpenAICompatible: ownProviderFactory } = await import("@ai-sdk/openai-compatible"));
} catch (err) {
  const e = /** @type {any} */ (err);
  const missing = (e?.code === "ERR_MODULE_NOT_FOUND" || e?.code === "MODULE_NOT_FOUND")
    && String(e.message).includes("@ai-sdk/openai-compatible");
  if (!missing) throw err;
}

const NO_PROVIDER = "wattgate/server could not load @ai-sdk/openai-compatible from where it is "
  + "installed (a plain path install is a symlink, so Node looks for it beside the checkout, "
  + "not in your app). Install it in your app and pass it in: "
  + "import { createOpenAICompatible } from \"@ai-sdk/openai-compatible\"; "
  + "new Wattfare({ secretKey, baseURL, createOpenAICompatible }). "
  + "Or install wattgate with npm install --install-links, or from its packed tarball.";

import {
  NOT_CONNECTED, WattfareError, WattfareAuthError, WattfareInvalidRequestError, WattfareUpstreamError,
  errorFromResponse,
  toWattfareError as clientToWattfareError,
} from "./client.js";

export {
  NOT_CONNECTED, WattfareError, WattfareAuthError, WattfareInvalidRequestError,
  WattfareConsentError, WattfareNotConnectedError, WattfareBudgetError, WattfareGrantError,
  WattfareFundingError, WattfareRateLimitError, WattfareUpstreamError,
} from "./client.js";

/**
 * @typedef {{ connected: boolean, limits: { monthlyUsd: number | null } | null,
 *   usage: { monthlyUsd: number }, remainingUsd: number | null, heldUsd: number }}
 *   ConnectionStatus `heldUsd` (a wattgate extension): held at their worst case by this
 *   month's calls in flight; a new call fits in `remainingUsd - heldUsd`.
 * @typedef {{ monthlyUsd: number | null }} Limits
 * @typedef {{ monthlyUsd: number }} Usage
 * @typedef {{ requestLimit?: { monthlyUsd?: number | null } }} SessionRequest
 * @typedef {{ token: string, expiresAt: number }} CreatedSession
 * @typedef {{ grantToken: string, expiresAt: number, requests: number }} GrantResult
 * @typedef {import("@ai-sdk/openai-compatible").OpenAICompatibleChatLanguageModel} LanguageModel
 * @typedef {Omit<import("@ai-sdk/openai-compatible").OpenAICompatibleProviderSettings,
 *   "name" | "baseURL" | "apiKey" | "fetch">} ModelSettings
 * @typedef {object} WattfareOptions
 * @property {string} secretKey The app's secret key (`sk_…`); never send it to a browser.
 * @property {string} [baseURL] The gateway's URL (its site root; `…/api/v1` is accepted too).
 * @property {typeof fetch} [fetch] A custom fetch, for tests or unusual runtimes.
 * @property {typeof import("@ai-sdk/openai-compatible").createOpenAICompatible}
 *   [createOpenAICompatible] Your app's provider factory, used for model(): pass it with a
 *   plain path install (a symlink), or to be sure model() uses your app's copy. Default: the
 *   one this package imports itself.
 */

/** The gateway's default listen address (`wattgate serve` with no config). */
export const DEFAULT_BASE_URL = "http://127.0.0.1:8787";
export const USER_HEADER = "x-wattfare-user";
export const GRANT_HEADER = "x-wattfare-grant";
export const GRANT_REMAINING_HEADER = "x-wattfare-grant-remaining";

/** Provider settings the client owns: where calls go, with which key. */
const OWNED_SETTINGS = ["name", "baseURL", "apiKey", "fetch"];

const NOT_SIGNED_IN = { error: { code: "auth", message: "Not signed in." } };
const INTERNAL = { error: { code: "internal", message: "Internal error." } };

/**
 * The WattfareError behind `err`, or null. Sees through the AI SDK's `APICallError`
 * (status and body of the gateway's answer), its `RetryError` (the last attempt) and
 * `StreamProviderError` (a provider failure after the answer started: code `upstream`,
 * status 502; AI SDK 5 and 6 pass the stream's `{ code, message }` object itself), the
 * openai package's `APIError`, and `cause` chains.
 * @param {unknown} err @returns {WattfareError | null}
 */
export function toWattfareError(err) {
  for (let e = /** @type {any} */ (err), depth = 0; e && depth < 5; e = e.lastError, depth++) {
    const found = clientToWattfareError(e);
    if (found) return found;
    if (typeof e.status === "number" && typeof e.error?.code === "string" && e.headers) {
      // The openai npm package's APIError: status, the body's `error` member, headers.
      return errorFromResponse(e.status, { error: e.error }, e.headers);
    }
    if (e.name === "AI_StreamProviderError") {
      // The provider failed after the answer had started: the gateway passed its error on.
      const message = typeof e.data?.message === "string" ? e.data.message : e.message;
      return new WattfareUpstreamError(message, { status: 502, cause: e });
    }
    if (!(e instanceof Error) && typeof e.message === "string" && ("code" in e || "type" in e)) {
      // The same failure as AI SDK 5 and 6 report it: the stream's error object itself.
      return new WattfareUpstreamError(e.message, { status: 502, cause: e });
    }
  }
  return null;
}

/**
 * A user id as the gateway takes it: integer ids are common, and 42 and "42" are one user.
 * @param {unknown} value @returns {string}
 */
function userId(value) {
  if (Number.isSafeInteger(value)) return String(value);
  if (typeof value !== "string" || !value) {
    throw errorFromResponse(400, { error: { code: "invalid_request", message: "appUserId must be a non-empty string (or an integer)." } });
  }
  return value;
}

/** Model access for one header: a user's id or a grant's token. */
class ModelAccess {
  /** @param {Wattfare} wf @param {string} header @param {string} value */
  constructor(wf, header, value) {
    /** @private */ this.wf = wf;
    /** @private */ this.header = header;
    /** @private */ this.value = value;
  }

  /**
   * An AI SDK language model whose calls go through the gateway, billed here.
   * @param {string} modelId Any OpenRouter model id, e.g. "openai/gpt-4o-mini".
   * @param {ModelSettings} [settings] The provider's settings, e.g.
   *   `{ supportsStructuredOutputs: true }` for generateObject with a JSON schema.
   * @returns {LanguageModel}
   */
  model(modelId, settings) {
    if (typeof modelId !== "string" || !modelId) {
      throw new WattfareInvalidRequestError("modelId must be a model id such as \"openai/gpt-4o-mini\".");
    }
    if (settings != null && (typeof settings !== "object" || Array.isArray(settings))) {
      throw new TypeError("settings must be an object like { supportsStructuredOutputs: true }");
    }
    const owned = Object.keys(settings ?? {}).filter((k) => OWNED_SETTINGS.includes(k));
    if (owned.length) {
      throw new TypeError(`${owned.join(", ")} cannot be set per model: the Wattfare client sets it`);
    }
    const createProvider = this.wf.createOpenAICompatible;
    if (!createProvider) throw new Error(NO_PROVIDER);
    const provider = createProvider({
      includeUsage: true,
      ...settings,
      name: "wattfare",
      baseURL: this.wf.apiURL,
      apiKey: this.wf.secretKey,
      // Ours last: a setting never bills a call to another user or grant.
      headers: { ...settings?.headers, [this.header]: this.value },
      fetch: this.wf.fetch,
    });
    return provider.chatModel(modelId);
  }
}

/** One of your users: inference billed to their budget, and their status. */
export class WattfareUser extends ModelAccess {
  /** @param {Wattfare} wf @param {string} appUserId */
  constructor(wf, appUserId) {
    super(wf, USER_HEADER, appUserId);
    /** @readonly */ this.appUserId = appUserId;
  }

  /**
   * The user's connection and budget; `{ connected: false, … }` (never a throw) for a
   * user who has not connected.
   * @returns {Promise<ConnectionStatus>}
   */
  async status() {
    try {
      const query = new URLSearchParams({ appUserId: this.appUserId });
      return await this.wf.call("GET", `/status?${query}`);
    } catch (err) {
      if (err instanceof WattfareError && err.code === "not_connected") {
        return { ...NOT_CONNECTED, usage: { ...NOT_CONNECTED.usage } };
      }
      throw err;
    }
  }
}

/**
 * A one-time grant redeemed by your backend: each model call spends one of its requests.
 * Used up, the gateway answers 402 `grant_invalid` (a WattfareGrantError via
 * toWattfareError); each answer says what is left in `x-wattfare-grant-remaining`.
 */
export class WattfareGrant extends ModelAccess {
  /** @param {Wattfare} wf @param {string} grantToken */
  constructor(wf, grantToken) {
    super(wf, GRANT_HEADER, grantToken);
  }
}

export class Wattfare {
  /** @param {WattfareOptions} options */
  constructor(options) {
    const { secretKey, baseURL = DEFAULT_BASE_URL, fetch, createOpenAICompatible } =
      options ?? /** @type {any} */ ({});
    if (typeof secretKey !== "string" || !secretKey.startsWith("sk_")) {
      throw new WattfareAuthError('secretKey must be the app\'s secret key, starting with "sk_".');
    }
    // Not enumerable: logging or serialising the client never prints the key.
    Object.defineProperty(this, "secretKey", { value: secretKey, enumerable: false });
    /** @readonly */ this.baseURL = String(baseURL).replace(/\/+$/, "").replace(/\/api\/v1$/, "");
    /** @readonly */ this.apiURL = `${this.baseURL}/api/v1`;
    /** @readonly @type {typeof fetch} */
    this.fetch = fetch ?? ((input, init) => globalThis.fetch(input, init));
    if (createOpenAICompatible != null && typeof createOpenAICompatible !== "function") {
      throw new TypeError("createOpenAICompatible must be the function @ai-sdk/openai-compatible exports");
    }
    /** @readonly */ this.createOpenAICompatible = createOpenAICompatible ?? ownProviderFactory;
  }

  /** Scope model access and status to one of your own user ids. @param {string | number} appUserId */
  user(appUserId) {
    return new WattfareUser(this, userId(appUserId));
  }

  /** Redeem a one-time grant token forwarded by the browser. @param {string} grantToken */
  grant(grantToken) {
    if (typeof grantToken !== "string" || !grantToken.trim()) {
      throw new WattfareAuthError("The grant token is empty.");
    }
    return new WattfareGrant(this, grantToken.trim());
  }

  /**
   * Mint a short-lived session token for your frontend.
   * @param {string | number} appUserId @param {SessionRequest} [request] e.g. `{ requestLimit: { monthlyUsd: 20 } }`
   * @returns {Promise<CreatedSession>}
   */
  async createSession(appUserId, request) {
    /** @type {Record<string, unknown>} */
    const body = { appUserId: userId(appUserId) };
    if (request != null) {
      if (typeof request !== "object") throw new TypeError('request must be an object like { requestLimit: { monthlyUsd: 20 } }');
      const unknown = Object.keys(request).filter((k) => k !== "requestLimit");
      if (unknown.length) throw new TypeError(`unknown session request field(s) ${unknown.join(", ")}; the only one is "requestLimit"`);
      if (request.requestLimit != null) body.requestLimit = request.requestLimit;
    }
    const { token, expiresAt } = await this.call("POST", "/sessions", body);
    return { token, expiresAt };
  }

  /**
   * A `Request → Response` handler for your token route (e.g. a Next.js route's POST).
   * `resolveUser(req)` returns your user id, or null to answer 401; `request` is the cap
   * to ask for, or a function of the request. A thrown WattfareError answers its own body
   * and status; anything else a generic 500 (logged, never shown to the browser).
   * @param {(req: Request) => string | null | undefined | Promise<string | null | undefined>} resolveUser
   * @param {SessionRequest | ((req: Request) => SessionRequest | Promise<SessionRequest>)} [request]
   * @returns {(req: Request) => Promise<Response>}
   */
  sessionHandler(resolveUser, request) {
    return async (req) => {
      const headers = { "Cache-Control": "no-store" };
      try {
        const user = await resolveUser(req);
        if (user == null) return Response.json(NOT_SIGNED_IN, { status: 401, headers });
        const wanted = typeof request === "function" ? await request(req) : request;
        return Response.json(await this.createSession(user, wanted), { headers });
      } catch (err) {
        if (err instanceof WattfareError && err.status >= 400 && err.status <= 599) {
          const retryAfter = /** @type {any} */ (err).retryAfter;
          return Response.json({ error: { code: err.code, message: err.message } }, {
            status: err.status,
            headers: retryAfter ? { ...headers, "Retry-After": String(retryAfter) } : headers,
          });
        }
        console.error("wattgate sessionHandler failed:", err);
        return Response.json(INTERNAL, { status: 500, headers });
      }
    };
  }

  /**
   * One gateway call with the secret key; an error answer throws its typed WattfareError.
   * @private @param {string} method @param {string} path @param {unknown} [body]
   */
  async call(method, path, body) {
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${this.secretKey}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    // no-store: frameworks that cache fetch (Next.js) must never reuse a status or a token.
    const res = await this.fetch(this.apiURL + path, {
      method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed = null;
    try { parsed = text ? JSON.parse(text) : null; } catch { /* not JSON: handled below */ }
    if (res.ok && parsed && typeof parsed === "object") return parsed;
    if (parsed && typeof parsed === "object" && parsed.error && typeof parsed.error.code === "string") {
      throw errorFromResponse(res.status, parsed, res.headers);
    }
    throw new WattfareError(`${this.apiURL + path} answered HTTP ${res.status} without a Wattfare body: is baseURL the gateway?`,
      { code: "unexpected_response", status: res.ok ? 502 : res.status });
  }
}

// ---- webhooks: verifying a delivery in one call -------------------------------------------

/** The header a wattgate webhook delivery is signed in. */
export const SIGNATURE_HEADER = "Wattgate-Signature";
/** Seconds either way a signature's timestamp is accepted (replays outside it are refused). */
export const WEBHOOK_TOLERANCE = 300;

/** A delivery whose signature does not hold (code `webhook_signature`, status 400). */
export class WattfareWebhookError extends WattfareError {
  static code = "webhook_signature";
  static status = 400;
}

/** @param {string} hex @returns {Uint8Array | null} */
function hexBytes(hex) {
  if (hex.length !== 64 || !/^[0-9a-f]+$/i.test(hex)) return null;
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/**
 * The event (`{ id, type, created, data }`) a webhook delivery carries, once its
 * `Wattgate-Signature` header (`t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`)
 * proves the raw body was signed with `secret` within `tolerance` seconds of now; otherwise
 * rejects with a WattfareWebhookError saying why in one line. Pass the raw body exactly as
 * received (a string or bytes), never JSON parsed and serialised again. The comparison is
 * WebCrypto's HMAC verify (constant time).
 * @param {string | Uint8Array | ArrayBuffer} body
 * @param {string | null | undefined} signature
 * @param {string} secret
 * @param {{ tolerance?: number, now?: number }} [options] `now` in unix seconds (default: the clock)
 * @returns {Promise<{ id: string, type: string, created: number, data: Record<string, unknown> }>}
 */
export async function verifyWebhook(body, signature, secret, options = {}) {
  const fail = (/** @type {string} */ message) => { throw new WattfareWebhookError(message); };
  if (!secret || typeof secret !== "string") fail("no webhook signing secret given");
  if (!signature || typeof signature !== "string") fail(`no ${SIGNATURE_HEADER} header`);
  const sig = /** @type {string} */ (signature);
  let timestamp = null;
  /** @type {string[]} */ const macs = [];
  for (const part of sig.split(",")) {
    const at = part.indexOf("=");
    if (at < 0) fail(`garbled ${SIGNATURE_HEADER} header`);
    const key = part.slice(0, at).trim();
    const value = part.slice(at + 1).trim();
    if (key === "t") {
      if (!/^[0-9]{1,12}$/.test(value)) fail(`garbled timestamp in ${SIGNATURE_HEADER}`);
      timestamp = Number(value);
    } else if (key === "v1") {
      macs.push(value);
    }
  }
  if (timestamp === null || macs.length === 0) fail(`${SIGNATURE_HEADER} lacks t= or v1=`);
  const tolerance = options.tolerance ?? WEBHOOK_TOLERANCE;
  const now = options.now ?? Date.now() / 1000;
  const t = /** @type {number} */ (timestamp);
  if (Math.abs(now - t) > tolerance) {
    fail(`signature timestamp is ${Math.trunc(now - t)} s from now, outside the `
      + `${Math.trunc(tolerance)} s tolerance (replayed or a clock is wrong)`);
  }
  const raw = typeof body === "string" ? new TextEncoder().encode(body)
    : body instanceof Uint8Array ? body : new Uint8Array(body);
  const prefix = new TextEncoder().encode(`${t}.`);
  const signed = new Uint8Array(prefix.length + raw.length);
  signed.set(prefix);
  signed.set(raw, prefix.length);
  const key = await globalThis.crypto.subtle.importKey(
    "raw", new TextEncoder().encode(secret), { name: "HMAC", hash: "SHA-256" }, false, ["verify"]);
  let ok = false;
  for (const mac of macs) {
    const bytes = hexBytes(mac);
    if (bytes && await globalThis.crypto.subtle.verify("HMAC", key, bytes, signed)) ok = true;
  }
  if (!ok) fail("signature does not match (wrong secret or altered body)");
  let event;
  try {
    event = JSON.parse(new TextDecoder().decode(raw));
  } catch {
    fail("signed body is not JSON");
  }
  if (!event || typeof event !== "object" || !["id", "type", "created", "data"].every((k) => k in event)) {
    fail("signed body is not a wattgate event");
  }
  return event;
}
