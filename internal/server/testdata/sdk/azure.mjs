// Drives llproxy with the official openai SDK's AzureOpenAI class.
// azure_test.go starts the gateway and an Azure-like upstream, runs this
// with GATEWAY_URL set, and checks what it prints (one JSON object).
import { AzureOpenAI } from 'openai';

const client = new AzureOpenAI({
  endpoint: process.env.GATEWAY_URL + '/azure',
  apiKey: 'team-key',
  apiVersion: '2024-10-21',
  deployment: 'gpt4o-eu',
  maxRetries: 0,
});
const out = {};
const chat = await client.chat.completions.create({
  model: 'gpt4o-eu',
  messages: [{ role: 'user', content: 'hello' }],
  max_tokens: 100,
});
out.chat = chat.choices[0].message.content;
try {
  await client.chat.completions.create({ model: 'gpt4o-eu', messages: [], max_tokens: 60000 });
  out.tooLarge = 'no error';
} catch (e) {
  out.tooLarge = { status: e.status, code: e.code };
}
console.log(JSON.stringify(out));
