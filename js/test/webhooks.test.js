// verifyWebhook (js/server.js): a delivery signed by the gateway's own code (wattgate.webhooks,
// run in Python here) verifies in one call; every way an attacker could bend one is refused
// with a WattfareWebhookError that says why.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";

import { verifyWebhook, WattfareWebhookError, WattfareError, SIGNATURE_HEADER, WEBHOOK_TOLERANCE } from "../server.js";
import { PYTHON, ROOT, run } from "./gateway.js";

const SECRET = "whsec_test_secret_0123456789";
const BODY = '{"id":"evt_1","type":"budget.threshold","created":1800000000,"data":{"appId":"app1","appUserId":"u","percent":80,"capUsd":"10","spentUsd":"8"}}';
const T = 1800000000;

function sign(body, t = T, secret = SECRET) {
  return `t=${t},v1=${createHmac("sha256", secret).update(`${t}.${body}`).digest("hex")}`;
}

async function refused(promise, pattern) {
  await assert.rejects(promise, (err) => {
    assert.ok(err instanceof WattfareWebhookError && err instanceof WattfareError);
    assert.equal(err.code, "webhook_signature");
    assert.equal(err.status, 400);
    assert.match(err.message, pattern);
    return true;
  });
}

test("a delivery signed by the gateway's code verifies, from a string or the raw bytes", async () => {
  const script = "import sys; from wattgate.webhooks import sign; "
    + "sys.stdout.write(sign(sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])))";
  const { stdout } = await run(PYTHON, ["-c", script, SECRET, BODY, String(T)],
    { cwd: ROOT, env: { ...process.env, PYTHONPATH: ROOT } });
  assert.equal(stdout, sign(BODY));
  const event = await verifyWebhook(BODY, stdout, SECRET, { now: T + 10 });
  assert.deepEqual(event, JSON.parse(BODY));
  const bytes = new TextEncoder().encode(BODY);
  assert.equal((await verifyWebhook(bytes, stdout, SECRET, { now: T })).id, "evt_1");
  assert.equal((await verifyWebhook(bytes.buffer, stdout, SECRET, { now: T })).id, "evt_1");
  assert.equal(SIGNATURE_HEADER, "Wattgate-Signature");
  assert.equal(WEBHOOK_TOLERANCE, 300);
});

test("the attacker's cases are refused, each named", async () => {
  const good = sign(BODY);
  await refused(verifyWebhook(BODY, good, "whsec_wrong", { now: T }), /does not match/);
  await refused(verifyWebhook(BODY.replace('"8"', '"0"'), good, SECRET, { now: T }), /does not match/);
  await refused(verifyWebhook(BODY + " ", good, SECRET, { now: T }), /does not match/);
  await refused(verifyWebhook(BODY, good, SECRET, { now: T + 301 }), /outside the 300 s tolerance/);
  await refused(verifyWebhook(BODY, good, SECRET, { now: T - 301 }), /tolerance/);
  await refused(verifyWebhook(BODY, good, SECRET, { now: T + 61, tolerance: 60 }), /60 s tolerance/);
  // A fresh timestamp grafted onto an old signature: the MAC covers t, so it fails.
  await refused(verifyWebhook(BODY, good.replace(`t=${T}`, `t=${T + 1000}`), SECRET, { now: T + 1000 }),
    /does not match/);
  await refused(verifyWebhook(BODY, undefined, SECRET, { now: T }), /no Wattgate-Signature header/);
  await refused(verifyWebhook(BODY, "", SECRET, { now: T }), /no Wattgate-Signature header/);
  await refused(verifyWebhook(BODY, "garbage", SECRET, { now: T }), /garbled/);
  await refused(verifyWebhook(BODY, `t=abc,v1=${"0".repeat(64)}`, SECRET, { now: T }), /garbled timestamp/);
  await refused(verifyWebhook(BODY, `t=${T}`, SECRET, { now: T }), /lacks t= or v1=/);
  await refused(verifyWebhook(BODY, `t=${T},v1=zz`, SECRET, { now: T }), /does not match/);
  await refused(verifyWebhook(BODY, good, "", { now: T }), /no webhook signing secret/);
  // Signed with the right secret but not an event: refused too.
  await refused(verifyWebhook("[1]", sign("[1]"), SECRET, { now: T }), /not a wattgate event/);
  await refused(verifyWebhook("nope", sign("nope"), SECRET, { now: T }), /not JSON/);
});

test("a second v1 (a secret being rolled) is accepted when any one matches", async () => {
  const other = createHmac("sha256", "whsec_old").update(`${T}.${BODY}`).digest("hex");
  const header = `t=${T},v1=${other},${sign(BODY).split(",")[1]}`;
  assert.equal((await verifyWebhook(BODY, header, SECRET, { now: T })).type, "budget.threshold");
});
