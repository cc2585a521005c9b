// A real wattgate and the fake OpenRouter, started as subprocesses on loopback for the node
// tests, with one app registered. Not a test file (package.json runs test/*.test.js).
import assert from "node:assert/strict";
import { spawn, execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const PYTHON = process.env.PYTHON ?? "python3";
export const FUNDING_KEY = "sk-or-v1-" + "f".repeat(48);
export const run = promisify(execFile);

async function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function startPython(args, env) {
  const child = spawn(PYTHON, args, { cwd: ROOT, env, stdio: ["ignore", "ignore", "pipe"] });
  child.log = "";
  child.stderr.on("data", (d) => { child.log += d; });
  return child;
}

async function waitUntilUp(url, child) {
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`exited early: ${child.log}`);
    try {
      if ((await fetch(url)).ok) return;
    } catch { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${url} did not come up: ${child.log}`);
}

/**
 * Start the fake OpenRouter and `wattgate serve` on free loopback ports, with one app.
 * @returns {Promise<{ url: string, api: string, secretKey: string, stop(): Promise<void>,
 *   json(method: string, urlPath: string, token: string, body?: unknown): Promise<any> }>}
 */
export async function startGateway() {
  // A port found free can be taken before the gateway binds it (another test file's
  // server, or the source port of some loopback connection): try again on new ports.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startGatewayOnce();
    } catch (err) {
      if (attempt >= 3 || !/address already in use/.test(String(err))) throw err;
    }
  }
}

async function startGatewayOnce() {
  const dir = await mkdtemp(path.join(os.tmpdir(), "wattgate-js-"));
  const [port, fakePort] = [await freePort(), await freePort()];
  const url = `http://127.0.0.1:${port}`;
  const env = {
    ...process.env, PYTHONPATH: ROOT, PYTHONUNBUFFERED: "1",
    WATTGATE_DATABASE__PATH: path.join(dir, "wattgate.db"),
    WATTGATE_SERVER__PORT: String(port),
    WATTGATE_SERVER__PUBLIC_URL: url,
    WATTGATE_UPSTREAM__BASE_URL: `http://127.0.0.1:${fakePort}/api/v1`,
  };
  const { stdout } = await run(PYTHON, ["-m", "wattgate", "apps", "create", "--name", "JS tests",
    "--origin", "http://localhost:3000", "--json"], { cwd: ROOT, env });
  const { secretKey } = JSON.parse(stdout);
  const children = [
    startPython(["-m", "wattgate.fakeupstream", "--port", String(fakePort)], env),
    startPython(["-m", "wattgate", "serve"], env),
  ];
  const api = `${url}/api/v1`;
  const gw = {
    url, api, secretKey,
    async stop() {
      for (const child of children) {
        if (child.exitCode === null) {
          const exited = new Promise((r) => child.once("exit", r));
          child.kill("SIGTERM");
          await exited;
        }
      }
      await rm(dir, { recursive: true, force: true });
    },
    /** One gateway call with a bearer token; asserts it succeeded and answers its JSON. */
    async json(method, urlPath, token, body) {
      const res = await fetch(api + urlPath, {
        method, headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      assert.ok(res.ok, `${method} ${urlPath}: ${res.status} ${text}`);
      return text ? JSON.parse(text) : null;
    },
  };
  try {
    await waitUntilUp(`http://127.0.0.1:${fakePort}/api/v1/models`, children[0]);
    await waitUntilUp(`${url}/healthz`, children[1]);
  } catch (err) {
    await gw.stop();
    throw err;
  }
  return gw;
}
