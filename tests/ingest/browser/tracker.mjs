// Drives Debian's /usr/bin/chromium through playwright-core against ingest's demo storefront.
// Usage: node tests/ingest/browser/tracker.mjs BASE_URL  → prints one JSON object with each scenario's ids.
import { chromium } from "playwright-core";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const base = process.argv[2];
const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run"];

async function withBrowser(fn) {
  const dir = mkdtempSync(join(tmpdir(), "loyalist-chromium-"));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: "/usr/bin/chromium", headless: true, args: ["--headless", ...ARGS],
  });
  const batches = [];
  context.on("request", (r) => { if (r.url().includes("/v1/batch")) batches.push(r.method()); });
  try {
    const page = context.pages()[0] || (await context.newPage());
    return await fn(page, context, batches);
  } finally {
    await context.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

async function drained(page, timeoutMs = 40000) {
  await page.evaluate(() => loyalist.flush());
  await page.waitForFunction(() => window.loyalist && loyalist.queued() === 0, null, { timeout: timeoutMs });
}

async function anonCookie(context) {
  const cookies = await context.cookies();
  const c = cookies.find((x) => x.name === "lo_anon_id");
  return c ? decodeURIComponent(c.value) : null;
}

const result = {};

// Browse → product → add to cart → checkout → sign in.
result.journey = await withBrowser(async (page, context) => {
  await page.goto(`${base}/demo/store`);
  const anonymousId = await page.evaluate(() => loyalist.anonymousId());
  await page.click("#view-MUG-01");
  await page.waitForSelector("#add");
  await page.click("#add");
  await page.click("#checkout");
  await page.waitForSelector("#checkout-started");
  await page.fill("#email", "ada@example.com");
  await page.click("#signin-button");
  await page.waitForSelector("#signed-in");
  await drained(page);
  const user = await page.evaluate(() => loyalist.user());
  return { anonymousId, afterSignIn: user, cookie: await anonCookie(context),
           stored: await page.evaluate(() => localStorage.getItem("lo_anon_id")) };
});

// Offline: calls queue in localStorage, go out when the browser is back online.
result.offline = await withBrowser(async (page, context) => {
  await page.goto(`${base}/demo/store`);
  await drained(page);
  await context.setOffline(true);
  await page.evaluate(() => loyalist.track("Offline Event", { n: 1 }));
  await page.waitForTimeout(2500);  // past the flush interval: the flush finds the browser offline
  const queuedWhileOffline = await page.evaluate(() => loyalist.queued());
  await context.setOffline(false);
  await drained(page);
  return { anonymousId: await page.evaluate(() => loyalist.anonymousId()), queuedWhileOffline };
});

// Leaving the page before the flush interval: sendBeacon on pagehide delivers.
result.beacon = await withBrowser(async (page) => {
  await page.goto(`${base}/demo/store`);
  await drained(page);
  const anonymousId = await page.evaluate(() => { loyalist.track("Beacon Event", { last: true }); return loyalist.anonymousId(); });
  await page.goto("about:blank");
  await page.waitForTimeout(500);
  return { anonymousId };
});

// Consent required: nothing stored or sent before "Accept"; the held page call goes out after it.
result.consent = await withBrowser(async (page, context, batches) => {
  await page.goto(`${base}/demo/store?consent=required`);
  await page.waitForTimeout(2500);
  const before = { requests: batches.length, cookie: await anonCookie(context),
                   anonymousId: await page.evaluate(() => loyalist.anonymousId()),
                   queue: await page.evaluate(() => localStorage.getItem("lo_queue")) };
  await page.click("#accept");
  await drained(page);
  return { before, anonymousId: await page.evaluate(() => loyalist.anonymousId()), requestsAfter: batches.length };
});

// Consent declined: still nothing.
result.declined = await withBrowser(async (page, context, batches) => {
  await page.goto(`${base}/demo/store?consent=required`);
  await page.click("#decline");
  await page.evaluate(() => loyalist.track("Should Not Send"));
  await page.waitForTimeout(2500);
  return { requests: batches.length, cookie: await anonCookie(context) };
});

console.log(JSON.stringify(result));
