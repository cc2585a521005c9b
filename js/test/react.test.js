// The React SDK's surface, rendered with react-dom/server (no DOM needed).
import { test } from "node:test";
import assert from "node:assert/strict";
import { createElement } from "react";
import { renderToString } from "react-dom/server";

import { WattfareProvider, useWattfare } from "../react.js";

function fakeClient() {
  const calls = [];
  return {
    calls,
    status: () => { calls.push("status"); return new Promise(() => {}); },
    connect: () => { calls.push("connect"); return new Promise(() => {}); },
    disconnect: async () => { calls.push("disconnect"); },
    requestGrant: async (req) => { calls.push(["requestGrant", req]); return { grantToken: "wfg_x", expiresAt: 1, requests: req.requests }; },
  };
}

function capture(client) {
  let seen = null;
  function Probe() { seen = useWattfare(); return createElement("span", null, seen.connected ? "on" : "off"); }
  const html = renderToString(createElement(WattfareProvider, { client }, createElement(Probe)));
  return { html, value: seen };
}

test("useWattfare outside a provider throws a clear error", () => {
  function Lonely() { useWattfare(); return null; }
  assert.throws(() => renderToString(createElement(Lonely)), /inside <WattfareProvider>/);
});

test("the first render is loading and not connected, with every documented field", () => {
  const { html, value } = capture(fakeClient());
  assert.match(html, /off/);
  assert.equal(value.connected, false);
  assert.equal(value.loading, true);
  assert.equal(value.error, null);
  assert.equal(value.limits, null);
  assert.deepEqual(value.usage, { monthlyUsd: 0 });
  assert.equal(value.remainingUsd, null);
  assert.equal(value.heldUsd, 0);
  for (const fn of ["connect", "disconnect", "requestGrant", "refresh"]) assert.equal(typeof value[fn], "function");
});

test("requestGrant goes straight to the client and leaves connection state alone", async () => {
  const client = fakeClient();
  const { value } = capture(client);
  const result = await value.requestGrant({ requests: 2, maxUsd: 0.5 });
  assert.deepEqual(result, { grantToken: "wfg_x", expiresAt: 1, requests: 2 });
  assert.deepEqual(client.calls, [["requestGrant", { requests: 2, maxUsd: 0.5 }]]);
});

test("a provider can build its own client from publishableKey, session and baseURL", () => {
  const { value } = (() => {
    let seen = null;
    function Probe() { seen = useWattfare(); return null; }
    renderToString(createElement(WattfareProvider,
      { publishableKey: "pk_live_app0123456789abcdef", session: "/api/wattfare-token", baseURL: "https://gw.example" },
      createElement(Probe)));
    return { value: seen };
  })();
  assert.equal(value.connected, false);
});
