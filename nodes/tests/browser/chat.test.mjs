// Proves the web page works as a device in a real browser against a real server: starts
// `chatd all-in-one` on free ports with a temp data dir, serving https and wss:// with the
// self-signed certificate it creates (the default; Chromium is told to trust exactly that
// certificate's key, `--ignore-certificate-errors-spki-list`, not to ignore TLS errors), drives two headless Chromium
// contexts (two users, each its own sessionStorage, so its own device) through the page:
// sign up, ask to be friends by name and accept, exchange 1:1 messages both ways (once each, in seq order), see
// each other online, a second tab of one user is a second device that sees the history, a
// refusal is shown with its error code, a group message among them, and finally one user's
// browser closes and the other sees them go offline within the presence timeout (30 s) plus
// a margin. On failure: screenshots and the server log in a temp dir (path printed), exit 1.
//
// Usage: CHATD_BIN=target/release/chatd node chat.test.mjs   (or: node chat.test.mjs PATH)
// CHROMIUM overrides /usr/bin/chromium.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const CHATD = process.env.CHATD_BIN || process.argv[2];
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// nodes/src/limits.rs: PRESENCE_TIMEOUT_MS, plus the presence node's sweep, the publish
// through the chat server and one heartbeat interval of slack.
const PRESENCE_TIMEOUT_MS = 30_000;
const OFFLINE_WITHIN_MS = PRESENCE_TIMEOUT_MS + 15_000;
const STEP_TIMEOUT_MS = 20_000; // Any other wait (profile refresh is every 5 s).
const TEST_TIMEOUT_MS = 180_000;
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)} s]`, ...a);
const artifacts = fs.mkdtempSync(path.join(os.tmpdir(), 'chatsim-browser-'));
const pages = new Map(); // label -> page, for screenshots
const pageErrors = [];
const wsUrls = []; // every WebSocket the pages opened: all must be wss://

function portFree(port) {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once('error', () => resolve(false));
    s.listen(port, '127.0.0.1', () => s.close(() => resolve(true)));
  });
}

// A block of 21 free ports: chatd's plan uses base..base+11 and we put HTTP at base+20.
// Below the kernel's ephemeral range (32768 and up), so no client connection takes one of
// them between this check and chatd binding it.
async function freeBase() {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = 20_000 + Math.floor(Math.random() * 12_000);
    let ok = true;
    for (let p = base; p <= base + 20 && ok; p++) ok = await portFree(p);
    if (ok) return base;
  }
  throw new Error('no block of free ports found');
}

function startChatd(base, dataDir) {
  const logFile = path.join(artifacts, 'chatd.log');
  const out = fs.openSync(logFile, 'w');
  const http = `127.0.0.1:${base + 20}`;
  const child = spawn(CHATD, ['all-in-one', '--data', dataDir, '--http', http, '--base-port', String(base)],
    { stdio: ['ignore', out, out], env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'warn' } });
  child.on('exit', (code, sig) => { if (!child.stopping) log(`chatd exited early (code ${code}, signal ${sig})`); });
  return { child, url: `https://${http}`, logFile, cert: path.join(dataDir, 'tls', 'client.crt') };
}

// GET url over https trusting only `ca` (PEM); resolves to the status code.
function httpsStatus(url, ca) {
  return new Promise((resolve, reject) => {
    https.get(url, { ca }, (res) => { res.resume(); resolve(res.statusCode); }).on('error', reject);
  });
}

// Waits for the certificate chatd writes on first start, then for /healthz over https
// checked against it. Answers the certificate (PEM).
async function waitReady(server) {
  const deadline = Date.now() + STEP_TIMEOUT_MS;
  while (Date.now() < deadline) {
    try {
      const ca = fs.readFileSync(server.cert, 'utf8');
      if ((await httpsStatus(server.url + '/healthz', ca)) === 200) return ca;
    } catch (_) { /* not listening yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`chatd did not answer /healthz at ${server.url}`);
}

// Chromium's pin for one certificate: base64 of the SHA-256 of its SubjectPublicKeyInfo.
function spkiPin(pem) {
  const spki = new crypto.X509Certificate(pem).publicKey.export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(spki).digest('base64');
}

async function openDevice(browser, label, url) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT_MS);
  page.on('pageerror', (e) => pageErrors.push(`${label}: ${e.message}`));
  page.on('websocket', (ws) => wsUrls.push(ws.url()));
  page.on('console', (m) => { if (m.type() === 'error') log(`${label} console error: ${m.text()}`); });
  pages.set(label, page);
  await page.goto(url);
  return { context, page, label };
}

async function enter(dev, action, name, password) {
  const { page } = dev;
  await page.fill('#auth-name', name);
  await page.fill('#auth-password', password);
  await page.click(action === 'signup' ? '#signup' : '#login');
  await page.waitForSelector('#chat-view', { state: 'visible' });
  await page.waitForSelector('#conn[data-state="online"]');
  return page.textContent('#whoami');
}

const friendButton = (name) => `#friends button:has(.label:text-is("${name}"))`;
const groupButton = (name) => `#groups button:has(.label:text-is("${name}"))`;

async function open(dev, selector) {
  await dev.page.click(selector);
  await dev.page.waitForSelector(`#conv-title[data-channel]`);
}

async function send(dev, text) {
  await dev.page.fill('#composer-text', text);
  await dev.page.click('#send');
  // Pending first, then acknowledged with a seq.
  await dev.page.waitForSelector(`#messages li[data-state="acked"][data-seq]:has(.text:text-is("${text}"))`);
}

async function sees(dev, text) {
  await dev.page.waitForSelector(`#messages li[data-seq]:has(.text:text-is("${text}"))`);
}

// The conversation on screen: texts in seq order, each seq once.
async function conversation(dev) {
  return dev.page.$$eval('#messages li[data-seq]', (lis) =>
    lis.map((li) => ({ seq: Number(li.dataset.seq), text: li.querySelector('.text').textContent })));
}

function assertConversation(rows, expected, who) {
  const seqs = rows.map((r) => r.seq);
  const sorted = [...seqs].sort((a, b) => a - b);
  if (JSON.stringify(seqs) !== JSON.stringify(sorted)) throw new Error(`${who}: not in seq order: ${seqs}`);
  if (new Set(seqs).size !== seqs.length) throw new Error(`${who}: a seq shown twice: ${seqs}`);
  const texts = rows.map((r) => r.text);
  if (JSON.stringify(texts) !== JSON.stringify(expected)) {
    throw new Error(`${who}: expected ${JSON.stringify(expected)}, saw ${JSON.stringify(texts)}`);
  }
}

async function presenceOf(dev, name, status, timeout) {
  await dev.page.waitForSelector(`${friendButton(name)}[data-presence="${status}"]`, { timeout });
}

async function scenario(browser, url) {
  const a = await openDevice(browser, 'alice', url);
  const b = await openDevice(browser, 'bob', url);
  log('alice:', await enter(a, 'signup', 'alice', 'alice-pw'));
  log('bob:', await enter(b, 'signup', 'bob', 'bob-pw'));

  // Consent: alice asks; bob's page shows her request (its profile refresh) and he accepts.
  await a.page.fill('#friend-name', 'bob');
  await a.page.click('#friend-add');
  await a.page.waitForSelector('#friend-notice:not([hidden])');
  await b.page.click('#friend-requests button.accept', { timeout: 20000 });
  await b.page.waitForSelector(friendButton('alice'));
  await a.page.waitForSelector(friendButton('bob'), { timeout: 20000 }); // a's refresh finds the friend
  log('friends');
  await presenceOf(a, 'bob', 'online');
  await presenceOf(b, 'alice', 'online');
  log('each sees the other online');

  await open(a, friendButton('bob'));
  await send(a, 'hello bob');
  await open(b, friendButton('alice'));
  await sees(b, 'hello bob');
  await send(b, 'hi alice');
  await sees(a, 'hi alice');
  await send(a, 'how are you?');
  await sees(b, 'how are you?');
  const direct = ['hello bob', 'hi alice', 'how are you?'];
  assertConversation(await conversation(a), direct, 'alice');
  assertConversation(await conversation(b), direct, 'bob');
  log('1:1 messages both ways, in order, once each');

  // A second tab of alice is a second device with the same history.
  const a2 = await openDevice(browser, 'alice-tab2', url);
  const who2 = await enter(a2, 'login', 'alice', 'alice-pw');
  const who1 = await a.page.textContent('#whoami');
  if (who1 === who2) throw new Error(`two tabs, one device: ${who1}`);
  await open(a2, friendButton('bob'));
  await sees(a2, 'how are you?');
  assertConversation(await conversation(a2), direct, 'alice tab 2');
  await a2.context.close();
  pages.delete('alice-tab2');
  log('second tab:', who2, 'sees the history');

  // A refusal is shown with its code.
  await b.page.fill('#friend-name', 'nobody');
  await b.page.click('#friend-add');
  await b.page.waitForSelector('#error[data-code="unknown_user"]', { state: 'visible' });
  await b.page.click('#error-dismiss');
  log('unknown_user refusal shown');

  await a.page.fill('#group-name', 'team');
  await a.page.fill('#group-members', 'bob');
  await a.page.click('#group-create');
  await a.page.waitForSelector(`#conv-title:text-is("team")`);
  await send(a, 'group hello');
  // Consent: bob is invited; his page lists the invitation (its profile refresh) and he joins.
  await b.page.click('#group-invites button.join', { timeout: 20000 });
  await b.page.waitForSelector(groupButton('team'));
  await open(b, groupButton('team'));
  await sees(b, 'group hello');
  await send(b, 'group reply');
  await sees(a, 'group reply');
  assertConversation(await conversation(a), ['group hello', 'group reply'], 'alice (group)');
  log('group messages both ways');

  const closedAt = Date.now();
  await a.context.close();
  pages.delete('alice');
  await presenceOf(b, 'alice', 'offline', OFFLINE_WITHIN_MS);
  log(`bob saw alice go offline ${((Date.now() - closedAt) / 1000).toFixed(1)} s after her browser closed`);
  if (pageErrors.length) throw new Error('uncaught page errors:\n' + pageErrors.join('\n'));
}

async function main() {
  if (!CHATD || !fs.existsSync(CHATD)) throw new Error('give the chatd binary: CHATD_BIN=... or an argument');
  const base = await freeBase();
  const dataDir = path.join(artifacts, 'data');
  const server = startChatd(base, dataDir);
  log(`chatd at ${server.url} (ports ${base}..${base + 11}), artifacts in ${artifacts}`);
  let browser;
  let failed = null;
  let timer;
  try {
    const ca = await waitReady(server);
    const trust = `--ignore-certificate-errors-spki-list=${spkiPin(ca)}`;
    browser = await chromium.launch({ executablePath: CHROMIUM, args: [...CHROMIUM_ARGS, trust], headless: true });
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`test timed out after ${TEST_TIMEOUT_MS} ms`)), TEST_TIMEOUT_MS);
    });
    await Promise.race([scenario(browser, server.url), timeout]);
    if (wsUrls.length === 0) throw new Error('the pages opened no WebSocket');
    const plain = wsUrls.filter((u) => !u.startsWith('wss://'));
    if (plain.length) throw new Error(`WebSockets without TLS: ${plain.join(', ')}`);
    log(`${wsUrls.length} WebSocket connections, all wss://`);
  } catch (e) {
    failed = e;
  } finally {
    clearTimeout(timer);
    if (failed) {
      for (const [label, page] of pages) {
        const file = path.join(artifacts, `${label}.png`);
        try { await page.screenshot({ path: file, fullPage: true }); console.error(`screenshot: ${file}`); } catch (_) { /* closed */ }
      }
    }
    if (browser) await browser.close();
    server.child.stopping = true;
    server.child.kill('SIGKILL');
  }
  if (failed) {
    console.error(`\nFAIL: ${failed.stack || failed}`);
    if (pageErrors.length) console.error('page errors:\n' + pageErrors.join('\n'));
    console.error(`artifacts (screenshots, chatd.log, data): ${artifacts}`);
    process.exit(1);
  }
  fs.rmSync(artifacts, { recursive: true, force: true });
  log('PASS');
}

main();
