// The official OpenAI Node SDK reaching an emulated OpenAI through byokproxy's
// forward proxy: the SDK keeps the provider's own base URL, undici's
// ProxyAgent sends it through CONNECT, and NODE_EXTRA_CA_CERTS makes Node
// trust the proxy's CA. TestForwardProxy in e2e/forward_test.go starts
// everything and sets the environment read below.
import { test, before } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import { ProxyAgent } from 'undici';

function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run these tests with "go test ./e2e -run TestForwardProxy"`);
  }
  return value;
}

const FORWARD_PROXY_URL = required('FORWARD_PROXY_URL'); // http://127.0.0.1:PORT
const OPENAI_UPSTREAM_URL = required('OPENAI_UPSTREAM_URL'); // https://127.0.0.1:PORT
const ADMIN_URL = required('ADMIN_URL');
const ADMIN_TOKEN = required('ADMIN_TOKEN');
const CONTROL_URL = required('CONTROL_URL');
const BYOK_KEY = required('BYOK_KEY_OPENAI');
const SHARED_KEY = required('SHARED_KEY_OPENAI');
required('NODE_EXTRA_CA_CERTS');

// PLACEHOLDER_KEY is what an app puts in OPENAI_API_KEY when the proxy URL
// carries its mailbox token: the SDK insists on some key.
const PLACEHOLDER_KEY = 'sk-placeholder-replaced-by-the-proxy';
const CHAT = { model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'say hello through the forward proxy' }] };

async function call(base, method, path, body, headers = {}) {
  const res = await fetch(base + path, {
    method,
    headers: { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  if (!res.ok) {
    throw new Error(`${method} ${path}: status ${res.status}: ${text}`);
  }
  return text ? JSON.parse(text) : null;
}

const admin = (method, path, body) =>
  call(ADMIN_URL, method, '/admin/v1' + path, body, { authorization: `Bearer ${ADMIN_TOKEN}` });
const control = (method, path) => call(CONTROL_URL, method, path);

let byokToken;
let sharedToken;
let byokMailbox;
let sharedMailbox;
let reply;

before(async () => {
  const suffix = `${process.pid}-${Date.now()}`;
  byokMailbox = `forward-byok-${suffix}@example.com`;
  sharedMailbox = `forward-shared-${suffix}@example.com`;
  await admin('PUT', `/mailboxes/${byokMailbox}/providers/openai/key`, { key: BYOK_KEY });
  await admin('PUT', `/mailboxes/${byokMailbox}/providers/openai/source`, { source: 'byok' });
  byokToken = (await admin('POST', `/mailboxes/${byokMailbox}/token`)).token;
  sharedToken = (await admin('POST', `/mailboxes/${sharedMailbox}/token`)).token;
  reply = await control('GET', '/reply');
});

// proxyURL returns the forward proxy's URL with token as the password, as
// an app writes it in HTTPS_PROXY.
function proxyURL(token) {
  const u = new URL(FORWARD_PROXY_URL);
  u.username = 'mbx';
  u.password = token;
  return u.toString();
}

function openai({ apiKey = PLACEHOLDER_KEY, proxy }) {
  return new OpenAI({
    apiKey,
    baseURL: `${OPENAI_UPSTREAM_URL}/v1`,
    maxRetries: 0,
    timeout: 20_000,
    fetchOptions: { dispatcher: new ProxyAgent(proxy) },
  });
}

// onlyUpstreamRequest returns the one request the emulator received since
// the last reset and checks that it carried the expected key and no trace of
// the proxy credential.
async function onlyUpstreamRequest(wantKey) {
  const requests = await control('GET', '/requests/openai');
  assert.equal(requests.length, 1, `upstream received ${requests.length} requests`);
  const [req] = requests;
  assert.equal(req.authorized, true, 'upstream rejected the credential');
  assert.equal(req.headers.authorization?.[0] === `Bearer ${wantKey}`, true, 'upstream did not get the expected key');
  assert.equal(req.headers['proxy-authorization'], undefined, 'upstream received Proxy-Authorization');
  const seen = JSON.stringify(req);
  for (const [name, token] of [['byok', byokToken], ['shared', sharedToken]]) {
    assert.equal(seen.includes(token), false, `upstream request contains the ${name} mailbox token`);
  }
  assert.equal(seen.includes(PLACEHOLDER_KEY), false, 'upstream request contains the placeholder key');
  return req;
}

// causeChain joins the messages of err and of its causes: the SDK wraps
// fetch's error, which wraps undici's.
function causeChain(err) {
  const messages = [];
  for (let e = err; e && messages.length < 10; e = e.cause) {
    messages.push(String(e.message ?? e));
  }
  return messages.join(' <- ');
}

// auditEvent returns the newest request event of mailbox; admin events such
// as source.changed share the stream and are skipped.
async function auditEvent(mailbox) {
  for (let i = 0; i < 100; i++) {
    const entries = await control('GET', '/audit');
    const found = entries.map((e) => e.event)
      .filter((e) => e.mailbox === mailbox && (e.kind === 'byok' || e.kind === 'metered'));
    if (found.length > 0) {
      return found.at(-1);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`no audit event for ${mailbox} after 10s`);
}

test('byok chat completion with the token in the proxy URL', async () => {
  await control('POST', '/reset/openai');
  const client = openai({ proxy: { uri: proxyURL(byokToken) } });
  const completion = await client.chat.completions.create(CHAT);
  assert.equal(completion.choices[0].message.content, reply.text);
  await onlyUpstreamRequest(BYOK_KEY);

  const event = await auditEvent(byokMailbox);
  assert.equal(event.kind, 'byok');
  assert.equal(event.path, '/openai/v1/chat/completions');
  assert.equal(event.key_last4, BYOK_KEY.slice(-4));
  assert.ok(event.output_tokens > 0, 'audit event has no output tokens');
});

test('shared stream with the token in the ProxyAgent token option', async () => {
  await control('POST', '/reset/openai');
  const basic = Buffer.from(`mbx:${sharedToken}`).toString('base64');
  const client = openai({ proxy: { uri: FORWARD_PROXY_URL, token: `Basic ${basic}` } });
  const stream = await client.chat.completions.create({ ...CHAT, stream: true });
  let text = '';
  let chunks = 0;
  for await (const chunk of stream) {
    chunks++;
    assert.notDeepEqual(chunk.choices, [], 'the client received the usage chunk it did not ask for');
    text += chunk.choices[0]?.delta?.content ?? '';
  }
  assert.equal(text, reply.text);
  assert.ok(chunks > reply.deltas.length, `only ${chunks} chunks arrived`);
  await onlyUpstreamRequest(SHARED_KEY);

  const event = await auditEvent(sharedMailbox);
  assert.equal(event.kind, 'metered');
  assert.equal(event.stream, true);
});

test('stream events arrive while the upstream holds the stream', async () => {
  await control('POST', '/reset/openai');
  await control('POST', '/hold/openai');
  try {
    const client = openai({ proxy: { uri: proxyURL(byokToken) } });
    const stream = await client.chat.completions.create({ ...CHAT, stream: true });
    const iterator = stream[Symbol.asyncIterator]();
    const first = await iterator.next();
    assert.equal(first.done, false);
    const held = await control('GET', '/held/openai');
    assert.equal(held.held, 1, 'the first chunk must arrive while the upstream still holds the stream');
    await control('POST', '/release/openai');
    let text = first.value.choices[0]?.delta?.content ?? '';
    for (let next = await iterator.next(); !next.done; next = await iterator.next()) {
      text += next.value.choices[0]?.delta?.content ?? '';
    }
    assert.equal(text, reply.text);
  } finally {
    await control('POST', '/release/openai');
  }
});

test('token as the API key through a proxy without credentials', async () => {
  await control('POST', '/reset/openai');
  const client = openai({ apiKey: byokToken, proxy: { uri: FORWARD_PROXY_URL } });
  const models = await client.models.list();
  assert.ok(models.data.some((m) => m.id === 'gpt-4o-mini'), 'model list lacks gpt-4o-mini');
  await onlyUpstreamRequest(BYOK_KEY);
});

test('no token anywhere raises AuthenticationError', async () => {
  await control('POST', '/reset/openai');
  const client = openai({ proxy: { uri: FORWARD_PROXY_URL } });
  await assert.rejects(client.chat.completions.create(CHAT), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 401);
    assert.equal(err.code, 'invalid_api_key');
    return true;
  });
  assert.deepEqual(await control('GET', '/requests/openai'), []);
});

test('a wrong proxy token fails the connection', async () => {
  await control('POST', '/reset/openai');
  const client = openai({ proxy: { uri: proxyURL('bp1.d3Jvbmc.0.AAAA') } });
  await assert.rejects(client.chat.completions.create(CHAT), (err) => {
    assert.ok(err instanceof OpenAI.APIConnectionError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.match(causeChain(err), /407/);
    return true;
  });
  assert.deepEqual(await control('GET', '/requests/openai'), []);
});
