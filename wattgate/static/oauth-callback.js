// Where "Connect with OpenRouter" returns: hand the code to the consent popup that asked
// (same origin, matched by its nonce) and close. The code is useless without the PKCE
// verifier, which never left that popup.
const params = new URLSearchParams(location.search);
const code = params.get("code");
const nonce = params.get("n");
history.replaceState(null, "", location.pathname);
const msg = document.getElementById("msg");
if (code && nonce) {
  const channel = new BroadcastChannel("wattgate-oauth");
  channel.postMessage({ nonce, code });
  channel.close();
  msg.textContent = "Connected. You can close this window.";
  setTimeout(() => window.close(), 100);
} else {
  msg.textContent = "OpenRouter did not return a code. Close this window and try again.";
}
