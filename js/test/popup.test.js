// The SDK's side of the popup handshake, with a fake window: what it opens, whom it answers.
import { test, beforeEach, afterEach } from "node:test";
import assert from "node:assert/strict";

import { createWattfare, WattfarePopupError } from "../client.js";

const BASE = "https://gw.example";
const NOT_CONNECTED = { connected: false, limits: null, usage: { monthlyUsd: 0 }, remainingUsd: 0 };
const tick = (ms = 0) => new Promise((resolve) => setTimeout(resolve, ms));

let fake;

beforeEach(() => {
  const listeners = new Set();
  const popup = {
    closed: false, posted: [],
    postMessage(msg, target) { this.posted.push({ msg, target }); },
    close() { this.closed = true; },
  };
  fake = {
    popup, listeners, opened: [], blocked: false,
    screenX: 0, screenY: 0, outerWidth: 1200, outerHeight: 900,
    open(url) { this.opened.push(url); return this.blocked ? null : popup; },
    addEventListener(type, fn) { if (type === "message") listeners.add(fn); },
    removeEventListener(type, fn) { listeners.delete(fn); },
    /** Deliver a message as the browser would, stamped with origin and source. */
    deliver(data, { origin = BASE, source = popup } = {}) {
      for (const fn of [...listeners]) fn({ data, origin, source });
    },
  };
  globalThis.window = fake;
});

afterEach(() => { delete globalThis.window; });

function client() {
  let minted = 0;
  const wf = createWattfare({
    publishableKey: "pk_live_app0123456789abcdef", baseURL: BASE,
    session: async () => ({ token: `tok${++minted}`, expiresAt: Date.now() / 1000 + 600 }),
    fetch: async () => new Response(JSON.stringify(NOT_CONNECTED), { status: 200 }),
  });
  return wf;
}

test("connect() opens the popup synchronously, before any await", async () => {
  const pending = client().connect();
  assert.deepEqual(fake.opened, [`${BASE}/connect?pk=pk_live_app0123456789abcdef`]);
  fake.popup.closed = true;
  await pending;
});

test("the token goes only to the popup, only to the gateway's origin, only on its hello", async () => {
  const pending = client().connect();
  fake.deliver({ wattgate: 1, type: "hello", flow: "connect" }, { origin: "https://evil.example" });
  fake.deliver({ wattgate: 1, type: "hello", flow: "connect" }, { source: { other: true } });
  await tick();
  assert.deepEqual(fake.popup.posted, []);
  fake.deliver({ wattgate: 1, type: "hello", flow: "connect" });
  await tick();
  assert.deepEqual(fake.popup.posted, [{ msg: { wattgate: 1, type: "session", token: "tok1" }, target: BASE }]);

  const status = { connected: true, limits: { monthlyUsd: 4 }, usage: { monthlyUsd: 0 }, remainingUsd: 4 };
  fake.deliver({ wattgate: 1, type: "result", flow: "connect", approved: true, status: { hacked: true } },
    { origin: "https://evil.example" });
  fake.deliver({ wattgate: 1, type: "result", flow: "connect", approved: true, status });
  assert.deepEqual(await pending, status);
  assert.equal(fake.listeners.size, 0);
});

test("closing the popup is a denial: connect() resolves to the current status", async () => {
  const pending = client().connect();
  fake.popup.closed = true;
  assert.deepEqual(await pending, NOT_CONNECTED);
});

test("denying a grant, or closing its popup, resolves to null", async () => {
  const wf = client();
  let pending = wf.requestGrant({ requests: 2, maxUsd: 0.5 });
  assert.equal(fake.opened[0], `${BASE}/grant?pk=pk_live_app0123456789abcdef&requests=2&maxUsd=0.5`);
  fake.deliver({ wattgate: 1, type: "result", flow: "grant", approved: false });
  assert.equal(await pending, null);
  pending = wf.requestGrant({ requests: 1 });
  fake.popup.closed = true;
  assert.equal(await pending, null);
});

test("an approved grant resolves to exactly the GrantResult fields", async () => {
  const pending = client().requestGrant({ requests: 3 });
  fake.deliver({ wattgate: 1, type: "result", flow: "connect", approved: true, status: {} }); // wrong flow
  fake.deliver({ wattgate: 1, type: "result", flow: "grant", approved: true,
    grant: { grantToken: "wfg_abc", expiresAt: 1718400000, requests: 3, extra: "dropped" } });
  assert.deepEqual(await pending, { grantToken: "wfg_abc", expiresAt: 1718400000, requests: 3 });
});

test("a blocked popup rejects with WattfarePopupError", async () => {
  fake.blocked = true;
  await assert.rejects(client().connect(), WattfarePopupError);
  await assert.rejects(client().requestGrant({ requests: 1 }), (err) => err.code === "popup_blocked");
});

test("connect() works when destructured from the client", async () => {
  const { connect } = client();
  const pending = connect();
  fake.popup.closed = true;
  assert.deepEqual(await pending, NOT_CONNECTED);
});

test("a hello with refresh gets a freshly minted token (the popup outlived the first one)", async () => {
  const pending = client().connect();
  fake.deliver({ wattgate: 1, type: "hello", flow: "connect" });
  await tick();
  fake.deliver({ wattgate: 1, type: "hello", flow: "connect", refresh: true });
  await tick();
  assert.deepEqual(fake.popup.posted.map((p) => p.msg.token), ["tok1", "tok2"]);
  fake.popup.closed = true;
  await pending;
});
