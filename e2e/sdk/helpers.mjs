// Shared helpers of the SDK tests: the proxy's admin API, the control server
// of the Go harness (emulated upstreams and the audit stream), and checks
// that the upstream saw the right credential. Assertion messages never
// include a provider key, so a failing run does not print one.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests through "go test ./e2e" (TestSDKs), which starts the proxy`);
  }
  return value;
}

export const PROXY_URL = required('PROXY_URL');
export const ADMIN_URL = required('ADMIN_URL');
export const ADMIN_TOKEN = required('ADMIN_TOKEN');
export const CONTROL_URL = required('CONTROL_URL');

/** Timeout of one SDK call or stream step, in milliseconds. */
export const SDK_TIMEOUT_MS = 15_000;

/** Maximum wait for the first event of a held stream, in milliseconds. */
const FIRST_EVENT_TIMEOUT_MS = 10_000;

/** Maximum wait for an audit event or an upstream record, in milliseconds. */
const POLL_TIMEOUT_MS = 5_000;

export function byokKey(provider) {
  return required(`BYOK_KEY_${provider.toUpperCase()}`);
}

export function sharedKey(provider) {
  return required(`SHARED_KEY_${provider.toUpperCase()}`);
}

async function request(url, { method = 'GET', headers = {}, body } = {}) {
  const init = { method, headers: { ...headers }, signal: AbortSignal.timeout(POLL_TIMEOUT_MS) };
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const res = await fetch(url, init);
  const text = await res.text();
  let json;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = undefined;
  }
  return { status: res.status, json, text };
}

/** Calls the admin API; path starts after /admin/v1. */
export function admin(method, path, body) {
  return request(`${ADMIN_URL}/admin/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
    body,
  });
}

function control(method, path) {
  return request(`${CONTROL_URL}${path}`, { method });
}

/** Returns an id unique to this run, for mailboxes and prompt markers. */
export function uniqueId(label) {
  return `e2e-${label}-${randomBytes(6).toString('hex')}`;
}

/** Creates a mailbox id and issues its token. */
export async function newMailbox(label) {
  const id = uniqueId(label);
  const res = await admin('POST', `/mailboxes/${id}/token`);
  assert.equal(res.status, 200, `POST /admin/v1/mailboxes/${id}/token returned ${res.status}: ${res.text}`);
  assert.equal(typeof res.json?.token, 'string', `token response has no token: ${res.text}`);
  assert.match(res.json.token, /^[A-Za-z0-9._-]+$/, 'token uses characters outside A-Z a-z 0-9 - _ .');
  return { id, token: res.json.token };
}

/** Stores the provider's BYOK key for the mailbox and selects the byok source. */
export async function useByok(mailbox, provider) {
  const key = byokKey(provider);
  const base = `/mailboxes/${mailbox}/providers/${provider}`;

  const put = await admin('PUT', `${base}/key`, { key });
  assert.equal(put.status, 200, `PUT ${base}/key returned ${put.status}`);
  assert.equal(put.json?.has_key, true, 'provider status after PUT key: has_key is not true');
  assert.equal(put.json?.last4, key.slice(-4), 'provider status after PUT key: last4 differs from the key');
  assert.equal(put.json?.source, 'shared', 'putting a key changed the source');

  const source = await admin('PUT', `${base}/source`, { source: 'byok' });
  assert.equal(source.status, 200, `PUT ${base}/source returned ${source.status}: ${source.text}`);
  assert.equal(source.json?.source, 'byok', `provider status after PUT source: ${source.text}`);
}

/** Fetches the reply the emulators generate: { deltas: [...], text }. */
export async function reply() {
  const res = await control('GET', '/reply');
  return res.json;
}

export async function upstreamRequests(provider) {
  const res = await control('GET', `/requests/${provider}`);
  assert.equal(res.status, 200, `control /requests/${provider}: ${res.text}`);
  return res.json;
}

/**
 * Returns the one upstream request whose body contains marker, waiting up to
 * POLL_TIMEOUT_MS for it to be recorded.
 */
export async function upstreamFor(provider, marker) {
  const deadline = Date.now() + POLL_TIMEOUT_MS;
  for (;;) {
    const found = (await upstreamRequests(provider)).filter((r) => r.body.includes(marker));
    if (found.length > 0 || Date.now() > deadline) {
      assert.equal(found.length, 1, `upstream ${provider} received ${found.length} requests with marker ${marker}, want 1`);
      return found[0];
    }
    await sleep(50);
  }
}

/** Returns how many upstream requests contain marker, without waiting. */
export async function upstreamCount(provider, marker) {
  return (await upstreamRequests(provider)).filter((r) => r.body.includes(marker)).length;
}

export async function hold(provider) {
  await control('POST', `/hold/${provider}`);
}

export async function release(provider) {
  await control('POST', `/release/${provider}`);
}

async function heldStreams(provider) {
  return (await control('GET', `/held/${provider}`)).json.held;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects with a message naming what did not happen within ms. */
export async function withTimeout(promise, ms, description) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${description}`)), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Reads every item of an async iterable, bounding each step. */
export async function collect(iterable, description) {
  const items = [];
  const it = iterable[Symbol.asyncIterator]();
  for (let i = 0; i < 1000; i++) {
    const next = await withTimeout(it.next(), SDK_TIMEOUT_MS, description);
    if (next.done) {
      return items;
    }
    items.push(next.value);
  }
  throw new Error(`${description}: more than 1000 events`);
}

/**
 * Holds the provider's next upstream stream after its first event, starts a
 * stream with start(), and checks that the SDK gets the first event while the
 * upstream is still held. Then releases it and returns all events.
 */
export async function streamWhileHeld(provider, start) {
  await hold(provider);
  try {
    const stream = await withTimeout(start(), FIRST_EVENT_TIMEOUT_MS, 'the stream to open while the upstream holds it');
    const it = stream[Symbol.asyncIterator]();
    const first = await withTimeout(it.next(), FIRST_EVENT_TIMEOUT_MS,
      'the first stream event while the upstream holds the stream (the proxy buffers?)');
    assert.equal(first.done, false, 'stream ended before its first event');

    // The emulator counts a held stream just after flushing its first event,
    // so allow it a moment.
    let heldCount = 0;
    for (let i = 0; i < 40 && heldCount === 0; i++) {
      heldCount = await heldStreams(provider);
      if (heldCount === 0) await sleep(50);
    }
    assert.equal(heldCount, 1, 'the upstream stream is not held while the client has its first event');

    await release(provider);
    const rest = await collect({ [Symbol.asyncIterator]: () => it }, 'the rest of the stream after release');
    return [first.value, ...rest];
  } finally {
    await release(provider);
  }
}

const credentialHeaders = ['authorization', 'x-api-key', 'x-goog-api-key', 'api-key', 'proxy-authorization', 'cookie', 'x-mailbox-id'];

/**
 * Checks that the upstream request carried exactly the expected key in the
 * provider's auth header and no other credential. keyName describes the key
 * in messages ("shared key", "BYOK key").
 */
export function assertUpstreamKey(provider, record, key, keyName) {
  const expected = {
    openai: ['authorization', `Bearer ${key}`],
    anthropic: ['x-api-key', key],
    google: ['x-goog-api-key', key],
  }[provider];
  const [header, value] = expected;
  const got = record.headers[header] ?? [];
  assert.equal(got.length, 1, `upstream request has ${got.length} ${header} headers, want 1`);
  assert.ok(got[0] === value, `upstream ${header} header is not the ${keyName}`);
  for (const other of credentialHeaders) {
    if (other !== header) {
      assert.equal(record.headers[other], undefined, `upstream request carries a ${other} header`);
    }
  }
  const query = new URLSearchParams(record.query);
  assert.equal(query.has('key'), false, 'upstream request carries a key query parameter');
}

/** Checks that the mailbox token appears nowhere in the upstream request. */
export function assertNoToken(record, token) {
  for (const [name, values] of Object.entries(record.headers)) {
    for (const v of values) {
      assert.ok(!v.includes(token), `mailbox token reached the upstream in header ${name}`);
    }
  }
  assert.ok(!decodeURIComponent(record.query).includes(token), 'mailbox token reached the upstream in the query');
  assert.ok(!record.body.includes(token), 'mailbox token reached the upstream in the body');
  assert.ok(!record.path.includes(token), 'mailbox token reached the upstream in the path');
}

/** Returns the mailbox's request audit events (kind byok or metered). */
async function requestEvents(mailbox) {
  const res = await control('GET', '/audit');
  assert.equal(res.status, 200, `control /audit: ${res.text}`);
  return res.json
    .map((entry) => entry.event)
    .filter((e) => e?.mailbox === mailbox && (e.kind === 'byok' || e.kind === 'metered'));
}

/**
 * Waits for the mailbox's one request audit event and checks it against the
 * upstream record: kind, provider, key_last4, model, status, stream and the
 * token counts the emulator reported.
 */
export async function expectAudit(mailbox, { provider, kind, model, stream, record, keyLast4 }) {
  const deadline = Date.now() + POLL_TIMEOUT_MS;
  let events = await requestEvents(mailbox);
  while (events.length === 0 && Date.now() < deadline) {
    await sleep(50);
    events = await requestEvents(mailbox);
  }
  // A second event, if the proxy wrongly wrote one, would come right after.
  await sleep(200);
  events = await requestEvents(mailbox);
  assert.equal(events.length, 1, `audit events for mailbox ${mailbox}: ${events.length}, want 1`);

  const e = events[0];
  assert.equal(e.kind, kind, 'audit kind');
  assert.equal(e.source, kind, 'audit source');
  assert.equal(e.provider, provider, 'audit provider');
  assert.equal(e.mailbox, mailbox, 'audit mailbox');
  assert.equal(e.model, model, 'audit model');
  assert.equal(e.status, 200, 'audit status');
  assert.equal(e.stream, stream, 'audit stream');
  assert.equal(e.method, record.method, 'audit method');
  assert.equal(typeof e.path, 'string', 'audit path is not a string');
  assert.ok(!e.path.includes('?'), `audit path ${e.path} contains a query`);
  assert.equal(typeof e.request_id, 'string', 'audit request_id is not a string');
  assert.notEqual(e.request_id, '', 'audit request_id is empty');
  assert.ok(!Number.isNaN(Date.parse(e.time)), `audit time ${e.time} is not a timestamp`);
  assert.equal(typeof e.duration_ms, 'number', 'audit duration_ms is not a number');
  assert.ok(!e.error, `audit error is ${JSON.stringify(e.error)}`);
  assert.equal(e.input_tokens, record.usage.input_tokens, 'audit input_tokens differ from the upstream usage');
  assert.equal(e.output_tokens, record.usage.output_tokens, 'audit output_tokens differ from the upstream usage');
  if (kind === 'byok') {
    assert.equal(e.key_last4, keyLast4, 'audit key_last4 differs from the last four characters of the BYOK key');
  } else {
    assert.ok(!e.key_last4, 'metered audit event has a key_last4');
  }
  return e;
}

async function setUpstream(provider, { echo, error, keys }) {
  const results = [
    await control('POST', `/echo/${provider}?on=${echo}`),
    await control('POST', `/error/${provider}?status=${error}`),
    await request(`${CONTROL_URL}/keys/${provider}`, { method: 'POST', body: { keys } }),
  ];
  for (const res of results) {
    assert.equal(res.status, 200, `control server: ${res.text}`);
  }
}

/**
 * Runs fn with the provider's emulator changed: echo puts the raw key into
 * error bodies, error makes every request fail with that status, and
 * rejectByok stops the emulator accepting the BYOK key. The emulator's
 * defaults are restored afterwards.
 */
export async function withUpstream(provider, { echo = false, error = 0, rejectByok = false }, fn) {
  const keys = rejectByok ? [sharedKey(provider)] : [sharedKey(provider), byokKey(provider)];
  try {
    await setUpstream(provider, { echo, error, keys });
    return await fn();
  } finally {
    await setUpstream(provider, { echo: false, error: 0, keys: [sharedKey(provider), byokKey(provider)] });
  }
}

/**
 * Masks a key the way OpenAI's 401 message and upstreamtest.MaskKey do: the
 * first six and last four characters kept, "*" for each one between.
 */
export function maskKey(key) {
  return key.slice(0, 6) + '*'.repeat(key.length - 10) + key.slice(-4);
}

/**
 * Checks that text contains no form of key: the whole key, its middle 20
 * characters, its masked form, or "*" followed by its last four characters.
 */
export function assertNoKeyForm(text, key, where) {
  const start = Math.floor((key.length - 20) / 2);
  assert.ok(!text.includes(key), `${where} contains the whole BYOK key`);
  assert.ok(!text.includes(key.slice(start, start + 20)), `${where} contains the middle 20 characters of the BYOK key`);
  assert.ok(!text.includes(maskKey(key)), `${where} contains the masked BYOK key`);
  assert.ok(!text.includes(`*${key.slice(-4)}`), `${where} contains the last four characters of the BYOK key after a mask`);
}

/** Returns a header of an SDK error, whether its headers are a Headers object or a plain object. */
export function errorHeader(err, name) {
  const headers = err?.headers;
  if (!headers) return undefined;
  if (typeof headers.get === 'function') return headers.get(name) ?? undefined;
  return headers[name];
}
