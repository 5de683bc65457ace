// Drives llproxy with the official @anthropic-ai/sdk. anthropic_sdk_test.go
// starts the gateway and an Anthropic-like upstream, runs this with
// GATEWAY_URL set, and checks what it prints (one JSON object).
import Anthropic from '@anthropic-ai/sdk';

const model = 'claude-sonnet-4-5';
const messages = [{ role: 'user', content: 'Say hello to the team.' }];
const a = new Anthropic({ baseURL: process.env.GATEWAY_URL + '/claude', apiKey: 'key-a', maxRetries: 2 });
// A coding agent's way: the key as a bearer token, at the root base URL.
const b = new Anthropic({ baseURL: process.env.GATEWAY_URL, authToken: 'key-b', apiKey: null, maxRetries: 2 });
const out = {};

const msg = await a.messages.create({ model, max_tokens: 100, messages });
out.create = { text: msg.content[0].text.trim().split(' ')[0], usage: msg.usage };

const stream = a.messages.stream({ model, max_tokens: 100, messages });
let text = '';
stream.on('text', (t) => { text += t; });
const final = await stream.finalMessage();
out.stream = { text: text.trim().split(' ').length, usage: final.usage };

out.count = (await a.messages.countTokens({ model, messages })).input_tokens;
const ids = [];
for await (const m of a.models.list()) ids.push(m.id);
out.models = ids;

const root = await b.messages.create({ model, max_tokens: 50, messages });
out.root = root.usage.output_tokens;

// A team's batch does not starve another team: team a sends 8 at once,
// team b one just after; b's is answered before a's last.
const done = [];
const batch = [];
for (let i = 0; i < 8; i++) {
  batch.push(a.messages.create({ model: 'claude-fair', max_tokens: 300, messages }).then(() => done.push('a')));
}
await new Promise((r) => setTimeout(r, 50));
batch.push(b.messages.create({ model: 'claude-fair', max_tokens: 300, messages }).then(() => done.push('b')));
await Promise.all(batch);
out.fairness = done.indexOf('b');

// Drain claude-tight's output bucket, then ask again at once: the gateway
// answers 429 with retry-after, and the SDK retries by itself.
await a.messages.create({ model: 'claude-tight', max_tokens: 590, messages });
const t0 = Date.now();
const again = await a.messages.create({ model: 'claude-tight', max_tokens: 20, messages }).withResponse();
out.retried = {
  ms: Date.now() - t0,
  ok: again.data.type,
  outputLimit: again.response.headers.get('anthropic-ratelimit-output-tokens-limit'),
};

// Too large for the output bucket: x-should-retry: false, so no retry.
try {
  await a.messages.create({ model: 'claude-tight', max_tokens: 5000, messages });
  out.tooLarge = 'no error';
} catch (e) {
  out.tooLarge = { status: e.status, type: e.error?.error?.type, retried: e.headers?.get('x-should-retry') };
}
console.log(JSON.stringify(out));
