// The server SDK (js/server.js) on its own, then against a real wattgate and the fake OpenRouter
// started here as subprocesses on loopback: the Vercel AI SDK (generateText, streamText) through
// user(id).model(), the official openai npm package unchanged, errors, grants, and the reference
// docs' server-side examples as written (only the import path and baseURL differ).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";

import OpenAI from "openai";
import { generateObject, generateText, streamText } from "ai";
import { z } from "zod";
import { createOpenAICompatible as createProvider } from "@ai-sdk/openai-compatible";

import {
  Wattfare, toWattfareError, WattfareError, WattfareAuthError, WattfareInvalidRequestError,
  WattfareNotConnectedError, WattfareBudgetError, WattfareGrantError, WattfareRateLimitError,
  WattfareUpstreamError,
} from "../server.js";

import { FUNDING_KEY, ROOT, run, startGateway } from "./gateway.js";

const SECRET = "sk_live_app0000000000000001_secret";

function json(status, body, headers = {}) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json", ...headers } });
}

/** A fetch that answers like the gateway's /sessions and records what it was sent. */
function stubFetch(answer = () => json(200, { token: "eyJ.session", expiresAt: 1718400000 })) {
  const sent = [];
  const fetch = async (url, init) => {
    sent.push({ url, init, body: init?.body ? JSON.parse(init.body) : undefined });
    return answer(url, init);
  };
  return { fetch, sent };
}

/** A fetch that counts the requests a client really sends (retries included). */
function countingFetch() {
  const seen = { count: 0, headers: [] };
  seen.fetch = async (url, init) => {
    seen.count++;
    const res = await globalThis.fetch(url, init);
    seen.headers.push(res.headers);
    return res;
  };
  return seen;
}

const post = (url, headers = {}) => new Request(url, { method: "POST", headers });

// ---- without a gateway ---------------------------------------------------------------------

test("a key that is not a secret key is refused", () => {
  for (const secretKey of [undefined, "", "pk_live_app_x", "live_secret"]) {
    assert.throws(() => new Wattfare({ secretKey }), (e) => e instanceof WattfareAuthError && e.code === "auth" && e.status === 401);
  }
  assert.throws(() => new Wattfare(), WattfareAuthError);
});

test("the secret key never shows when the client is logged or serialised", () => {
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test/api/v1/" });
  assert.equal(wf.apiURL, "https://gw.test/api/v1");
  assert.ok(!JSON.stringify(wf).includes("sk_") && !Object.keys(wf).includes("secretKey"));
  assert.equal(wf.secretKey, SECRET);
});

test("an empty grant token and an empty user id are refused before any call", () => {
  const wf = new Wattfare({ secretKey: SECRET });
  for (const token of ["", "  ", undefined]) assert.throws(() => wf.grant(token), WattfareAuthError);
  for (const id of ["", null, 4.5, true]) assert.throws(() => wf.user(id), WattfareInvalidRequestError);
});

test("an integer user id names the same user as its string", async () => {
  const { fetch, sent } = stubFetch();
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test", fetch });
  assert.equal(wf.user(42).appUserId, "42");
  await wf.createSession(42);
  assert.deepEqual(sent[0].body, { appUserId: "42" });
});

test("createSession sends the reference body and refuses a misspelt request", async () => {
  const { fetch, sent } = stubFetch();
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test", fetch });
  assert.deepEqual(await wf.createSession("user_123", { requestLimit: { monthlyUsd: 20 } }),
    { token: "eyJ.session", expiresAt: 1718400000 });
  assert.equal(sent[0].url, "https://gw.test/api/v1/sessions");
  assert.equal(sent[0].init.headers.Authorization, `Bearer ${SECRET}`);
  assert.equal(sent[0].init.cache, "no-store");
  assert.deepEqual(sent[0].body, { appUserId: "user_123", requestLimit: { monthlyUsd: 20 } });
  await assert.rejects(wf.createSession("u", { request_limit: { monthlyUsd: 20 } }), /requestLimit/);
  assert.equal(sent.length, 1);
});

test("a base URL that is not a gateway says so", async () => {
  const { fetch } = stubFetch(() => new Response("<html>bad gateway</html>", { status: 502 }));
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test", fetch });
  await assert.rejects(wf.user("u").status(), (e) => e instanceof WattfareError && e.status === 502 && /baseURL/.test(e.message));
});

test("sessionHandler: 401 for nobody, the token, the gateway's errors, a generic 500 for the rest", async () => {
  let answer = () => json(200, { token: "eyJ.session", expiresAt: 1718400000 });
  const { fetch, sent } = stubFetch((...args) => answer(...args));
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test", fetch });
  const POST = wf.sessionHandler(
    async (req) => req.headers.get("x-user"),
    async (req) => ({ requestLimit: { monthlyUsd: req.headers.get("x-plan") === "pro" ? 50 : 5 } }),
  );
  let res = await POST(post("https://app.test/api/wattfare-token"));
  assert.equal(res.status, 401);
  assert.equal((await res.json()).error.code, "auth");
  assert.equal(sent.length, 0);

  res = await POST(post("https://app.test/api/wattfare-token", { "x-user": "user_123", "x-plan": "pro" }));
  assert.equal(res.status, 200);
  assert.equal(res.headers.get("cache-control"), "no-store");
  assert.deepEqual(await res.json(), { token: "eyJ.session", expiresAt: 1718400000 });
  assert.deepEqual(sent[0].body, { appUserId: "user_123", requestLimit: { monthlyUsd: 50 } });

  answer = () => json(429, { error: { code: "rate_limited", message: "slow down" } }, { "Retry-After": "30" });
  res = await POST(post("https://app.test/api/wattfare-token", { "x-user": "user_123" }));
  assert.equal(res.status, 429);
  assert.equal(res.headers.get("retry-after"), "30");
  assert.deepEqual(await res.json(), { error: { code: "rate_limited", message: "slow down" } });

  const logged = [];
  const original = console.error;
  console.error = (...args) => logged.push(args);
  try {
    const broken = wf.sessionHandler(() => { throw new Error("db password is hunter2"); });
    res = await broken(post("https://app.test/api/wattfare-token"));
  } finally {
    console.error = original;
  }
  assert.equal(res.status, 500);
  assert.deepEqual(await res.json(), { error: { code: "internal", message: "Internal error." } });
  assert.equal(logged.length, 1);
});

test("model() takes the provider's settings, but never where calls go or who pays", () => {
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test" });
  const ai = wf.user("user_123");
  assert.equal(ai.model("openai/gpt-4o-mini", { supportsStructuredOutputs: true }).supportsStructuredOutputs, true);
  assert.equal(ai.model("openai/gpt-4o-mini").supportsStructuredOutputs, false);
  assert.equal(wf.grant("wfg_token").model("openai/gpt-4o-mini", { supportsStructuredOutputs: true }).supportsStructuredOutputs, true);
  for (const key of ["baseURL", "apiKey", "fetch", "name"]) {
    assert.throws(() => ai.model("openai/gpt-4o-mini", { [key]: "x" }), new RegExp(`${key} cannot be set`));
  }
  assert.throws(() => ai.model("openai/gpt-4o-mini", "strict"), TypeError);
  assert.throws(() => ai.model(""), WattfareInvalidRequestError);
});

test("model() uses the app's own provider factory when given one, with the client's settings", () => {
  const made = [];
  const createOpenAICompatible = (settings) => {
    made.push(settings);
    return createProvider(settings);
  };
  const wf = new Wattfare({ secretKey: SECRET, baseURL: "https://gw.test", createOpenAICompatible });
  const model = wf.user("user_123").model("openai/gpt-4o-mini", { supportsStructuredOutputs: true });
  assert.equal(model.supportsStructuredOutputs, true);
  assert.equal(made.length, 1);
  assert.equal(made[0].baseURL, "https://gw.test/api/v1");
  assert.equal(made[0].headers["x-wattfare-user"], "user_123");
  assert.throws(() => new Wattfare({ secretKey: SECRET, createOpenAICompatible: "yes" }),
    /createOpenAICompatible must be the function/);
});

test("toWattfareError sees through AI SDK and openai wrappers and leaves other errors alone", () => {
  const body = (code) => JSON.stringify({ error: { code, message: "m" } });
  const apiCallError = Object.assign(new Error("x"), { name: "AI_APICallError", statusCode: 402, responseBody: body("budget_exceeded") });
  assert.ok(toWattfareError(apiCallError) instanceof WattfareBudgetError);
  const rateLimited = Object.assign(new Error("x"), { statusCode: 429, responseBody: body("rate_limited") });
  const retryError = Object.assign(new Error("retries"), { name: "AI_RetryError", lastError: rateLimited });
  assert.ok(toWattfareError(retryError) instanceof WattfareRateLimitError);
  const openaiError = Object.assign(new Error("402"), { status: 402, error: { code: "grant_invalid", message: "used" }, headers: new Headers() });
  assert.ok(toWattfareError(openaiError) instanceof WattfareGrantError);
  const midStream = Object.assign(new Error("x"), { name: "AI_StreamProviderError", data: { code: 502, message: "Provider disconnected" } });
  assert.equal(toWattfareError(midStream).message, "Provider disconnected");
  assert.ok(toWattfareError(midStream) instanceof WattfareUpstreamError);
  // AI SDK 5 and 6 hand onError the stream's error object itself.
  const midStreamObject = { code: 502, message: "Provider disconnected" };
  assert.equal(toWattfareError(midStreamObject)?.message, "Provider disconnected");
  assert.ok(toWattfareError(midStreamObject) instanceof WattfareUpstreamError);
  assert.equal(toWattfareError({ message: "not from a stream" }), null);
  assert.equal(toWattfareError(new Error("boom")), null);
  assert.equal(toWattfareError(Object.assign(new Error("x"), { statusCode: 404, responseBody: "Not Found" })), null);
  assert.equal(toWattfareError(null), null);
});

test("every JavaScript example in docs/sdk.md parses", async () => {
  const doc = await readFile(path.join(ROOT, "docs", "sdk.md"), "utf8");
  const blocks = [...doc.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);
  assert.ok(blocks.length >= 6);
  const dir = await mkdtemp(path.join(os.tmpdir(), "wattgate-docs-"));
  try {
    for (const [i, block] of blocks.entries()) {
      const file = path.join(dir, `example${i}.mjs`);
      await writeFile(file, block);
      await run(process.execPath, ["--check", file]);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

// ---- against a running gateway --------------------------------------------------------------

let gw; // startGateway()'s gateway

/** What the consent popup does when the user approves: a funded connection. */
async function connect(wf, user, monthlyUsd) {
  const { token } = await wf.createSession(user);
  return gw.json("POST", "/connections", token, { monthlyUsd, fundingKey: FUNDING_KEY });
}

/** What the grant popup does on approval: a grant token for the browser to forward. */
async function approveGrant(wf, requests) {
  const { token } = await wf.createSession("grant_user");
  return (await gw.json("POST", "/grants", token, { requests, fundingKey: FUNDING_KEY })).grantToken;
}

/** The user's usage once it reaches `atLeast`: a stream is settled just after its last byte. */
async function settledUsage(user, atLeast) {
  let usage = 0;
  for (let i = 0; i < 100; i++) {
    usage = (await user.status()).usage.monthlyUsd;
    if (usage >= atLeast - 1e-12) break;
    await new Promise((r) => setTimeout(r, 20));
  }
  return usage;
}

before(async () => {
  gw = await startGateway();
  process.env.WATTFARE_SECRET_KEY = gw.secretKey; // the reference examples read it from here
  await connect(new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url }), "user_123", 10);
});

after(async () => {
  await gw?.stop();
});

test("generateText and streamText through user().model() are billed to the user", async () => {
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url });
  const ai = wf.user("billing_user");
  await connect(wf, "billing_user", 10);
  const generated = await generateText({ model: ai.model("openai/gpt-4o-mini"), prompt: "Say hello." });
  assert.match(generated.text, /^You wrote 2 words: “Say hello\.”\./);
  const streamed = streamText({ model: ai.model("openai/gpt-4o-mini"), prompt: "Say hello." });
  let text = "";
  for await (const piece of streamed.textStream) text += piece;
  assert.equal(text, generated.text);
  const cost = generated.usage.raw.cost + (await streamed.usage).raw.cost;
  assert.ok(cost > 0);
  assert.ok(Math.abs(await settledUsage(ai, cost) - cost) < 1e-9);
  assert.equal((await ai.status()).heldUsd, 0); // nothing in flight once both settled
});

test("streamText().toTextStreamResponse() streams the answer unchanged", async () => {
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url });
  const result = streamText({ model: wf.user("user_123").model("fake/flat-2c"), prompt: "Say hello." });
  const res = result.toTextStreamResponse();
  assert.match(res.headers.get("content-type"), /^text\/plain/);
  assert.match(await res.text(), /^You wrote 2 words: “Say hello\.”\./);
});

test("the openai npm package works unchanged against the gateway", async () => {
  const client = new OpenAI({ apiKey: gw.secretKey, baseURL: gw.api, defaultHeaders: { "x-wattfare-user": "user_123" } });
  const reply = await client.chat.completions.create({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "Say hi" }] });
  const stream = await client.chat.completions.create({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "Say hi" }], stream: true });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  assert.equal(text, reply.choices[0].message.content);
  const ids = [];
  for await (const model of client.models.list()) ids.push(model.id);
  assert.ok(ids.includes("anthropic/claude-sonnet-4"));

  const counted = countingFetch();
  const nobody = new OpenAI({ apiKey: gw.secretKey, baseURL: gw.api, maxRetries: 3, fetch: counted.fetch,
    defaultHeaders: { "x-wattfare-user": "nobody" } });
  const err = await nobody.chat.completions.create({ model: "openai/gpt-4o-mini", messages: [{ role: "user", content: "x" }] })
    .then(() => null, (e) => e);
  assert.ok(err instanceof OpenAI.APIError && err.status === 402);
  assert.ok(toWattfareError(err) instanceof WattfareNotConnectedError);
  assert.equal(counted.count, 1, "a 402 is not retried");
});

test("a user who never connected: status is a value, and a model call is a 402 sent once", async () => {
  const counted = countingFetch();
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url, fetch: counted.fetch });
  assert.deepEqual(await wf.user("nobody").status(), { connected: false, limits: null, usage: { monthlyUsd: 0 }, remainingUsd: 0, heldUsd: 0 });
  counted.count = 0;
  const err = await generateText({ model: wf.user("nobody").model("openai/gpt-4o-mini"), prompt: "x" }).then(() => null, (e) => e);
  assert.equal(err?.name, "AI_APICallError");
  const wfErr = toWattfareError(err);
  assert.ok(wfErr instanceof WattfareNotConnectedError);
  assert.equal(wfErr.code, "not_connected");
  assert.equal(wfErr.status, 402);
  assert.equal(counted.count, 1);
});

test("budget_exceeded surfaces through generateText and streamText, never retried", async () => {
  const counted = countingFetch();
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url, fetch: counted.fetch });
  await connect(wf, "small_cap", 0.05);
  const model = wf.user("small_cap").model("fake/flat-3c");
  await generateText({ model, prompt: "x" });
  counted.count = 0;
  const err = await generateText({ model, prompt: "x" }).then(() => null, (e) => e);
  assert.ok(toWattfareError(err) instanceof WattfareBudgetError);
  let streamError = null;
  const result = streamText({ model, prompt: "x", onError: ({ error }) => { streamError = error; } });
  for await (const _ of result.textStream) { /* nothing arrives */ }
  assert.equal(toWattfareError(streamError)?.code, "budget_exceeded");
  assert.equal(counted.count, 2);
});

test("provider failures are upstream errors, before the stream and inside it", async () => {
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url });
  const ai = wf.user("user_123");
  // The AI SDK retries 5xx and wraps the last attempt in a RetryError.
  const err = await generateText({ model: ai.model("fake/fail-500"), prompt: "x", maxRetries: 1 }).then(() => null, (e) => e);
  assert.equal(err?.name, "AI_RetryError");
  assert.ok(toWattfareError(err) instanceof WattfareUpstreamError);
  assert.equal(toWattfareError(err).status, 502);

  let streamError = null;
  const result = streamText({ model: ai.model("fake/midstream-error"), prompt: "x", onError: ({ error }) => { streamError = error; } });
  let text = "";
  for await (const piece of result.textStream) text += piece;
  assert.ok(text.length > 0, "the answer had started");
  assert.ok(toWattfareError(streamError) instanceof WattfareUpstreamError);
});

test("generateObject with supportsStructuredOutputs sends the schema, with no warning", async () => {
  const counted = countingFetch();
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url, fetch: async (url, init) => {
    counted.sent = JSON.parse(init.body);
    counted.sentUser = new Headers(init.headers).get("x-wattfare-user");
    return counted.fetch(url, init);
  } });
  const schema = z.object({ title: z.string(), tags: z.array(z.string()), stars: z.number().int() });
  const user = wf.user("user_123");
  const structured = await generateObject({
    model: user.model("openai/gpt-4o-mini", { supportsStructuredOutputs: true }), schema, prompt: "A film.",
  });
  assert.deepEqual(structured.warnings, []);
  assert.equal(counted.sent.response_format.type, "json_schema");
  assert.deepEqual(Object.keys(counted.sent.response_format.json_schema.schema.properties), ["title", "tags", "stars"]);
  assert.equal(typeof structured.object.title, "string");
  assert.ok(Array.isArray(structured.object.tags));
  // Without the setting the provider can only ask for JSON mode, and warns that it did.
  const plain = await generateObject({ model: user.model("openai/gpt-4o-mini"), schema: z.object({ text: z.string() }), prompt: "x" });
  assert.equal(counted.sent.response_format.type, "json_object");
  assert.ok(plain.warnings.length > 0);
  // A setting's headers cannot bill another user.
  const other = await generateText({
    model: user.model("fake/flat-2c", { headers: { "x-wattfare-user": "billing_user" } }), prompt: "x",
  });
  assert.ok(other.text.length > 0);
  assert.equal(counted.sentUser, "user_123");
});

test("a grant's model spends its requests, then grant_invalid, not retried", async () => {
  const counted = countingFetch();
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url, fetch: counted.fetch });
  const ai = wf.grant(await approveGrant(wf, 2));
  counted.headers.length = 0;
  await generateText({ model: ai.model("fake/flat-2c"), prompt: "one" });
  const streamed = streamText({ model: ai.model("fake/flat-2c"), prompt: "two" });
  for await (const _ of streamed.textStream) { /* drain */ }
  assert.deepEqual(counted.headers.map((h) => h.get("x-wattfare-grant-remaining")), ["1", "0"]);
  counted.count = 0;
  const err = await generateText({ model: ai.model("fake/flat-2c"), prompt: "three" }).then(() => null, (e) => e);
  assert.ok(toWattfareError(err) instanceof WattfareGrantError);
  assert.equal(toWattfareError(err).code, "grant_invalid");
  assert.equal(counted.count, 1);
});

// ---- the reference docs' server-side examples, as written ----------------------------------

test("overview.md: at a glance", async () => {
  const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: gw.url });

  // Scoped to one of *your* user ids — no Wattfare account for end users.
  const ai = wf.user("user_123");

  const { text } = await generateText({
    model: ai.model("openai/gpt-4o-mini"), // billed to the user's budget
    prompt: "Say hello.",
  });
  assert.ok(text.length > 0);
});

test("server-sdk.md: per-user operations", async () => {
  const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: gw.url });
  const ai = wf.user("user_123"); // your own user id

  // 1) Inference — a standard AI SDK model, billed to this user.
  const { text } = await generateText({
    model: ai.model("anthropic/claude-sonnet-4"),
    prompt: "Summarise this in one line.",
  });

  // 2) Status — connection + budget snapshot (never throws on first run).
  const status = await ai.status();
  if (!status.connected) {
    // prompt the user to connect their budget
  }
  assert.ok(text.length > 0);
  assert.equal(status.connected, true);
  assert.equal((await wf.user("first_run").status()).connected, false);
});

test("server-sdk.md: sessionHandler, a fixed cap and a per-plan cap", async () => {
  const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: gw.url });
  const getUserId = (req) => req.headers.get("x-signed-in-as"); // your auth
  const capFor = async (req) => (req.headers.get("x-plan") === "pro" ? 50 : 5);

  // Next.js — app/api/wattfare-token/route.ts
  const POST = wf.sessionHandler(
    async (req) => getUserId(req),         // -> your user id, or null -> 401
    { requestLimit: { monthlyUsd: 20 } },  // optional cap the user approves
  );
  // The second arg can also be a function of the request, e.g. per-plan caps:
  const POST_PLAN = wf.sessionHandler(
    (req) => getUserId(req),
    async (req) => ({ requestLimit: { monthlyUsd: await capFor(req) } }),
  );

  assert.equal((await POST(post("http://localhost:3000/api/wattfare-token"))).status, 401);
  const caps = [];
  for (const [handler, plan] of [[POST, "free"], [POST_PLAN, "pro"]]) {
    const res = await handler(post("http://localhost:3000/api/wattfare-token", { "x-signed-in-as": "session_user", "x-plan": plan }));
    assert.equal(res.status, 200);
    const { token, expiresAt } = await res.json();
    assert.ok(expiresAt > Date.now() / 1000);
    // The consent popup approves with this token: the cap offered is the app's request.
    caps.push((await gw.json("POST", "/connections", token, { fundingKey: FUNDING_KEY })).limits.monthlyUsd);
    await fetch(`${gw.api}/connections`, { method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
  }
  assert.deepEqual(caps, [20, 50]);
});

test("server-sdk.md: createSession", async () => {
  const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: gw.url });
  async function handler() {
    const { token, expiresAt } = await wf.createSession("user_123", {
      requestLimit: { monthlyUsd: 20 }, // optional
    });

    // Hand 'token' to the frontend however you like (it's just a string).
    return Response.json({ token, expiresAt });
  }
  const body = await (await handler()).json();
  assert.equal(body.token.split(".").length, 3);
  assert.equal(typeof body.expiresAt, "number");
});

test("grants.md: Server: wf.grant(), with its error handling", async () => {
  const wf = new Wattfare({ secretKey: process.env.WATTFARE_SECRET_KEY, baseURL: gw.url });

  async function POST(req) {
    const { grantToken, file } = await req.json();

    // Redeem the grant — no user id needed.
    const ai = wf.grant(grantToken);

    let text;
    try {
      ({ text } = await generateText({
        model: ai.model("anthropic/claude-sonnet-4"),
        prompt: `Convert this document to markdown: ${file}`,
      }));
    } catch (err) {
      const wf = toWattfareError(err);
      if (wf?.code === "grant_invalid") {
        // Grant is expired, fully used, or over its dollar cap.
        // Ask the user to approve a new grant.
        return Response.json({ error: "grant_used" }, { status: 402 });
      }
      throw err;
    }

    return Response.json({ result: text });
    // The grant's request count was decremented by 1.
  }

  const approved = await approveGrant(wf, 1);
  const request = () => new Request("http://localhost:3000/api/convert", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ grantToken: approved, file: "# A document" }),
  });
  const first = await POST(request());
  assert.equal(first.status, 200);
  assert.ok((await first.json()).result.length > 0);
  const second = await POST(request());
  assert.equal(second.status, 402);
  assert.deepEqual(await second.json(), { error: "grant_used" });
});
