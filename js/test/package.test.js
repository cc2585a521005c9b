// The package as a team installs it: `npm pack`, then a small TypeScript app in a temp dir
// installs the tarball beside its own ai, provider, zod and React, type-checks strictly
// (moduleResolution "bundler" and "node16", JSX included), and runs generateText, streamText and
// generateObject through a real gateway. Then the same app with a path install.
// npm reuses its cache (--prefer-offline), so only a first run downloads.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { cp, lstat, mkdir, mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { createRequire } from "node:module";

import { Wattfare } from "../server.js";
import { FUNDING_KEY, ROOT, run, startGateway } from "./gateway.js";

const JS = path.join(ROOT, "js");
const NPM = process.platform === "win32" ? "npm.cmd" : "npm";
const ts = createRequire(import.meta.url)("typescript");

let gw;
let dir;

before(async () => {
  gw = await startGateway();
  dir = await mkdtemp(path.join(os.tmpdir(), "wattgate-consumer-"));
  const wf = new Wattfare({ secretKey: gw.secretKey, baseURL: gw.url });
  const { token } = await wf.createSession("consumer_user");
  await gw.json("POST", "/connections", token, { monthlyUsd: 10, fundingKey: FUNDING_KEY });
});

after(async () => {
  await gw?.stop();
  if (dir) await rm(dir, { recursive: true, force: true });
});

async function npm(args, cwd) {
  return run(NPM, [...args, "--no-audit", "--no-fund", "--loglevel=error"], { cwd, maxBuffer: 1 << 24 });
}

/** The consumer app's own dependencies, at the versions this package is developed against. */
async function consumerDependencies() {
  const { devDependencies } = JSON.parse(await readFile(path.join(JS, "package.json"), "utf8"));
  const own = ["ai", "@ai-sdk/openai-compatible", "zod", "react", "@types/react", "@types/node", "typescript"];
  return Object.fromEntries(own.map((name) => [name, devDependencies[name]]));
}

// As a Next.js app's tsconfig: strict, and skipLibCheck (the AI SDK's own declarations need
// more than an app installs). Our declarations are checked in full by the test below.
const STRICT = {
  strict: true, target: "es2022", lib: ["es2022", "dom"], jsx: "react-jsx", skipLibCheck: true, types: ["node"],
};

async function typecheck(app, name, compilerOptions) {
  await writeFile(path.join(app, name), JSON.stringify({ compilerOptions: { ...STRICT, ...compilerOptions }, files: ["server.ts", "browser.ts", "page.tsx"] }));
  const tsc = path.join(app, "node_modules", "typescript", "bin", "tsc");
  await run(process.execPath, [tsc, "-p", name], { cwd: app }).catch((err) => {
    assert.fail(`tsc -p ${name} failed:\n${err.stdout}${err.stderr}`);
  });
}

async function runServer(app, extraEnv = {}) {
  const env = { ...process.env, WATTFARE_SECRET_KEY: gw.secretKey, WATTGATE_URL: gw.url, ...extraEnv };
  const { stdout } = await run(process.execPath, ["out/server.js"], { cwd: app, env });
  return JSON.parse(stdout.trim().split("\n").at(-1));
}

function assertWorked(result) {
  assert.match(result.text, /^You wrote 2 words: “Say hello\.”\./);
  assert.equal(result.streamed, result.text);
  assert.equal(typeof result.title, "string");
  assert.ok(Number.isInteger(result.year));
  assert.deepEqual(result.warnings, [], "structured outputs: no 'responseFormat' warning");
  assert.ok(result.usage > 0, "the calls were billed to the user");
  assert.equal(result.held, 0, "heldUsd is typed and reported: nothing in flight once settled");
  assert.equal(result.refused, "not_connected");
  assert.equal(result.refusedTyped, true);
}

test("the packed tarball installs into an app, type-checks strictly and works", async () => {
  const { stdout } = await npm(["pack", "--json", "--pack-destination", dir], JS);
  const [packed] = JSON.parse(stdout);
  assert.deepEqual(packed.files.map((f) => f.path).sort(), [
    "README.md", "client.d.ts", "client.js", "package.json", "react.d.ts", "react.js", "server.d.ts", "server.js",
  ]);

  const app = path.join(dir, "app");
  await cp(path.join(JS, "test", "consumer"), app, { recursive: true });
  await writeFile(path.join(app, "package.json"), JSON.stringify({
    name: "consumer-app", private: true, type: "module",
    dependencies: { wattgate: `file:${path.join(dir, packed.filename)}`, ...await consumerDependencies() },
  }));
  await npm(["install", "--prefer-offline"], app);
  // One copy of the provider (the app's): the package brings none of its own.
  assert.deepEqual(await readdir(path.join(app, "node_modules", "wattgate")).then((names) => names.includes("node_modules")), false);

  await typecheck(app, "tsconfig.bundler.json", { module: "esnext", moduleResolution: "bundler", noEmit: true });
  await typecheck(app, "tsconfig.json", { module: "node16", moduleResolution: "node16", outDir: "out" });
  assertWorked(await runServer(app));

  // A path install of the checkout: with install-links npm copies the package like a tarball,
  // so it finds the app's ai and provider, not whatever the checkout's js/node_modules holds.
  await npm(["install", "--prefer-offline", "--install-links", JS], app);
  assert.ok(!(await lstat(path.join(app, "node_modules", "wattgate"))).isSymbolicLink());
  assertWorked(await runServer(app));

  // A plain path install, as from a fresh checkout (the package's files, no node_modules of
  // its own): npm makes a symlink, and Node resolves the package's imports from the checkout.
  const checkout = path.join(dir, "checkout", "js");
  await mkdir(checkout, { recursive: true });
  for (const file of [...packed.files.map((f) => f.path)]) await cp(path.join(JS, file), path.join(checkout, file));
  await npm(["install", "--prefer-offline", "--install-links=false", checkout], app);
  assert.ok((await lstat(path.join(app, "node_modules", "wattgate"))).isSymbolicLink());
  // Types: TypeScript too follows the link to the checkout unless told to keep the link's path.
  await typecheck(app, "tsconfig.linked.json", {
    module: "esnext", moduleResolution: "bundler", noEmit: true, preserveSymlinks: true,
  });
  // The app passes its own provider factory: model() works, with the app's one copy.
  assertWorked(await runServer(app, { PASS_PROVIDER: "1" }));
  // Without it, model() says what is wrong and how to fix it (not ERR_MODULE_NOT_FOUND at import).
  const probe = "const { Wattfare } = await import('wattgate/server');"
    + "try { new Wattfare({ secretKey: 'sk_x' }).user('u').model('m'); console.log('no error'); }"
    + "catch (e) { console.log(e.message); }";
  const { stdout: said } = await run(process.execPath, ["--input-type=module", "-e", probe], { cwd: app });
  assert.match(said, /could not load @ai-sdk\/openai-compatible/);
  assert.match(said, /new Wattfare\(\{ secretKey, baseURL, createOpenAICompatible \}\)/);
});

test("engines promises no older Node than the dev dependencies need", async () => {
  const pkg = JSON.parse(await readFile(path.join(JS, "package.json"), "utf8"));
  const major = (range) => Math.max(0, ...[...range.matchAll(/>=\s*v?(\d+)/g)].map((m) => Number(m[1])));
  const promised = major(pkg.engines.node);
  assert.ok(promised > 0, "engines.node is a lower bound like >=20");
  for (const name of Object.keys(pkg.devDependencies)) {
    const dep = JSON.parse(await readFile(path.join(JS, "node_modules", name, "package.json"), "utf8"));
    const needed = dep.engines?.node ? major(dep.engines.node) : 0;
    assert.ok(needed <= promised, `${name}@${dep.version} needs Node ${dep.engines?.node}, engines says ${pkg.engines.node}`);
  }
});

test("the declarations name exactly what each module exports", async () => {
  for (const surface of ["server", "client", "react"]) {
    const runtime = Object.keys(await import(`../${surface}.js`)).sort();
    const program = ts.createProgram([path.join(JS, `${surface}.d.ts`)], { strict: true, types: [], noEmit: true });
    const diagnostics = ts.getPreEmitDiagnostics(program, program.getSourceFile(path.join(JS, `${surface}.d.ts`)));
    assert.deepEqual(diagnostics.map((d) => ts.flattenDiagnosticMessageText(d.messageText, "\n")), [], `${surface}.d.ts`);
    const checker = program.getTypeChecker();
    const declared = checker.getExportsOfModule(checker.getSymbolAtLocation(program.getSourceFile(path.join(JS, `${surface}.d.ts`))))
      .filter((symbol) => {
        const target = symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
        return target.flags & ts.SymbolFlags.Value;
      })
      .map((symbol) => symbol.name).sort();
    assert.deepEqual(declared, runtime, `${surface}.d.ts`);
  }
});
