// The example app's browser code: what an app developer writes with the client SDK.
const cfg = JSON.parse(document.getElementById("demo-config").textContent);
const { createWattfare, toWattfareError } = await import(`${cfg.gatewayURL}/sdk/client.js`);
const wf = createWattfare({ publishableKey: cfg.publishableKey, session: "/api/wattfare-token", baseURL: cfg.gatewayURL });

const $ = (id) => document.getElementById(id);
const usd = (n) => (n == null ? "no cap" : n === 0 ? "$0.00" : n < 0.01 ? "$" + n.toPrecision(2) : "$" + n.toFixed(2));
let connected = false;
let grant = null;

function show(status) {
  connected = status.connected;
  const cap = status.limits ? status.limits.monthlyUsd : null;
  $("status").innerHTML = "";
  $("status").append(connected ? "Connected" : "Not connected");
  const pill = document.createElement("span");
  pill.className = "pill " + (connected ? "on" : "off");
  pill.textContent = connected ? `${usd(cap)} / month` : "no budget";
  $("status").append(pill);
  $("budget").hidden = !connected;
  if (connected) {
    // Spent and held apart: a reply in progress holds the most it could cost until it
    // finishes, so "left" minus "held" is what the next message has to fit in.
    const spent = status.usage.monthlyUsd;
    const held = status.heldUsd ?? 0;
    const pct = cap ? Math.min(100, (spent / cap) * 100) : 0;
    const heldPct = cap ? Math.min(100 - pct, (held / cap) * 100) : 0;
    $("bar").style.width = pct.toFixed(2) + "%";
    $("held-bar").style.width = heldPct.toFixed(2) + "%";
    $("bar").parentElement.setAttribute("aria-valuenow", String(spent));
    $("bar").parentElement.setAttribute("aria-valuetext", `${usd(spent)} spent, ${usd(held)} held of ${usd(cap)}`);
    $("spent").textContent = `${usd(spent)} spent`;
    $("held").textContent = `${usd(held)} held`;
    $("held-note").hidden = !(held > 0);
    $("cap").textContent = `${usd(status.remainingUsd)} left of ${usd(cap)}`;
  }
  $("connect").textContent = connected ? "Change cap" : "Connect AI budget";
  $("disconnect").hidden = !connected;
  $("chat-input").disabled = !connected;
  $("send").disabled = !connected;
}

async function refresh() {
  try { show(await wf.status()); } catch (e) { $("status").textContent = "Status unavailable: " + e.message; }
}

$("connect").addEventListener("click", async () => {
  // No await before connect(): the popup must open inside the click.
  try { show(await wf.connect()); } catch (e) { $("status").textContent = e.message; }
});
$("disconnect").addEventListener("click", async () => { await wf.disconnect(); refresh(); });

function bubble(kind, text) {
  $("chat-empty")?.remove();
  const node = document.createElement("div");
  node.className = "msg " + kind;
  node.textContent = text;
  $("messages").append(node);
  $("messages").scrollTop = $("messages").scrollHeight;
  return node;
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const message = $("chat-input").value.trim();
  if (!message) return;
  $("chat-input").value = "";
  $("chat-error").hidden = true;
  bubble("user", message);
  $("send").disabled = true;
  try {
    const res = await fetch("/api/chat", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ message }) });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      const code = body.error?.code;
      // The gateway's budget refusal says what this reply could cost and what is left.
      $("chat-error").textContent = code === "budget_exceeded" ? `${body.error.message} Raise the cap to keep chatting.`
        : code === "not_connected" ? "Connect an AI budget first." : (body.error?.message || "The chat failed.");
      $("chat-error").hidden = false;
      return;
    }
    const reply = bubble("assistant", "");
    reply.setAttribute("aria-busy", "true");
    refresh(); // the reply is admitted: the bar shows what it holds while it streams
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      reply.textContent += value;
      $("messages").scrollTop = $("messages").scrollHeight;
    }
    reply.removeAttribute("aria-busy");
    reply.dataset.done = "1";
  } finally {
    $("send").disabled = !connected;
    refresh();
  }
});

async function convert() {
  $("convert-notice").hidden = true;
  const res = await fetch("/api/convert", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ grantToken: grant.grantToken, text: $("convert-text").value }) });
  const body = await res.json().catch(() => ({}));
  if (res.ok) {
    $("convert-result").textContent = "“" + body.result + "”";
    $("convert-result").hidden = false;
    $("convert-again").hidden = false;
    note(`Done. ${body.remaining ?? 0} request${body.remaining === 1 ? "" : "s"} left on this grant.`);
  } else if (body.error?.code === "grant_used") {
    note("Grant used up: this grant allowed one request. Ask for a new one to convert again.", true);
    $("convert-again").hidden = true;
  } else {
    note(body.error?.message || "The conversion failed.", true);
  }
}

function note(text, error = false) {
  $("convert-notice").textContent = text;
  $("convert-notice").className = "notice" + (error ? " error" : "");
  $("convert-notice").hidden = false;
}

$("convert").addEventListener("click", async () => {
  let result;
  try {
    result = await wf.requestGrant({ requests: 1, maxUsd: 0.5 });
  } catch (e) {
    note((toWattfareError(e) ?? e).message, true);
    return;
  }
  if (!result) { note("No grant: the request was denied.", true); return; }
  grant = result;
  await convert();
});
$("convert-again").addEventListener("click", convert);

for (const id of ["connect", "convert"]) $(id).disabled = false;
window.addEventListener("focus", refresh);
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
setInterval(refresh, 4000);
refresh();
