// Shared helpers for the browser scenarios: launch the system Chromium, open ComfyUI with its real
// frontend, block every request that is not to the local server, print one JSON result line.
'use strict';
const path = require('path');
const { chromium } = require(path.join(__dirname, '..', '..', 'node_modules', 'playwright-core'));

const ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];

async function settle(page, ms = 150) {
  // two animation frames plus a short pause: litegraph draws and DOM widgets follow on frames
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
  await page.waitForTimeout(ms);
}

/** Opens ComfyUI at `url`; `settings` ({id: value}) are written to the user's settings before the page loads,
 * as the settings dialog would (e.g. {'Comfy.VueNodes.Enabled': true} for the Vue node renderer). */
async function openComfy(url, { viewport = { width: 1400, height: 1000 }, settings = {} } = {}) {
  const browser = await chromium.launch({
    executablePath: process.env.CONES2_CHROMIUM || '/usr/bin/chromium', headless: true, args: ARGS,
  });
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  const origin = new URL(url).origin;
  await context.route('**/*', (route) => {
    const u = route.request().url();
    if (u.startsWith(origin) || u.startsWith('data:') || u.startsWith('blob:')) return route.continue();
    return route.abort();   // no network: fonts, release notes, telemetry
  });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e && e.stack || e)));
  page.on('console', (m) => {
    if (m.type() === 'error' && /cones2/i.test(m.text())) errors.push(m.text());
  });
  // first-run template dialog off
  for (const [id, value] of Object.entries({ 'Comfy.TutorialCompleted': true, ...settings })) {
    const res = await page.request.post(`${url}/settings/${encodeURIComponent(id)}`, { data: value });
    if (!res.ok()) throw new Error(`could not set ${id}: HTTP ${res.status()}`);
  }
  await gotoComfy(page, url);
  return { browser, context, page, errors };
}

async function gotoComfy(page, url) {
  await page.goto(url);
  try {
    await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas && window.LiteGraph
      && window.app.extensionManager && window.app.extensions?.some((e) => e.name === 'cones2.layout'),
    null, { timeout: 60000 });
  } catch (e) {
    const seen = await page.evaluate(() => ({
      app: !!(window.app && window.app.graph),
      extensions: (window.app?.extensions || []).map((x) => x.name).filter((n) => /cones2/i.test(n)),
    })).catch(() => null);
    throw new Error(`ComfyUI did not come up with the cones2.layout extension within 60 s: ${JSON.stringify(seen)}`
      + ' (is web/js/cones2_layout.js served under /extensions/comfyui-cones2/ and free of errors?)');
  }
  await settle(page, 300);
}

function emit(result) {
  process.stdout.write('\nRESULT ' + JSON.stringify(result) + '\n');
}

function run(main) {
  main().then((r) => { emit(r); process.exit(0); }, (e) => {
    emit({ fatal: String(e && e.stack || e) });
    process.exit(1);
  });
}

module.exports = { openComfy, gotoComfy, settle, emit, run };
