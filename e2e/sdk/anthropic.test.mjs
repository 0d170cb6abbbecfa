// The official Anthropic Node SDK against byokproxy: messages, streamed and
// not, on the shared and the BYOK source, and Message Batches on BYOK. This
// SDK sends its API key as "Authorization: Bearer", which the proxy must
// accept as the mailbox token.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import Anthropic from '@anthropic-ai/sdk';
import * as h from './helpers.mjs';

const PROVIDER = 'anthropic';
const MODEL = 'claude-sonnet-4-5';

function client(token) {
  return new Anthropic({
    apiKey: token,
    baseURL: `${h.PROXY_URL}/anthropic`,
    maxRetries: 0,
    timeout: h.SDK_TIMEOUT_MS,
  });
}

function params(marker) {
  return { model: MODEL, max_tokens: 256, messages: [{ role: 'user', content: `Say hello to ${marker}` }] };
}

const reply = await h.reply();

function textDeltas(events) {
  return events
    .filter((e) => e.type === 'content_block_delta' && e.delta.type === 'text_delta')
    .map((e) => e.delta.text);
}

async function checkMessage({ byok }) {
  const mb = await h.newMailbox(byok ? 'an-byok' : 'an-shared');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const res = await client(mb.token).messages.create(params(marker));
  assert.equal(res.content[0].text, reply.text);
  assert.equal(res.stop_reason, 'end_turn');

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, '/v1/messages');
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.ok(rec.headers['anthropic-version'], 'anthropic-version did not reach the upstream');
  assert.equal(res.usage.input_tokens, rec.usage.input_tokens);
  assert.equal(res.usage.output_tokens, rec.usage.output_tokens);

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: false, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

async function checkStream({ byok }) {
  const mb = await h.newMailbox(byok ? 'an-byok-stream' : 'an-shared-stream');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const stream = await client(mb.token).messages.create({ ...params(marker), stream: true });
  const events = await h.collect(stream, 'message stream events');
  assert.deepEqual(textDeltas(events), reply.deltas, 'text deltas differ or arrived out of order');
  assert.equal(events.at(0).type, 'message_start');
  assert.equal(events.at(-1).type, 'message_stop');
  const delta = events.find((e) => e.type === 'message_delta');
  assert.equal(delta?.delta.stop_reason, 'end_turn');

  const rec = await h.upstreamFor(PROVIDER, marker);
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(delta.usage.output_tokens, rec.usage.output_tokens);

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: true, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

test('shared message', () => checkMessage({ byok: false }));
test('shared message stream', () => checkStream({ byok: false }));
test('byok message', () => checkMessage({ byok: true }));
test('byok message stream', () => checkStream({ byok: true }));

test('stream helper final message', async () => {
  const mb = await h.newMailbox('an-helper');
  const marker = h.uniqueId('marker');
  const stream = client(mb.token).messages.stream(params(marker));
  const final = await h.withTimeout(stream.finalMessage(), h.SDK_TIMEOUT_MS, 'finalMessage()');
  assert.equal(final.content[0].text, reply.text);
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(final.usage.output_tokens, rec.usage.output_tokens);
  assert.equal(final.usage.input_tokens, rec.usage.input_tokens);
});

test('count tokens on shared', async () => {
  const mb = await h.newMailbox('an-count');
  const marker = h.uniqueId('marker');
  const { max_tokens: _, ...body } = params(marker);
  const res = await client(mb.token).messages.countTokens(body);
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, '/v1/messages/count_tokens');
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');
  assert.equal(typeof res.input_tokens, 'number');
  assert.ok(res.input_tokens > 0, `input_tokens = ${res.input_tokens}`);
});

test('bad token raises AuthenticationError', async () => {
  const marker = h.uniqueId('marker');
  await assert.rejects(client('not-a-valid-mailbox-token').messages.create(params(marker)), (err) => {
    assert.ok(err instanceof Anthropic.AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 401);
    return true;
  });
  assert.equal(await h.upstreamCount(PROVIDER, marker), 0, 'a request with a bad token reached the upstream');
});

test('stream reaches the client while the upstream holds it', async () => {
  const mb = await h.newMailbox('an-held');
  const marker = h.uniqueId('marker');
  const events = await h.streamWhileHeld(PROVIDER, () =>
    client(mb.token).messages.create({ ...params(marker), stream: true }));
  assert.equal(events[0].type, 'message_start');
  assert.deepEqual(textDeltas(events), reply.deltas);
  assert.equal(events.at(-1).type, 'message_stop');
});

async function checkScrubbed({ label, upstream, errorClass, status }) {
  const mb = await h.newMailbox(label);
  await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');
  const key = h.byokKey(PROVIDER);

  await h.withUpstream(PROVIDER, upstream, () => assert.rejects(client(mb.token).messages.create(params(marker)), (err) => {
    assert.ok(err instanceof errorClass, `got ${err?.constructor?.name}`);
    assert.equal(err.status, status);
    h.assertNoKeyForm(`${err.message} ${JSON.stringify(err.error ?? null)}`, key, 'the error the SDK raised');
    if (status === 429) {
      assert.equal(h.errorHeader(err, 'retry-after'), '1', 'Retry-After of the upstream 429 did not pass through');
    }
    return true;
  }));
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.status, status, 'the error did not come from the upstream');
}

test('rejected byok key scrubbed from 401', () => checkScrubbed({
  label: 'an-401', upstream: { echo: true, rejectByok: true }, errorClass: Anthropic.AuthenticationError, status: 401,
}));

test('byok key scrubbed from 429', () => checkScrubbed({
  label: 'an-429', upstream: { echo: true, error: 429 }, errorClass: Anthropic.RateLimitError, status: 429,
}));

// messages.batches.results fetches the batch, then requests its absolute
// results_url as it is. The proxy points that URL at itself, so the
// results come through it with the mailbox's key rather than from the
// provider with the mailbox token.
test('byok messages.batches.results through the proxy', async () => {
  const mb = await h.newMailbox('an-batch');
  await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');
  const c = client(mb.token);

  const batch = await c.messages.batches.create({
    requests: [
      { custom_id: `first-${marker}`, params: params(`${marker} first`) },
      { custom_id: `second-${marker}`, params: params(`${marker} second`) },
    ],
  });
  assert.ok(batch.results_url.startsWith(`${h.PROXY_URL}/anthropic/v1/messages/batches/`),
    `results_url ${batch.results_url} does not point at the proxy`);

  const customIDs = [];
  for await (const line of await c.messages.batches.results(batch.id)) {
    assert.equal(line.result.type, 'succeeded');
    assert.equal(line.result.message.content[0].text, reply.text);
    customIDs.push(line.custom_id);
  }
  assert.deepEqual(customIDs, [`first-${marker}`, `second-${marker}`]);

  const created = await h.upstreamFor(PROVIDER, marker);
  assert.equal(created.path, '/v1/messages/batches');
  const fetched = (await h.upstreamRequests(PROVIDER)).filter((r) => r.path === `/v1/messages/batches/${batch.id}/results`);
  assert.equal(fetched.length, 1, `the upstream got ${fetched.length} requests for the results, want 1`);
  for (const rec of [created, fetched[0]]) {
    h.assertUpstreamKey(PROVIDER, rec, h.byokKey(PROVIDER), 'BYOK key');
    h.assertNoToken(rec, mb.token);
  }
});
