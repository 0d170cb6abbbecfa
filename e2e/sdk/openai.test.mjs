// The official OpenAI Node SDK against byokproxy: chat completions, the
// Responses API and embeddings, on the shared and the BYOK source.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import * as h from './helpers.mjs';

const PROVIDER = 'openai';
const MODEL = 'gpt-4o-mini';

function client(token) {
  return new OpenAI({
    apiKey: token,
    baseURL: `${h.PROXY_URL}/openai/v1`,
    maxRetries: 0,
    timeout: h.SDK_TIMEOUT_MS,
  });
}

function messages(marker) {
  return [{ role: 'user', content: `Say hello to ${marker}` }];
}

const reply = await h.reply();

/** Splits chat chunks into the text deltas, the finish reason and usage-only chunks. */
function readChunks(chunks) {
  const deltas = [];
  let finish = null;
  const usageChunks = [];
  for (const chunk of chunks) {
    if (chunk.choices.length === 0) {
      usageChunks.push(chunk);
      continue;
    }
    const choice = chunk.choices[0];
    if (choice.delta?.content) deltas.push(choice.delta.content);
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return { deltas, finish, usageChunks };
}

async function checkChat({ byok }) {
  const mb = await h.newMailbox(byok ? 'oa-byok-chat' : 'oa-shared-chat');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const res = await client(mb.token).chat.completions.create({ model: MODEL, messages: messages(marker) });
  assert.equal(res.choices[0].message.content, reply.text);
  assert.equal(res.choices[0].finish_reason, 'stop');

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, '/v1/chat/completions');
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(res.usage.prompt_tokens, rec.usage.input_tokens);
  assert.equal(res.usage.completion_tokens, rec.usage.output_tokens);

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: false, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

async function checkChatStream({ byok, includeUsage }) {
  const mb = await h.newMailbox(byok ? 'oa-byok-stream' : 'oa-shared-stream');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const params = { model: MODEL, messages: messages(marker), stream: true };
  if (includeUsage) params.stream_options = { include_usage: true };
  const stream = await client(mb.token).chat.completions.create(params);
  const { deltas, finish, usageChunks } = readChunks(await h.collect(stream, 'chat completion chunks'));
  assert.deepEqual(deltas, reply.deltas, 'text deltas differ or arrived out of order');
  assert.equal(finish, 'stop');

  const rec = await h.upstreamFor(PROVIDER, marker);
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(JSON.parse(rec.body).stream_options?.include_usage, true,
    'the proxy did not request usage from the upstream');
  if (includeUsage) {
    assert.equal(usageChunks.length, 1, 'the client asked for usage but got no usage-only chunk');
    assert.equal(usageChunks[0].usage.prompt_tokens, rec.usage.input_tokens);
    assert.equal(usageChunks[0].usage.completion_tokens, rec.usage.output_tokens);
  } else {
    assert.equal(usageChunks.length, 0, 'the client did not ask for usage but got the usage-only chunk');
  }

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: true, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

test('shared chat completion', () => checkChat({ byok: false }));
test('shared chat completion stream', () => checkChatStream({ byok: false, includeUsage: false }));
test('shared stream with usage requested', () => checkChatStream({ byok: false, includeUsage: true }));
test('byok chat completion', () => checkChat({ byok: true }));
test('byok chat completion stream', () => checkChatStream({ byok: true, includeUsage: false }));

test('responses create', async () => {
  const mb = await h.newMailbox('oa-responses');
  const marker = h.uniqueId('marker');
  const res = await client(mb.token).responses.create({ model: MODEL, input: `Say hello to ${marker}` });
  assert.equal(res.status, 'completed');
  assert.equal(res.output_text, reply.text);

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, '/v1/responses');
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(res.usage.input_tokens, rec.usage.input_tokens);
  await h.expectAudit(mb.id, { provider: PROVIDER, kind: 'metered', model: MODEL, stream: false, record: rec });
});

test('responses stream', async () => {
  const mb = await h.newMailbox('oa-responses-stream');
  const marker = h.uniqueId('marker');
  const stream = await client(mb.token).responses.create({ model: MODEL, input: `Say hello to ${marker}`, stream: true });
  const events = await h.collect(stream, 'Responses API events');
  const deltas = events.filter((e) => e.type === 'response.output_text.delta').map((e) => e.delta);
  assert.deepEqual(deltas, reply.deltas, 'text deltas differ or arrived out of order');
  assert.equal(events.at(0).type, 'response.created');
  assert.equal(events.at(-1).type, 'response.completed');
  const seq = events.map((e) => e.sequence_number);
  assert.deepEqual(seq, seq.map((_, i) => i), 'sequence numbers are not 0, 1, 2, ...');

  const rec = await h.upstreamFor(PROVIDER, marker);
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(events.at(-1).response.usage.output_tokens, rec.usage.output_tokens);
  await h.expectAudit(mb.id, { provider: PROVIDER, kind: 'metered', model: MODEL, stream: true, record: rec });
});

test('embeddings', async () => {
  const mb = await h.newMailbox('oa-embeddings');
  const marker = h.uniqueId('marker');
  const model = 'text-embedding-3-small';
  const res = await client(mb.token).embeddings.create({ model, input: [`first ${marker}`, 'second'] });
  assert.equal(res.data.length, 2);
  res.data.forEach((d, i) => {
    // The emulator's vectors: element j of input i is (i+1)/10 + j/100.
    const want = Array.from({ length: d.embedding.length }, (_, j) => (i + 1) / 10 + j / 100);
    assert.ok(d.embedding.length > 0, `embedding ${i} is empty`);
    d.embedding.forEach((v, j) => assert.ok(Math.abs(v - want[j]) < 1e-6, `embedding ${i}[${j}] = ${v}, want ${want[j]}`));
  });

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(JSON.parse(rec.body).encoding_format, 'base64', 'the SDK default encoding_format did not reach the upstream');
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');
  assert.equal(res.usage.prompt_tokens, rec.usage.input_tokens);
  await h.expectAudit(mb.id, { provider: PROVIDER, kind: 'metered', model, stream: false, record: rec });
});

test('bad token raises AuthenticationError', async () => {
  const marker = h.uniqueId('marker');
  await assert.rejects(
    client('not-a-valid-mailbox-token').chat.completions.create({ model: MODEL, messages: messages(marker) }),
    (err) => {
      assert.ok(err instanceof OpenAI.AuthenticationError, `got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 401);
      return true;
    },
  );
  assert.equal(await h.upstreamCount(PROVIDER, marker), 0, 'a request with a bad token reached the upstream');
});

test('stream reaches the client while the upstream holds it', async () => {
  const mb = await h.newMailbox('oa-held');
  const marker = h.uniqueId('marker');
  const events = await h.streamWhileHeld(PROVIDER, () =>
    client(mb.token).chat.completions.create({ model: MODEL, messages: messages(marker), stream: true }));
  const { deltas, finish } = readChunks(events);
  assert.deepEqual(deltas, reply.deltas);
  assert.equal(finish, 'stop');
});

async function checkScrubbed({ label, upstream, errorClass, status }) {
  const mb = await h.newMailbox(label);
  await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');
  const key = h.byokKey(PROVIDER);

  await h.withUpstream(PROVIDER, upstream, () => assert.rejects(
    client(mb.token).chat.completions.create({ model: MODEL, messages: messages(marker) }),
    (err) => {
      assert.ok(err instanceof errorClass, `got ${err?.constructor?.name}`);
      assert.equal(err.status, status);
      h.assertNoKeyForm(`${err.message} ${JSON.stringify(err.error ?? null)}`, key, 'the error the SDK raised');
      if (status === 429) {
        assert.equal(h.errorHeader(err, 'retry-after'), '1', 'Retry-After of the upstream 429 did not pass through');
      }
      return true;
    },
  ));
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.status, status, 'the error did not come from the upstream');
}

test('rejected byok key scrubbed from 401', () => checkScrubbed({
  label: 'oa-401', upstream: { echo: true, rejectByok: true }, errorClass: OpenAI.AuthenticationError, status: 401,
}));

test('byok key scrubbed from 429', () => checkScrubbed({
  label: 'oa-429', upstream: { echo: true, error: 429 }, errorClass: OpenAI.RateLimitError, status: 429,
}));
