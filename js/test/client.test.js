// The browser client SDK's token caching and error typing, with an injected fetch and clock.
import { test } from "node:test";
import assert from "node:assert/strict";

import {
  createWattfare, toWattfareError, errorFromResponse, TOKEN_REFRESH_MARGIN_SECONDS,
  WattfareError, WattfareAuthError, WattfareBudgetError, WattfareGrantError,
  WattfareInvalidRequestError, WattfareNetworkError, WattfareNotConnectedError,
  WattfareRateLimitError, WattfareUpstreamError, WattfareFundingError, WattfareConsentError,
} from "../client.js";

const BASE = "https://gw.example";
const STATUS = { connected: true, limits: { monthlyUsd: 10 }, usage: { monthlyUsd: 1.5 }, remainingUsd: 8.5 };

function json(status, body, headers = {}) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}

/** A fake gateway + token route; `answer` decides what the gateway says. */
function harness({ answer = () => json(200, STATUS), ttl = 600 } = {}) {
  const clock = { ms: 1_700_000_000_000 };
  const calls = { mint: 0, api: [] };
  const fetch = async (url, init = {}) => {
    if (url === "/api/wattfare-token") {
      calls.mint++;
      calls.lastMintInit = init;
      return json(200, { token: `tok${calls.mint}`, expiresAt: Math.floor(clock.ms / 1000) + ttl });
    }
    calls.api.push({ url, init });
    return answer(url, init, calls);
  };
  const wf = createWattfare({ publishableKey: "pk_live_app0123456789abcdef", session: "/api/wattfare-token",
    baseURL: BASE, fetch, now: () => clock.ms });
  return { wf, clock, calls };
}

test("the token is minted once and reused until ~30 s before it expires", async () => {
  const { wf, clock, calls } = harness({ ttl: 600 });
  assert.deepEqual(await wf.status(), STATUS);
  await wf.status();
  assert.equal(calls.mint, 1);
  assert.equal(calls.lastMintInit.method, "POST");
  assert.equal(calls.lastMintInit.credentials, "same-origin");
  clock.ms += (600 - TOKEN_REFRESH_MARGIN_SECONDS - 1) * 1000; // 31 s left: still good
  await wf.status();
  assert.equal(calls.mint, 1);
  clock.ms += 2000; // 29 s left: refreshed
  await wf.status();
  assert.equal(calls.mint, 2);
  assert.equal(calls.api.at(-1).init.headers.Authorization, "Bearer tok2");
  assert.equal(calls.api.at(-1).url, `${BASE}/api/v1/connections`);
  assert.equal(calls.api.at(-1).init.credentials, "omit");
});

test("concurrent calls share one token mint", async () => {
  const { wf, calls } = harness();
  await Promise.all([wf.status(), wf.status(), wf.disconnect().catch(() => {}), wf.status()]);
  assert.equal(calls.mint, 1);
});

test("a session function is used as the token source and cached the same way", async () => {
  let minted = 0;
  const now = 1_700_000_000_000;
  const wf = createWattfare({
    publishableKey: "pk_live_app0123456789abcdef", baseURL: BASE, now: () => now,
    session: async () => ({ token: `fn${++minted}`, expiresAt: now / 1000 + 600 }),
    fetch: async (url, init) => { assert.equal(init.headers.Authorization, "Bearer fn1"); return json(200, STATUS); },
  });
  await wf.status();
  await wf.status();
  assert.equal(minted, 1);
});

test("a token that already expires within the margin is not cached", async () => {
  const { wf, calls } = harness({ ttl: 20 });
  await wf.status();
  await wf.status();
  assert.equal(calls.mint, 2);
});

test("a 401 from the gateway drops the cached token and retries once", async () => {
  const { wf, calls } = harness({
    answer: (url, init) => init.headers.Authorization === "Bearer tok1"
      ? json(401, { error: { code: "auth", message: "Session token expired." } })
      : json(200, STATUS),
  });
  assert.deepEqual(await wf.status(), STATUS);
  assert.equal(calls.mint, 2);
  assert.equal(calls.api.length, 2);
});

test("a 401 that persists becomes WattfareAuthError after one retry", async () => {
  const { wf, calls } = harness({ answer: () => json(401, { error: { code: "auth", message: "Invalid session token." } }) });
  await assert.rejects(wf.status(), (err) => {
    assert.ok(err instanceof WattfareAuthError);
    assert.equal(err.code, "auth");
    assert.equal(err.status, 401);
    assert.equal(err.message, "Invalid session token.");
    return true;
  });
  assert.equal(calls.api.length, 2);
});

test("the token route's own failure is typed with its code", async () => {
  const wf = createWattfare({
    publishableKey: "pk_live_app0123456789abcdef", baseURL: BASE, session: "/api/wattfare-token",
    fetch: async () => json(401, { error: { code: "auth", message: "Not signed in." } }),
  });
  await assert.rejects(wf.status(), WattfareAuthError);
});

test("a token route answering something else than { token } is an auth error", async () => {
  const wf = createWattfare({
    publishableKey: "pk_live_app0123456789abcdef", baseURL: BASE, session: "/api/wattfare-token",
    fetch: async () => json(200, { nope: true }),
  });
  await assert.rejects(wf.status(), /did not answer \{ token, expiresAt \}/);
});

const CASES = [
  [400, "invalid_request", WattfareInvalidRequestError],
  [403, "consent_required", WattfareConsentError],
  [402, "not_connected", WattfareNotConnectedError],
  [402, "budget_exceeded", WattfareBudgetError],
  [402, "grant_invalid", WattfareGrantError],
  [402, "funding_invalid", WattfareFundingError],
  [429, "rate_limited", WattfareRateLimitError],
  [502, "upstream", WattfareUpstreamError],
  [504, "upstream_timeout", WattfareUpstreamError],
];

for (const [status, code, Class] of CASES) {
  test(`a ${status} ${code} answer becomes ${Class.name}`, async () => {
    const { wf } = harness({ answer: () => json(status, { error: { code, message: `m-${code}` } }, { "Retry-After": "7" }) });
    await assert.rejects(wf.disconnect(), (err) => {
      assert.ok(err instanceof Class, `${err.name} is not ${Class.name}`);
      assert.ok(err instanceof WattfareError);
      assert.ok(err instanceof Error);
      assert.equal(err.code, code);
      assert.equal(err.status, status);
      assert.equal(err.message, `m-${code}`);
      assert.equal(err.name, Class.name);
      if (Class === WattfareRateLimitError) assert.equal(err.retryAfter, 7);
      return true;
    });
  });
}

test("an unknown code stays a WattfareError with that code; a non-JSON failure gets one from its status", () => {
  const odd = errorFromResponse(418, { error: { code: "teapot", message: "short and stout" } });
  assert.equal(odd.constructor, WattfareError);
  assert.equal(odd.code, "teapot");
  assert.equal(odd.status, 418);
  const html = errorFromResponse(502, null);
  assert.ok(html instanceof WattfareUpstreamError);
  assert.equal(html.message, "Request failed with status 502.");
  assert.equal(errorFromResponse(500, "oops").code, "internal");
});

test("no answer at all is a WattfareNetworkError carrying the cause", async () => {
  const boom = new TypeError("fetch failed");
  const wf = createWattfare({
    publishableKey: "pk_live_app0123456789abcdef", baseURL: BASE,
    session: () => ({ token: "t", expiresAt: Date.now() / 1000 + 600 }),
    fetch: async () => { throw boom; },
  });
  await assert.rejects(wf.status(), (err) => {
    assert.ok(err instanceof WattfareNetworkError);
    assert.equal(err.code, "network");
    assert.equal(err.cause, boom);
    return true;
  });
});

test("toWattfareError sees through wrappers (an AI SDK APICallError, a cause chain)", () => {
  const apiCallError = Object.assign(new Error("Payment Required"), {
    statusCode: 402, responseBody: JSON.stringify({ error: { code: "grant_invalid", message: "used up" } }),
  });
  const found = toWattfareError(apiCallError);
  assert.ok(found instanceof WattfareGrantError);
  assert.equal(found.message, "used up");
  const inner = new WattfareBudgetError("cap reached");
  assert.equal(toWattfareError(new Error("outer", { cause: inner })), inner);
  assert.equal(toWattfareError(new Error("plain")), null);
  assert.equal(toWattfareError(undefined), null);
});

test("bad options fail loudly at construction", () => {
  assert.throws(() => createWattfare({ publishableKey: "sk_live_x", session: "/t", baseURL: BASE }), WattfareAuthError);
  assert.throws(() => createWattfare({ publishableKey: "pk_live_x", baseURL: BASE }), WattfareInvalidRequestError);
  assert.throws(() => createWattfare({ publishableKey: "pk_live_x", session: "/t" }), /baseURL is required/);
});

test("requestGrant refuses a bad request before opening any popup", async () => {
  const { wf } = harness();
  await assert.rejects(wf.requestGrant({ requests: 0 }), WattfareInvalidRequestError);
  await assert.rejects(wf.requestGrant({ requests: 1.5 }), WattfareInvalidRequestError);
  await assert.rejects(wf.requestGrant({ requests: 1, maxUsd: -1 }), WattfareInvalidRequestError);
});
