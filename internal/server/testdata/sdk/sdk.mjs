// Drives llproxy with the official openai SDK. sdk_test.go starts the gateway
// and an upstream, runs this with GATEWAY_URL set, and checks what it prints
// (one JSON object) against what the upstream saw.
import OpenAI from 'openai';

const client = new OpenAI({
  baseURL: process.env.GATEWAY_URL + '/openai/v1',
  apiKey: 'team-key-a',
  maxRetries: 2,
});
const out = {};

const chat = await client.chat.completions.create({
  model: 'gpt-4o',
  messages: [{ role: 'user', content: 'hello world' }],
  max_tokens: 10,
});
out.chat = chat.choices[0].message.content;

const stream = await client.chat.completions.create({
  model: 'gpt-4o',
  messages: [{ role: 'user', content: 'stream please' }],
  stream: true,
});
let text = '';
for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? '';
out.stream = text;

// Drain gpt-4o-mini's token bucket, then ask again at once: the gateway
// answers 429 with retry-after-ms, and the SDK retries by itself.
await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [], max_tokens: 5990 });
const t0 = Date.now();
const { data, response } = await client.chat.completions
  .create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'again' }], max_tokens: 40 })
  .withResponse();
out.retried = {
  ms: Date.now() - t0,
  content: data.choices[0].message.content,
  limitTokens: response.headers.get('x-ratelimit-limit-tokens'),
};

// Too large for the bucket: x-should-retry: false, so no retry.
try {
  await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [], max_tokens: 100000 });
  out.tooLarge = 'no error';
} catch (e) {
  out.tooLarge = { status: e.status, code: e.code, type: e.type };
}

console.log(JSON.stringify(out));
