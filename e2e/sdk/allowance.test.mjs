// The monthly allowance through each official SDK. Once a mailbox has used
// its shared-key allowance, the next shared request raises the SDK's own
// rate-limit error at once, with no retry that waits until the month ends.
// The same mailbox's own key keeps working.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { GoogleGenAI, ApiError } from '@google/genai';
import * as h from './helpers.mjs';

/** A call must fail well within this, so an SDK that sleeps on Retry-After fails the test. */
const FAST_MS = 5_000;

async function exhaust(mailbox) {
  const res = await h.admin('PUT', `/mailboxes/${mailbox.id}/limit`, { monthly_token_limit: 1 });
  assert.equal(res.status, 200, `PUT limit returned ${res.status}: ${res.text}`);
  const openai = new OpenAI({ apiKey: mailbox.token, baseURL: `${h.PROXY_URL}/openai/v1`, maxRetries: 0 });
  await openai.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'spend' }] });
  // Usage lands through the audit writer shortly after the response ends.
  const deadline = Date.now() + 5_000;
  for (;;) {
    const usage = await h.admin('GET', `/mailboxes/${mailbox.id}/usage`);
    if (usage.json?.remaining === 0) return;
    assert.ok(Date.now() < deadline, `allowance not used up after 5 s: ${usage.text}`);
    await h.sleep(50);
  }
}

async function rejectsFast(promise, check) {
  const started = Date.now();
  await assert.rejects(promise, (err) => {
    check(err);
    return true;
  });
  const took = Date.now() - started;
  assert.ok(took < FAST_MS, `the SDK took ${took} ms to raise: it retried the 429`);
}

test('allowance used up raises each SDK rate-limit error', async () => {
  const mailbox = await h.newMailbox('allowance');
  await exhaust(mailbox);

  const openai = new OpenAI({ apiKey: mailbox.token, baseURL: `${h.PROXY_URL}/openai/v1` });
  await rejectsFast(
    openai.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'more' }] }),
    (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError, `OpenAI: got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 429);
      assert.equal(err.code, 'insufficient_quota');
    },
  );

  const anthropic = new Anthropic({ apiKey: mailbox.token, baseURL: `${h.PROXY_URL}/anthropic` });
  await rejectsFast(
    anthropic.messages.create({ model: 'claude-haiku-4-5', max_tokens: 8, messages: [{ role: 'user', content: 'more' }] }),
    (err) => {
      assert.ok(err instanceof Anthropic.RateLimitError, `Anthropic: got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 429);
    },
  );

  const google = new GoogleGenAI({ apiKey: mailbox.token, httpOptions: { baseUrl: `${h.PROXY_URL}/google` } });
  await rejectsFast(
    google.models.generateContent({ model: 'gemini-2.5-flash', contents: 'more' }),
    (err) => {
      assert.ok(err instanceof ApiError, `Google: got ${err?.constructor?.name}: ${err?.message}`);
      assert.equal(err.status, 429);
      assert.match(err.message, /RESOURCE_EXHAUSTED/);
    },
  );

  // The mailbox's own key is never capped.
  await h.useByok(mailbox.id, 'openai');
  const own = await openai.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'own key' }] });
  assert.ok(own.choices[0].message.content.length > 0, 'byok request over the shared allowance failed');
});
