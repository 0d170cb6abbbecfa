// The official Google Gen AI Node SDK (@google/genai) against byokproxy:
// generateContent and streamGenerateContent (which the SDK calls with
// alt=sse), on the shared and the BYOK source, a file upload on BYOK, and
// the shared key's check of file URIs.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GoogleGenAI, ApiError } from '@google/genai';
import * as h from './helpers.mjs';

const PROVIDER = 'google';
const MODEL = 'gemini-2.5-flash';

function client(token) {
  return new GoogleGenAI({
    apiKey: token,
    httpOptions: { baseUrl: `${h.PROXY_URL}/google`, timeout: h.SDK_TIMEOUT_MS },
  });
}

const reply = await h.reply();

function chunkTexts(chunks) {
  return chunks.map((c) => c.text ?? '');
}

async function checkGenerate({ byok }) {
  const mb = await h.newMailbox(byok ? 'gg-byok' : 'gg-shared');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const res = await client(mb.token).models.generateContent({ model: MODEL, contents: `Say hello to ${marker}` });
  assert.equal(res.text, reply.text);
  assert.equal(res.candidates[0].finishReason, 'STOP');

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, `/v1beta/models/${MODEL}:generateContent`);
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(res.usageMetadata.promptTokenCount, rec.usage.input_tokens);
  assert.equal(res.usageMetadata.candidatesTokenCount, rec.usage.output_tokens);

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: false, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

async function checkStream({ byok }) {
  const mb = await h.newMailbox(byok ? 'gg-byok-stream' : 'gg-shared-stream');
  if (byok) await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');

  const stream = await client(mb.token).models.generateContentStream({ model: MODEL, contents: `Say hello to ${marker}` });
  const chunks = await h.collect(stream, 'generateContentStream chunks');
  assert.deepEqual(chunkTexts(chunks), reply.deltas, 'text deltas differ or arrived out of order');
  assert.equal(chunks.at(-1).candidates[0].finishReason, 'STOP');

  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, `/v1beta/models/${MODEL}:streamGenerateContent`);
  assert.equal(new URLSearchParams(rec.query).get('alt'), 'sse', 'alt=sse did not reach the upstream');
  h.assertUpstreamKey(PROVIDER, rec, byok ? h.byokKey(PROVIDER) : h.sharedKey(PROVIDER), byok ? 'BYOK key' : 'shared key');
  h.assertNoToken(rec, mb.token);
  assert.equal(chunks.at(-1).usageMetadata.candidatesTokenCount, rec.usage.output_tokens);

  await h.expectAudit(mb.id, {
    provider: PROVIDER, kind: byok ? 'byok' : 'metered', model: MODEL, stream: true, record: rec,
    keyLast4: h.byokKey(PROVIDER).slice(-4),
  });
}

test('shared generateContent', () => checkGenerate({ byok: false }));
test('shared streamGenerateContent', () => checkStream({ byok: false }));
test('byok generateContent', () => checkGenerate({ byok: true }));
test('byok streamGenerateContent', () => checkStream({ byok: true }));

// files.upload opens a resumable upload session and sends the bytes to the
// session URL in the start response, which the proxy points back
// at itself, so both requests carry the mailbox's key and not its token.
test('byok files.upload through the proxy', async () => {
  const mb = await h.newMailbox('gg-upload');
  await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');
  const content = `notes for ${marker}\n`.repeat(40);

  const file = await client(mb.token).files.upload({
    file: new Blob([content], { type: 'text/plain' }),
    config: { mimeType: 'text/plain', displayName: `upload-${marker}` },
  });
  assert.equal(file.sizeBytes, String(content.length));
  assert.equal(file.mimeType, 'text/plain');
  assert.equal(file.state, 'ACTIVE');

  const start = await h.upstreamFor(PROVIDER, `upload-${marker}`);
  assert.equal(start.path, '/upload/v1beta/files');
  const bytes = await h.upstreamFor(PROVIDER, `notes for ${marker}`);
  assert.equal(bytes.path, '/upload/v1beta/files');
  assert.ok(new URLSearchParams(bytes.query).get('upload_id'), 'the bytes did not go to the upload session');
  assert.equal(bytes.body, content);
  for (const rec of [start, bytes]) {
    h.assertUpstreamKey(PROVIDER, rec, h.byokKey(PROVIDER), 'BYOK key');
    h.assertNoToken(rec, mb.token);
  }
});

test('countTokens on shared', async () => {
  const mb = await h.newMailbox('gg-count');
  const marker = h.uniqueId('marker');
  const res = await client(mb.token).models.countTokens({ model: MODEL, contents: `Count ${marker}` });
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.path, `/v1beta/models/${MODEL}:countTokens`);
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');
  assert.ok(res.totalTokens > 0, `totalTokens = ${res.totalTokens}`);
});

// On the shared key a part may name a web resource, but not a file of the
// platform's Files API, which the proxy rejects before any request leaves.
test('shared fileData: web URI passes, Files API URI raises 403', async () => {
  const mb = await h.newMailbox('gg-file-uri');
  const ask = (marker, fileUri) => client(mb.token).models.generateContent({
    model: MODEL,
    contents: [{ role: 'user', parts: [{ text: `Sum up ${marker}` }, { fileData: { fileUri, mimeType: 'video/mp4' } }] }],
  });

  const web = h.uniqueId('marker');
  const res = await ask(web, 'https://www.youtube.com/watch?v=9hE5-98ZeCg');
  assert.equal(res.text, reply.text);
  const rec = await h.upstreamFor(PROVIDER, web);
  h.assertUpstreamKey(PROVIDER, rec, h.sharedKey(PROVIDER), 'shared key');

  const stored = h.uniqueId('marker');
  await assert.rejects(ask(stored, 'https://generativelanguage.googleapis.com/v1beta/files/abc123'), (err) => {
    assert.ok(err instanceof ApiError, `got ${err?.constructor?.name}: ${err?.message}`);
    assert.equal(err.status, 403);
    assert.match(err.message, /fileData\.fileUri/);
    return true;
  });
  assert.equal(await h.upstreamCount(PROVIDER, stored), 0, 'a request naming a stored file reached the upstream');
});

test('bad token raises ApiError 401', async () => {
  const marker = h.uniqueId('marker');
  await assert.rejects(
    client('not-a-valid-mailbox-token').models.generateContent({ model: MODEL, contents: `Say hello to ${marker}` }),
    (err) => {
      assert.ok(err instanceof ApiError, `got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 401);
      return true;
    },
  );
  assert.equal(await h.upstreamCount(PROVIDER, marker), 0, 'a request with a bad token reached the upstream');
});

test('stream reaches the client while the upstream holds it', async () => {
  const mb = await h.newMailbox('gg-held');
  const marker = h.uniqueId('marker');
  const chunks = await h.streamWhileHeld(PROVIDER, () =>
    client(mb.token).models.generateContentStream({ model: MODEL, contents: `Say hello to ${marker}` }));
  assert.deepEqual(chunkTexts(chunks), reply.deltas);
});

async function checkScrubbed({ label, upstream, status }) {
  const mb = await h.newMailbox(label);
  await h.useByok(mb.id, PROVIDER);
  const marker = h.uniqueId('marker');
  const key = h.byokKey(PROVIDER);

  await h.withUpstream(PROVIDER, upstream, () => assert.rejects(
    client(mb.token).models.generateContent({ model: MODEL, contents: `Say hello to ${marker}` }),
    (err) => {
      assert.ok(err instanceof ApiError, `got ${err?.constructor?.name}`);
      assert.equal(err.status, status);
      h.assertNoKeyForm(err.message, key, 'the error the SDK raised');
      return true;
    },
  ));
  const rec = await h.upstreamFor(PROVIDER, marker);
  assert.equal(rec.status, status, 'the error did not come from the upstream');
}

// Google rejects an invalid API key with 400 INVALID_ARGUMENT, not 401.
test('rejected byok key scrubbed from 400', () => checkScrubbed({
  label: 'gg-400', upstream: { echo: true, rejectByok: true }, status: 400,
}));

test('byok key scrubbed from 429', () => checkScrubbed({
  label: 'gg-429', upstream: { echo: true, error: 429 }, status: 429,
}));
