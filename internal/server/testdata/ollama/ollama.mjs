// Drives llproxy's Ollama API with the official ollama client.
// ollama_test.go starts the gateway in front of an OpenAI-compatible
// upstream, runs this with GATEWAY_URL set, and checks what it prints.
import { Ollama } from 'ollama';

const o = new Ollama({ host: process.env.GATEWAY_URL });
const model = 'llama3:8b';
const out = {};

out.version = (await o.version()).version;
out.list = (await o.list()).models.map((m) => m.name);
out.show = (await o.show({ model })).capabilities;

const chat = await o.chat({ model, messages: [{ role: 'user', content: 'hi' }], options: { num_predict: 50, temperature: 0 } });
out.chat = { content: chat.message.content, done: chat.done, reason: chat.done_reason, prompt: chat.prompt_eval_count, eval: chat.eval_count, total: chat.total_duration > 0 };

let text = '';
let last;
for await (const part of await o.chat({ model, messages: [{ role: 'user', content: 'hi' }], stream: true })) {
  text += part.message.content;
  last = part;
}
out.chatStream = { text, done: last.done, eval: last.eval_count, reason: last.done_reason };

const gen = await o.generate({ model, prompt: 'hi', system: 'be brief' });
out.generate = { response: gen.response, done: gen.done, prompt: gen.prompt_eval_count };

text = '';
for await (const part of await o.generate({ model, prompt: 'hi', stream: true })) {
  text += part.response;
  last = part;
}
out.generateStream = { text, done: last.done };

out.load = (await o.generate({ model, prompt: '' })).done_reason;
out.unload = (await o.generate({ model, prompt: '', keep_alive: 0 })).done_reason;
out.chatLoad = (await o.chat({ model, messages: [] })).done_reason;

try {
  await o.chat({ model: 'no-such-model', messages: [{ role: 'user', content: 'x' }] });
  out.error = 'none';
} catch (e) {
  out.error = { status: e.status_code, message: e.message };
}

console.log(JSON.stringify(out));
