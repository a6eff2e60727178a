// Drives Debian's chromium, headless, with playwright-core for the web console's browser tests
// (tests/interop/test_console.py). One long-lived process: the test sends one JSON command per
// line on stdin and reads one JSON answer per line on stdout, so pytest can interleave browser
// steps with the device (the official Python SDK) and REST calls of its own.
//
//   TWINHUB_NODE_MODULES=<scripts/node-env.sh output> \
//     node console_browser.mjs --chromium <executable> --server-cert <hub tls/server.pem> \
//       --out <directory for screenshots>
//
// TLS: the browser does not skip certificate checks. It is started with
// --ignore-certificate-errors-spki-list=<base64 SHA-256 of the SubjectPublicKeyInfo of the
// hub's own server certificate> (the first certificate of --server-cert), so that one key,
// and nothing else, is accepted although the hub's dev CA is not in the browser's trust store.
// The context keeps ignoreHTTPSErrors false.
//
// Lines out: first {"type":"ready","version"} once the browser runs (or {"type":"fatal"}),
// then for every command {"id","ok":true,"result"} or {"id","ok":false,"error","diag"}, where
// diag holds what a failure report needs: the page's URL and visible text, the browser console
// errors and page errors so far, and the path of a screenshot taken at the failure.
//
// A command is {"id", "op", ...}. Elements are named by a locator spec: one step or a list of
// steps, each {"role","name"?,"exact"?,"level"?} | {"label"} | {"text"} | {"css"} | {"placeholder"},
// with optional "hasText" (or "hasTextRe"), "nameRe" (a regular expression for the accessible
// name), "nth" and "first". Every op that waits takes "timeout" (ms, default 10000); nothing
// waits without a bound. Ops:
//   newPage {viewport?, colorScheme?}        a fresh context and page (new storage, new logs)
//   goto {url}                               navigate, wait for the load event
//   fill {loc, value} | click {loc} | press {loc, key} | select {loc, value?|label?}
//   check {loc} | uncheck {loc}
//   waitFor {loc, state}                     visible | hidden | attached | detached
//   waitText {loc?, contains: [..], absent?: [..], re?}
//                                            polls the text (innerText; the page's when no loc)
//                                            until it holds every "contains" string (and
//                                            matches "re", and holds no "absent" string)
//   text {loc?} | value {loc} | count {loc} | attr {loc, name}
//   eval {expr}                              page.evaluate of an expression, JSON result
//   emulateMedia {colorScheme}
//   screenshot {name, fullPage?}             <out>/<name>.png
//   log                                      {requests, console, pageErrors, failedRequests}
//   diag {name?}                             as in a failure answer
//   close                                    closes the browser and exits 0

import crypto from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import readline from "node:readline";
import { parseArgs } from "node:util";
import { requireLocked } from "./lib.mjs";

const { values } = parseArgs({
  options: {
    chromium: { type: "string" },
    "server-cert": { type: "string" },
    out: { type: "string" },
  },
});
for (const need of ["chromium", "server-cert", "out"]) {
  if (!values[need]) {
    process.stderr.write(`usage: node console_browser.mjs --chromium EXE --server-cert PEM --out DIR (missing --${need})\n`);
    process.exit(64);
  }
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

/** base64(SHA-256(SPKI)) of the first certificate in a PEM file: Chromium's pin format. */
function spkiPin(pemPath) {
  const pem = fs.readFileSync(pemPath, "utf8");
  const first = pem.match(/-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/);
  if (!first) throw new Error(`${pemPath} holds no PEM certificate`);
  const cert = new crypto.X509Certificate(first[0]);
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  return crypto.createHash("sha256").update(spki).digest("base64");
}

const outDir = path.resolve(values.out);
fs.mkdirSync(outDir, { recursive: true });

let browser = null;
let context = null;
let page = null;
let shotCounter = 0;
// Everything the current page did, for assertions (requests) and failure reports.
let log = null;

function freshLog() {
  return { requests: [], console: [], pageErrors: [], failedRequests: [] };
}

async function launch() {
  const { chromium } = requireLocked("playwright-core");
  const pin = spkiPin(values["server-cert"]);
  browser = await chromium.launch({
    executablePath: values.chromium,
    headless: true,
    timeout: 60000,
    // Playwright starts the browser with a fresh temporary --user-data-dir of its own, which
    // Chromium also requires before it honours the SPKI list.
    args: [
      "--no-sandbox", // CI runs as root, where Chromium's sandbox refuses to start.
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--disable-dev-shm-usage",
      `--ignore-certificate-errors-spki-list=${pin}`,
      // Loopback only: no host name resolves, so nothing the browser might try leaves the
      // machine; the hub is reached by its 127.0.0.N address.
      "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.*",
    ],
  });
  return browser.version();
}

async function newPage({ viewport, colorScheme }) {
  if (context) await context.close().catch(() => {});
  log = freshLog();
  const current = log;
  context = await browser.newContext({
    viewport: viewport || { width: 1280, height: 860 },
    colorScheme: colorScheme || "light",
    ignoreHTTPSErrors: false,
    serviceWorkers: "block",
    // The console's Copy buttons write the clipboard; the tests read it back.
    permissions: ["clipboard-read", "clipboard-write"],
  });
  page = await context.newPage();
  page.on("request", (req) => {
    const entry = { method: req.method(), url: req.url(), headers: null, body: req.postData() };
    current.requests.push(entry);
    // allHeaders() includes the security-relevant ones headers() leaves out.
    entry.pending = req.allHeaders().then((h) => { entry.headers = h; }, () => { entry.headers = req.headers(); });
    req.response().then((resp) => { entry.status = resp ? resp.status() : null; }, () => {});
  });
  page.on("requestfailed", (req) => {
    current.failedRequests.push({ method: req.method(), url: req.url(), failure: req.failure()?.errorText ?? "" });
  });
  page.on("console", (msg) => {
    const loc = msg.location();
    current.console.push({ type: msg.type(), text: msg.text(), url: loc?.url ?? "" });
  });
  page.on("pageerror", (err) => {
    current.pageErrors.push(String(err && err.stack ? err.stack : err));
  });
  return { ok: true };
}

function needPage() {
  if (!page) throw new Error("no page: send newPage first");
  return page;
}

function byName(opts, step) {
  if (step.nameRe !== undefined) opts.name = new RegExp(step.nameRe, step.flags || "");
  else if (step.name !== undefined) opts.name = step.name;
  if (step.exact) opts.exact = true;
  if (step.level !== undefined) opts.level = step.level;
  return opts;
}

function locate(spec) {
  let cur = needPage();
  const steps = Array.isArray(spec) ? spec.flat(Infinity) : [spec];
  if (steps.length === 0) throw new Error("empty locator");
  for (const step of steps) {
    let l;
    if (step.role) l = cur.getByRole(step.role, byName({}, step));
    else if (step.label) l = cur.getByLabel(step.label, { exact: !!step.exact });
    else if (step.text) l = cur.getByText(step.text, { exact: !!step.exact });
    else if (step.placeholder) l = cur.getByPlaceholder(step.placeholder, { exact: !!step.exact });
    else if (step.css) l = cur.locator(step.css);
    else throw new Error(`locator step without role/label/text/placeholder/css: ${JSON.stringify(step)}`);
    if (step.hasText !== undefined) l = l.filter({ hasText: step.hasText });
    if (step.hasTextRe !== undefined) l = l.filter({ hasText: new RegExp(step.hasTextRe, step.flags || "") });
    if (step.nth !== undefined) l = l.nth(step.nth);
    else if (step.first) l = l.first();
    cur = l;
  }
  return cur;
}

async function textOf(spec, timeout) {
  if (spec) return await locate(spec).innerText({ timeout });
  return await needPage().locator("body").innerText({ timeout });
}

function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

async function waitText(cmd, timeout) {
  const deadline = Date.now() + timeout;
  const contains = cmd.contains || [];
  const absent = cmd.absent || [];
  const re = cmd.re ? new RegExp(cmd.re, cmd.flags || "") : null;
  let last = null;
  let lastErr = null;
  for (;;) {
    const left = deadline - Date.now();
    try {
      last = await textOf(cmd.loc, Math.max(200, Math.min(left, 2000)));
      lastErr = null;
      if (contains.every((s) => last.includes(s)) && absent.every((s) => !last.includes(s))
          && (!re || re.test(last))) {
        return last;
      }
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() >= deadline) {
      const want = [
        contains.length ? `containing ${JSON.stringify(contains)}` : "",
        absent.length ? `without ${JSON.stringify(absent)}` : "",
        re ? `matching /${re.source}/` : "",
      ].filter(Boolean).join(", ");
      const got = last === null ? `no text (${lastErr ? lastErr.message.split("\n")[0] : "?"})` : JSON.stringify(last.slice(0, 1500));
      throw new Error(`timed out after ${timeout} ms waiting for text ${want} in ${JSON.stringify(cmd.loc ?? "page")}; last: ${got}`);
    }
    await sleep(150);
  }
}

async function screenshot(name, fullPage) {
  // A name may hold one subdirectory ("failures/x"); nothing may leave the output directory.
  const safe = String(name).split("/").map((part) => part.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^\.+/, "_"));
  const file = path.join(outDir, ...safe) + ".png";
  fs.mkdirSync(path.dirname(file), { recursive: true });
  await needPage().screenshot({ path: file, fullPage: fullPage !== false, timeout: 15000 });
  return file;
}

async function logNow() {
  if (!log) return freshLog();
  await Promise.all(log.requests.map((r) => r.pending).filter(Boolean));
  return {
    requests: log.requests.map(({ pending, ...rest }) => rest),
    console: log.console,
    pageErrors: log.pageErrors,
    failedRequests: log.failedRequests,
  };
}

async function diag(name) {
  const out = { url: null, text: null, console: [], pageErrors: [], screenshot: null };
  if (!page) return out;
  out.url = page.url();
  try {
    out.text = (await page.locator("body").innerText({ timeout: 3000 })).slice(0, 6000);
  } catch (e) {
    out.text = `(could not read the page text: ${e.message.split("\n")[0]})`;
  }
  if (log) {
    out.console = log.console.filter((m) => m.type === "error" || m.type === "warning");
    out.pageErrors = log.pageErrors;
    out.failedRequests = log.failedRequests;
  }
  try {
    out.screenshot = await screenshot(`failures/${name || "failure"}-${process.pid}-${++shotCounter}`, true);
  } catch (e) {
    out.screenshot = `(no screenshot: ${e.message.split("\n")[0]})`;
  }
  return out;
}

async function run(cmd) {
  const timeout = cmd.timeout ?? 10000;
  switch (cmd.op) {
    case "newPage":
      return await newPage(cmd);
    case "goto": {
      const resp = await needPage().goto(cmd.url, { timeout, waitUntil: "load" });
      return { status: resp ? resp.status() : null };
    }
    case "fill":
      await locate(cmd.loc).fill(cmd.value, { timeout });
      return null;
    case "click":
      await locate(cmd.loc).click({ timeout });
      return null;
    case "press":
      await locate(cmd.loc).press(cmd.key, { timeout });
      return null;
    case "select": {
      const option = cmd.label !== undefined ? { label: cmd.label } : { value: cmd.value };
      return await locate(cmd.loc).selectOption(option, { timeout });
    }
    case "check":
      await locate(cmd.loc).check({ timeout });
      return null;
    case "uncheck":
      await locate(cmd.loc).uncheck({ timeout });
      return null;
    case "waitFor":
      await locate(cmd.loc).waitFor({ state: cmd.state || "visible", timeout });
      return null;
    case "waitText":
      return await waitText(cmd, timeout);
    case "text":
      return await textOf(cmd.loc, timeout);
    case "value":
      return await locate(cmd.loc).inputValue({ timeout });
    case "count":
      return await locate(cmd.loc).count();
    case "attr":
      return await locate(cmd.loc).getAttribute(cmd.name, { timeout });
    case "eval":
      return await needPage().evaluate(cmd.expr);
    case "emulateMedia":
      await needPage().emulateMedia({ colorScheme: cmd.colorScheme });
      return null;
    case "screenshot":
      return await screenshot(cmd.name, cmd.fullPage);
    case "log":
      return await logNow();
    case "diag":
      return await diag(cmd.name);
    default:
      throw new Error(`unknown op ${JSON.stringify(cmd.op)}`);
  }
}

async function shutdown(code) {
  try {
    if (browser) await Promise.race([browser.close(), sleep(10000)]);
  } finally {
    process.exit(code);
  }
}

try {
  const version = await launch();
  emit({ type: "ready", version });
} catch (e) {
  emit({ type: "fatal", error: String(e && e.stack ? e.stack : e) });
  await shutdown(1);
}

// Commands run one at a time, in order.
const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
let chain = Promise.resolve();
lines.on("line", (line) => {
  if (!line.trim()) return;
  chain = chain.then(async () => {
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (e) {
      emit({ id: null, ok: false, error: `not JSON: ${e.message}`, diag: null });
      return;
    }
    if (cmd.op === "close") {
      emit({ id: cmd.id, ok: true, result: null });
      await shutdown(0);
      return;
    }
    try {
      const result = await run(cmd);
      emit({ id: cmd.id, ok: true, result: result === undefined ? null : result });
    } catch (e) {
      const error = String(e && e.message ? e.message : e);
      emit({ id: cmd.id, ok: false, error, diag: await diag(cmd.diagName) });
    }
  });
});
// The test process went away (or closed stdin): never outlive it.
lines.on("close", () => {
  chain.then(() => shutdown(0));
});
