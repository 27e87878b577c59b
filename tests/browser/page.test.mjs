// The web page in a real browser: headless Chromium (Debian's, driven by playwright-core) loads
// allot's page, buys a product with the Buy button and sees the transaction go from pending to
// its order number, the stock fall and the order counter move; orders two products together
// from the basket; watches a sale's countdown reach its start; signs up, buys and orders as the
// account and finds both in "My orders"; holds a product with a delivery slot, sees its
// countdown, checks it out, holds again and cancels. Screenshots are kept.
//
// Environment: ALLOT_BASE_URL (a running allot), ALLOT_ADMIN_TOKEN (to create the product),
// ALLOT_ARTIFACTS (where the screenshot goes), CHROMIUM (default /usr/bin/chromium).
// Run by deploy/local.sh test: node --test page.test.mjs

import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtemp, mkdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { chromium } from "playwright-core";

const baseUrl = process.env.ALLOT_BASE_URL ?? "http://127.0.0.1:8080";
const adminToken = process.env.ALLOT_ADMIN_TOKEN ?? "";
const artifacts = process.env.ALLOT_ARTIFACTS ?? path.resolve("artifacts");
const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TIMEOUT_MS = 20_000;

async function createProduct(name, stock, rules = {}) {
  const response = await fetch(`${baseUrl}/api/v1/products`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${adminToken}` },
    body: JSON.stringify({ name, stock, ...rules }),
  });
  assert.equal(response.status, 201, "the product is created");
  return response.json();
}

async function createSlot(name, capacity) {
  const response = await fetch(`${baseUrl}/api/v1/slots`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: `Bearer ${adminToken}` },
    body: JSON.stringify({ name, capacity }),
  });
  assert.equal(response.status, 201, "the slot is created");
  return response.json();
}

async function launch() {
  const userDataDir = await mkdtemp(path.join(tmpdir(), "allot-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1100, height: 800 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(TIMEOUT_MS);
  const close = async () => {
    await context.close();
    await rm(userDataDir, { recursive: true, force: true });
  };
  return { page, close };
}

async function screenshot(page, name) {
  await mkdir(artifacts, { recursive: true });
  const file = path.join(artifacts, name);
  await page.screenshot({ path: file, fullPage: true });
  console.log(`screenshot: ${file}`);
}

test("a buyer buys on the web page and sees the order number appear", { timeout: 90_000 }, async () => {
  const product = await createProduct(`Browser sneaker ${Date.now()}`, 1);
  const { page, close } = await launch();
  try {
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    const requested = [];
    page.on("request", (request) => requested.push(new URL(request.url()).pathname));

    await page.goto(`${baseUrl}/`);
    const row = page.locator(`tr[data-product-id="${product.id}"]`);
    await row.waitFor();
    assert.equal(await row.locator(".name").textContent(), product.name);
    assert.equal(await row.locator(".stock").textContent(), "1");
    const ordersBefore = Number(await page.locator("#orders").textContent());

    // Record every status the purchase shows, to see it go from pending to final.
    await page.evaluate(() => {
      window.statusesSeen = [];
      new MutationObserver(() => {
        const item = document.querySelector("#purchases li");
        const last = window.statusesSeen.at(-1);
        if (item && item.dataset.status !== last) window.statusesSeen.push(item.dataset.status);
      }).observe(document.getElementById("purchases"), { subtree: true, attributes: true, childList: true });
    });

    await page.fill("#user-id", "4242");
    await row.locator("button.buy").click();

    const orderNumber = page.locator("#purchases li[data-status='succeeded'] .order-number");
    await orderNumber.waitFor();
    const number = await orderNumber.textContent();
    assert.match(number, /^\d{8}-\d{5,}$/, "an order number YYYYMMDD-nnnnn");
    const statuses = await page.evaluate(() => window.statusesSeen);
    assert.equal(statuses[0], "pending", `shown pending first (${statuses})`);
    assert.equal(statuses.at(-1), "succeeded");

    // The transaction the page shows is the one allot stored.
    const id = await page.locator("#purchases li").first().getAttribute("data-transaction-id");
    const stored = await (await fetch(`${baseUrl}/api/v1/transaction/${id}`)).json();
    assert.equal(stored.order_number, number);
    assert.equal(stored.user_id, 4242);
    assert.ok(requested.includes(`/api/v1/transaction/${id}/events`), "the page watched the events");
    assert.ok(requested.every((pathname) => !pathname.startsWith("http")), "nothing from elsewhere");

    // Live stock and counter: the last unit is gone and the counter moved.
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .stock`).textContent === "0",
      product.id,
    );
    assert.equal(await row.locator("button.buy").isDisabled(), true, "sold out: no Buy button");
    await page.waitForFunction((before) => Number(document.getElementById("orders").textContent) > before, ordersBefore);

    await screenshot(page, "web-page.png");
    assert.deepEqual(pageErrors, [], "no JavaScript errors");
  } finally {
    await close();
  }
});

test("a buyer signs up on the page, buys as the account and sees the order in My orders", { timeout: 90_000 }, async () => {
  const product = await createProduct(`Account sneaker ${Date.now()}`, 5);
  const username = `browser-${Date.now().toString(36)}`;
  const { page, close } = await launch();
  try {
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(`${baseUrl}/`);
    assert.equal(await page.locator("#my-orders-section").isHidden(), true, "no orders before login");

    await page.fill("#username", username);
    await page.fill("#password", "correct horse battery");
    await page.click("#sign-up");
    await page.locator("#logged-in").waitFor();
    assert.equal(await page.locator("#who").textContent(), username);
    const userId = Number(await page.locator("#who-id").textContent());
    assert.ok(userId >= 1e15, `an account id: ${userId}`);
    assert.equal(await page.locator("#anonymous-id").isHidden(), true, "no user id to type");
    assert.equal(await page.locator("#login-form").isHidden(), true, "no login form once logged in");

    const row = page.locator(`tr[data-product-id="${product.id}"]`);
    await row.waitFor();
    await row.locator("button.buy").click();
    const orderNumber = page.locator("#purchases li[data-status='succeeded'] .order-number");
    await orderNumber.waitFor();
    const number = await orderNumber.textContent();
    const id = await page.locator("#purchases li").first().getAttribute("data-transaction-id");

    // My orders lists it, decided, with its order number.
    const order = page.locator(`#my-orders tr[data-transaction-id="${id}"][data-status="succeeded"]`);
    await order.waitFor();
    assert.match(await order.locator(".state").textContent(), new RegExp(number));
    assert.equal(await order.locator("td").nth(1).textContent(), product.name);

    // The transaction is the account's, and not readable without its token.
    const anonymous = await fetch(`${baseUrl}/api/v1/transaction/${id}`);
    assert.equal(anonymous.status, 404, "an account's transaction needs its token");
    const staff = await (await fetch(`${baseUrl}/api/v1/transaction/${id}`, {
      headers: { Authorization: `Bearer ${adminToken}` },
    })).json();
    assert.equal(staff.user_id, userId);
    assert.equal(staff.order_number, number);

    // An order of two products from the basket, as the account: My orders lists it with both.
    const second = await createProduct(`Account scarf ${Date.now()}`, 5);
    for (const id of [product.id, second.id]) {
      const productRow = page.locator(`tr[data-product-id="${id}"]`);
      await productRow.waitFor();
      await productRow.locator("button.add").click();
    }
    await page.click("#place-order");
    await page.waitForFunction(() => {
      const items = document.querySelectorAll("#purchases li");
      return items.length === 2 && items[0].dataset.status !== "pending";
    });
    const placed = page.locator("#purchases li").first();
    assert.equal(await placed.getAttribute("data-status"), "succeeded");
    const orderId = await placed.getAttribute("data-transaction-id");
    const basketOrder = page.locator(`#my-orders tr[data-transaction-id="${orderId}"][data-status="succeeded"]`);
    await basketOrder.waitFor();
    assert.equal(await basketOrder.locator("td").nth(1).textContent(), `${product.name}, ${second.name}`);
    const storedOrder = await (await fetch(`${baseUrl}/api/v1/transaction/${orderId}`, {
      headers: { Authorization: `Bearer ${adminToken}` },
    })).json();
    assert.equal(storedOrder.user_id, userId, "ordered as the account");
    assert.deepEqual(storedOrder.items, [
      { product_id: product.id, quantity: 1 },
      { product_id: second.id, quantity: 1 },
    ]);

    await screenshot(page, "web-page-account.png");
    await page.click("#log-out");
    await page.locator("#login-form").waitFor();
    assert.equal(await page.locator("#my-orders-section").isHidden(), true);
    assert.deepEqual(pageErrors, [], "no JavaScript errors");
  } finally {
    await close();
  }
});

test("a buyer orders two products together from the basket", { timeout: 90_000 }, async () => {
  const first = await createProduct(`Basket cap ${Date.now()}`, 2);
  const second = await createProduct(`Basket scarf ${Date.now()}`, 2);
  const { page, close } = await launch();
  try {
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(`${baseUrl}/`);
    await page.fill("#user-id", "4343");
    for (const product of [first, second]) {
      const row = page.locator(`tr[data-product-id="${product.id}"]`);
      await row.locator("button.add").click();
      assert.equal(await row.locator("button.add").isDisabled(), true, "each product once");
    }
    assert.equal(await page.locator("#basket-lines li").count(), 2);
    await page.fill(`#basket-lines li[data-product-id="${second.id}"] input.quantity`, "2");
    await page.click("#place-order");
    assert.equal(await page.locator("#basket-lines li").count(), 0, "the basket is emptied");

    const orderNumber = page.locator("#purchases li[data-status='succeeded'] .order-number");
    await orderNumber.waitFor();
    const id = await page.locator("#purchases li").first().getAttribute("data-transaction-id");
    const stored = await (await fetch(`${baseUrl}/api/v1/transaction/${id}`)).json();
    assert.equal(stored.order_number, await orderNumber.textContent());
    assert.deepEqual(stored.items, [
      { product_id: first.id, quantity: 1 },
      { product_id: second.id, quantity: 2 },
    ]);
    assert.equal(stored.user_id, 4343);
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .stock`).textContent === "0",
      second.id,
    );
    assert.equal(await page.locator(`tr[data-product-id="${first.id}"] .stock`).textContent(), "1");
    await screenshot(page, "web-page-basket.png");
    assert.deepEqual(pageErrors, [], "no JavaScript errors");
  } finally {
    await close();
  }
});

test("a sale that has not started counts down, then opens", { timeout: 90_000 }, async () => {
  const { page, close } = await launch();
  try {
    // Created once the browser runs, so that the page sees the countdown however slow the launch.
    const startsAt = new Date(Date.now() + 8_000);
    const product = await createProduct(`Countdown drop ${Date.now()}`, 1, {
      sale_starts_at: startsAt.toISOString(),
      max_per_buyer: 1,
    });
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(`${baseUrl}/`);
    const row = page.locator(`tr[data-product-id="${product.id}"]`);
    await row.waitFor();
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .sale`).textContent.startsWith("opens in"),
      product.id,
    );
    assert.match(await row.locator(".sale").textContent(), /^opens in 00:00:0[1-8] · max 1 per buyer$/);
    assert.equal(await row.locator("button.buy").isDisabled(), true, "no buying before the start");

    // The countdown ticks down to the start, and the Buy button opens.
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .sale`).textContent.startsWith("on sale"),
      product.id,
      { timeout: 20_000 },
    );
    assert.ok(Date.now() >= startsAt.getTime() - 1_000, "opened at its start");
    await page.fill("#user-id", "4444");
    await row.locator("button.buy").click();
    await page.locator("#purchases li[data-status='succeeded'] .order-number").waitFor();
    assert.deepEqual(pageErrors, [], "no JavaScript errors");
  } finally {
    await close();
  }
});

test("a buyer holds a product with a delivery slot, checks it out, then holds and cancels", { timeout: 90_000 }, async () => {
  const product = await createProduct(`Held sneaker ${Date.now()}`, 3);
  const slot = await createSlot(`Browser slot ${Date.now()}`, 1);
  const { page, close } = await launch();
  try {
    const pageErrors = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(`${baseUrl}/`);
    await page.fill("#user-id", "4545");
    const slotRow = page.locator(`#slots tr[data-slot-id="${slot.id}"]`);
    await slotRow.waitFor();
    assert.equal(await slotRow.locator(".remaining").textContent(), "1");
    await page.check("#hold");
    await page.fill("#hold-seconds", "120");
    await page.selectOption("#slot", String(slot.id));
    const row = page.locator(`tr[data-product-id="${product.id}"]`);
    await row.locator("button.buy").click();

    // Held: a countdown, Check out and Cancel; the stock and the slot's place are taken.
    const held = page.locator("#purchases li[data-status='held']").first();
    await held.waitFor();
    assert.match(await held.locator(".state").textContent(), /^held · expires in 00:0[12]:\d\d$/);
    const id = await held.getAttribute("data-transaction-id");
    const stored = await (await fetch(`${baseUrl}/api/v1/transaction/${id}`)).json();
    assert.equal(stored.status, "held");
    assert.equal(stored.hold_seconds, 120);
    assert.equal(stored.slot_id, slot.id);
    assert.ok(Date.parse(stored.expires_at) > Date.now(), "expires later");
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .stock`).textContent === "2",
      product.id,
    );
    await page.waitForFunction(
      (slotId) => document.querySelector(`#slots tr[data-slot-id="${slotId}"] .held`).textContent === "1",
      slot.id,
    );
    assert.equal(await slotRow.locator(".remaining").textContent(), "0");
    assert.equal(await page.locator(`#slot option[value="${slot.id}"]`).isDisabled(), true, "a full slot cannot be chosen");
    await screenshot(page, "web-page-hold.png");

    await held.locator("button.checkout").click();
    const number = page.locator(`#purchases li[data-transaction-id="${id}"][data-status="succeeded"] .order-number`);
    await number.waitFor();
    const checkedOut = await (await fetch(`${baseUrl}/api/v1/transaction/${id}`)).json();
    assert.equal(checkedOut.order_number, await number.textContent());
    await page.waitForFunction(
      (slotId) => document.querySelector(`#slots tr[data-slot-id="${slotId}"] .taken`).textContent === "1",
      slot.id,
    );

    // Another hold, without a slot, cancelled: its unit comes back.
    await page.selectOption("#slot", "");
    await row.locator("button.buy").click();
    const second = page.locator("#purchases li[data-status='held']").first();
    await second.waitFor();
    const secondId = await second.getAttribute("data-transaction-id");
    await second.locator("button.cancel").click();
    const cancelled = page.locator(`#purchases li[data-transaction-id="${secondId}"][data-status="rejected"] .state`);
    await cancelled.waitFor();
    assert.equal(await cancelled.textContent(), "rejected: cancelled");
    await page.waitForFunction(
      (productId) => document.querySelector(`tr[data-product-id="${productId}"] .stock`).textContent === "2",
      product.id,
    );
    assert.deepEqual(pageErrors, [], "no JavaScript errors");
  } finally {
    await close();
  }
});

test("the API docs page renders every operation from the served document", { timeout: 60_000 }, async () => {
  const { page, close } = await launch();
  try {
    const document = await (await fetch(`${baseUrl}/api-docs/openapi.json`)).json();
    const operations = Object.values(document.paths).reduce((n, item) => n + Object.keys(item).length, 0);
    const offSite = [];
    page.on("request", (request) => {
      if (!request.url().startsWith(baseUrl)) offSite.push(request.url());
    });
    await page.goto(`${baseUrl}/docs/`);
    await page.locator(".swagger-ui .opblock").nth(operations - 1).waitFor();
    assert.equal(await page.locator(".swagger-ui .opblock").count(), operations);
    assert.deepEqual(offSite, [], "Swagger UI loads nothing from elsewhere");
    await screenshot(page, "docs-page.png");
  } finally {
    await close();
  }
});
