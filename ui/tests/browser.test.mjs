// Drives the key settings page in headless Chromium against a running admin
// listener, and checks that no plaintext key leaves the browser.
//
// admin/ui_browser_test.go starts the listener (real Redis, emulated
// providers) and runs this file with these environment variables:
//   UI_URL         the page, such as http://127.0.0.1:PORT/ui/
//   ADMIN_TOKEN    the admin token
//   UI_KEYS        JSON: {"anthropic":[accepted, rejected], "openai":[accepted, rejected], "google":[accepted]}
//   CHROMIUM       the browser executable (default /usr/bin/chromium)
//   SCREENSHOT     where to write a PNG of the final state; a PNG of the
//                  sign-in page after sign-out goes beside it as ui-signin.png
//   REQUESTS_FILE  where to write every request the browser made, as JSON
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) {
    throw new Error(`${name} is not set; run this file through go test ./admin -run TestUIBrowser`);
  }
  return value;
};

const pageURL = env("UI_URL");
const adminToken = env("ADMIN_TOKEN");
const keys = JSON.parse(env("UI_KEYS"));
const executablePath = env("CHROMIUM", "/usr/bin/chromium");
const screenshotPath = env("SCREENSHOT");
const requestsFile = env("REQUESTS_FILE");
const mailbox = "ui-browser+test@example.com";

const prefixes = { anthropic: "sk-ant-", openai: "sk-", google: "AIza" };
const last4 = (key) => key.slice(-4);

// Strings that must appear in no request, response or page text: each key
// whole, a run of its random middle, and the start of OpenAI's masked form
// (first six characters, then asterisks). Each key's last four may be shown.
const badInputs = {
  anthropicAsOpenAI: keys.anthropic[0],
  shortGoogle: "AIza" + "Q".repeat(10),
  wrongPrefix: "sk-live-ABCDEFGH12345678",
};
const secrets = [];
for (const [provider, list] of Object.entries(keys)) {
  for (const key of list) {
    secrets.push(key, key.slice(prefixes[provider].length, prefixes[provider].length + 8), key.slice(0, 6) + "*");
  }
}
secrets.push(badInputs.shortGoogle, badInputs.wrongPrefix);

const wait = { timeout: 15_000 };

// step reports progress, so that a timeout shows how far the test got.
const step = (name) => process.stderr.write(`step: ${name}\n`);

test("key settings page keeps keys in the browser", { timeout: 180_000 }, async () => {
  const userDataDir = mkdtempSync(join(tmpdir(), "byokproxy-ui-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath,
    headless: true,
    viewport: { width: 1280, height: 900 },
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
  const requests = [];
  const responses = [];
  const pageErrors = [];
  context.on("request", (req) => {
    requests.push({ method: req.method(), url: req.url(), headers: req.headers(), postData: req.postData() ?? "" });
  });
  context.on("response", (res) => {
    const record = { url: res.url(), status: res.status(), headers: res.headers(), body: "" };
    // A body can be gone once its page was reloaded, so reading it is
    // bounded in time.
    const body = Promise.race([res.text(), new Promise((resolve) => setTimeout(resolve, 5_000, ""))]);
    responses.push(body.then((text) => ({ ...record, body: text }), () => record));
  });

  try {
    const page = context.pages()[0] ?? (await context.newPage());
    page.on("pageerror", (err) => pageErrors.push(`page error: ${err.message}`));
    page.on("console", (msg) => {
      if (/Content Security Policy|Refused to/i.test(msg.text())) {
        pageErrors.push(`CSP violation: ${msg.text()}`);
      }
    });

    const card = (provider) => page.locator(`article[data-provider="${provider}"]`);
    const field = (provider, role) => card(provider).locator(`[data-role="${role}"]`);
    const button = (provider, action) => card(provider).locator(`[data-action="${action}"]`);
    const sourceButton = (provider, source) => card(provider).locator(`[data-source="${source}"]`);
    const keyInput = (provider) => card(provider).locator("input[type=password]");
    const expectText = (locator, text) => locator.filter({ hasText: text }).waitFor(wait);
    const escapeRegExp = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    // Matches the whole text, where expectText matches any part of it.
    const expectExactText = (locator, text) =>
      locator.filter({ hasText: new RegExp(`^\\s*${escapeRegExp(text)}\\s*$`) }).waitFor(wait);
    const keyPuts = () => requests.filter((r) => r.method === "PUT" && r.url.endsWith("/key"));

    const signInWith = async (token) => {
      await page.locator("#admin-token").fill(token);
      await page.locator("#signin-form button[type=submit]").click();
    };
    const save = async (provider, key) => {
      await keyInput(provider).fill(key);
      await button(provider, "save").click();
    };

    // Sign in, first with a wrong token.
    step("Sign in, first with a wrong token");
    await page.goto(pageURL);
    await page.locator("#admin-token").waitFor(wait);
    await signInWith("wrong-admin-token");
    await expectText(page.locator('[data-role="signin-message"]'), "Invalid admin token");
    await signInWith(adminToken);
    await page.locator("#mailbox-id").waitFor(wait);

    // An invalid mailbox id is caught before any request.
    step("An invalid mailbox id is caught before any request");
    await page.locator("#mailbox-id").fill("not a mailbox");
    await page.locator("#mailbox-id").press("Enter");
    await expectText(page.locator('[data-role="mailbox-message"]'), "1 to 128");

    await page.locator("#mailbox-id").fill(mailbox);
    await page.locator("#mailbox-id").press("Enter");
    await expectText(page.locator('[data-role="mailbox-name"]'), mailbox);
    for (const provider of ["anthropic", "openai", "google"]) {
      await expectText(field(provider, "source-badge"), "Shared pool");
      await expectText(field(provider, "last4"), "None");
      assert.equal(await sourceButton(provider, "byok").isDisabled(), true, `${provider}: own key selectable without a key`);
      assert.equal(await button(provider, "test").isDisabled(), true, `${provider}: test enabled without a key`);
      assert.equal(await button(provider, "remove").isDisabled(), true, `${provider}: remove enabled without a key`);
      const input = keyInput(provider);
      assert.equal(await input.getAttribute("autocomplete"), "off");
      assert.equal(await input.getAttribute("spellcheck"), "false");
    }

    // Keys of the wrong format are caught in the browser and never sent.
    step("Keys of the wrong format are caught in the browser and never sent");
    await save("openai", badInputs.anthropicAsOpenAI);
    await expectText(field("openai", "message"), "This is an Anthropic key");
    await save("google", badInputs.shortGoogle);
    await expectText(field("google", "message"), "39 characters");
    await save("anthropic", badInputs.wrongPrefix);
    await expectText(field("anthropic", "message"), 'starts with "sk-ant-"');
    assert.equal(keyPuts().length, 0, "a key of the wrong format was sent");

    // Store a key per provider; only its last four come back.
    step("Store a key per provider; only its last four come back");
    for (const provider of ["anthropic", "openai", "google"]) {
      const key = keys[provider][0];
      await save(provider, key);
      await expectText(field(provider, "last4"), `•••• ${last4(key)}`);
      await expectText(field(provider, "message"), "Key saved");
      assert.equal(await keyInput(provider).inputValue(), "", `${provider}: input not cleared after save`);
      assert.match(await field(provider, "updated").innerText(), /^\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC$/);
    }
    const puts = keyPuts();
    assert.equal(puts.length, 3);
    for (const put of puts) {
      const body = JSON.parse(put.postData);
      assert.deepEqual(Object.keys(body), ["age"], `${put.url}: body has fields other than "age"`);
      assert.match(body.age, /^-----BEGIN AGE ENCRYPTED FILE-----\n[A-Za-z0-9+/=\n]+-----END AGE ENCRYPTED FILE-----\n?$/);
      assert.ok(put.headers["x-csrf-token"], `${put.url}: no CSRF header`);
    }

    // Switch sources.
    step("Switch sources");
    for (const provider of ["anthropic", "openai", "google"]) {
      await sourceButton(provider, "byok").click();
      await expectText(field(provider, "source-badge"), "Own key");
    }
    await sourceButton("google", "shared").click();
    await expectText(field("google", "source-badge"), "Shared pool");
    await sourceButton("google", "byok").click();
    await expectText(field("google", "source-badge"), "Own key");

    // A reload keeps the session and the mailbox, and shows the stored state.
    step("A reload keeps the session and the mailbox, and shows the stored state");
    await page.reload();
    await expectText(page.locator('[data-role="mailbox-name"]'), mailbox);
    for (const provider of ["anthropic", "openai", "google"]) {
      await expectText(field(provider, "source-badge"), "Own key");
      await expectText(field(provider, "last4"), `•••• ${last4(keys[provider][0])}`);
    }

    // A lost session sends the operator back to sign-in with a message.
    step("A lost session sends the operator back to sign-in with a message");
    await context.clearCookies();
    await button("openai", "test").click();
    await expectText(page.locator('[data-role="signin-message"]'), "Your session has ended");
    await signInWith(adminToken);
    await expectText(page.locator('[data-role="mailbox-name"]'), mailbox);

    // Test each key against the emulated providers.
    step("Test each key against the emulated providers");
    for (const provider of ["anthropic", "openai", "google"]) {
      await button(provider, "test").click();
      await expectText(field(provider, "message"), "Key works");
      await expectText(field(provider, "message"), "HTTP 200");
    }

    // Rotate: the new key's last four replace the old. The emulators reject
    step("Rotate keys");
    // the new keys, so the tests fail with the provider's message.
    await save("openai", keys.openai[1]);
    await expectText(field("openai", "last4"), `•••• ${last4(keys.openai[1])}`);
    await button("openai", "test").click();
    await expectText(field("openai", "message"), "Test failed: OpenAI responded with HTTP 401");
    await expectText(field("openai", "message"), "Incorrect API key provided");
    await save("openai", keys.openai[0]);
    await expectText(field("openai", "last4"), `•••• ${last4(keys.openai[0])}`);
    await button("openai", "test").click();
    await expectText(field("openai", "message"), "Key works");

    await save("anthropic", keys.anthropic[1]);
    await expectText(field("anthropic", "last4"), `•••• ${last4(keys.anthropic[1])}`);
    await expectText(field("anthropic", "source-badge"), "Own key");
    await button("anthropic", "test").click();
    await expectText(field("anthropic", "message"), "Test failed: Anthropic responded with HTTP 401");
    await expectText(field("anthropic", "message"), "invalid x-api-key");

    // Remove needs a confirmation; Cancel keeps the key.
    step("Remove needs a confirmation; Cancel keeps the key");
    await button("google", "remove").click();
    await card("google").locator('[data-role="confirm"]').waitFor(wait);
    await button("google", "cancel-remove").click();
    await expectText(field("google", "last4"), `•••• ${last4(keys.google[0])}`);
    await button("google", "remove").click();
    await button("google", "confirm-remove").click();
    await expectText(field("google", "last4"), "None");
    await expectText(field("google", "source-badge"), "Shared pool");
    assert.equal(await sourceButton("google", "byok").isDisabled(), true);
    assert.equal(await button("google", "test").isDisabled(), true);

    // The ids "." and ".." are valid, but a browser drops them from a
    // request path, so the page declines them without a request.
    step("Mailbox ids made of dots are declined");
    for (const id of [".", ".."]) {
      const before = requests.length;
      await page.locator("#mailbox-id").fill(id);
      await page.locator("#mailbox-id").press("Enter");
      await expectText(page.locator('[data-role="mailbox-message"]'), `The mailbox id "${id}" cannot be managed from this page`);
      assert.deepEqual(requests.slice(before).map((r) => r.url), [], `the page sent requests for mailbox "${id}"`);
      await expectExactText(page.locator('[data-role="mailbox-name"]'), mailbox);
    }
    await page.locator("#mailbox-id").fill(mailbox);
    await page.locator("#mailbox-id").press("Enter");
    await page.locator('[data-role="mailbox-message"]').waitFor({ state: "hidden", ...wait });

    const text = await page.locator("body").innerText();
    for (const secret of secrets) {
      assert.ok(!text.includes(secret), "the page shows more of a key than its last four");
    }
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await page.screenshot({ path: screenshotPath, fullPage: true });

    // Sign out ends the session.
    step("Sign out ends the session");
    await page.locator("#sign-out").click();
    await expectText(page.locator('[data-role="signin-message"]'), "You are signed out");
    await page.screenshot({ path: join(dirname(screenshotPath), "ui-signin.png") });
    const status = await page.evaluate(async () => (await fetch("/ui/session")).status);
    assert.equal(status, 401, "the session still works after sign-out");

    // Every request and response the browser saw is free of keys.
    step("Every request and response the browser saw is free of keys");
    const seen = await Promise.all(responses);
    writeFileSync(requestsFile, JSON.stringify({ requests, responses: seen }, null, 2));
    assert.ok(requests.length > 20, `only ${requests.length} requests recorded`);
    for (const record of [...requests, ...seen]) {
      const serialized = JSON.stringify(record);
      for (const secret of secrets) {
        assert.ok(!serialized.includes(secret), `a key (or part of one) appears in ${record.method ?? "response of"} ${record.url}`);
      }
    }
    for (const res of seen.filter((r) => r.url.includes("/admin/v1/"))) {
      assert.equal(res.headers["cache-control"], "no-store", `${res.url}: Cache-Control`);
    }
    assert.deepEqual(pageErrors, []);
  } finally {
    // Bounded, so a stuck browser cannot keep the test process alive;
    // Playwright ends the browser when this process exits.
    await Promise.race([context.close(), new Promise((resolve) => setTimeout(resolve, 10_000))]);
    rmSync(userDataDir, { recursive: true, force: true });
  }
});
