"""Drives a running DOPD router with the official `openai` Python client: chat with and without
streaming, completions with and without streaming, and two errors. Exits non-zero on any
failure. Usage: python3 scripts/e2e-openai.py BASE_URL MODEL   (BASE_URL ends in /v1)."""

import sys

import openai

base, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
question = [{"role": "user", "content": "What is the capital of France?"}]

r = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
answer = r.choices[0].message.content
print(f"chat: {answer!r} usage={r.usage}")
assert "Paris" in answer, answer
assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
assert r.choices[0].finish_reason in ("stop", "length")

parts, usage = [], None
for chunk in client.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage:
        usage = chunk.usage
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
streamed = "".join(parts)
print(f"chat stream: {streamed!r} usage={usage}")
assert streamed == answer, (streamed, answer)
assert usage is not None and usage.completion_tokens > 0

r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                              temperature=0)
text = r.choices[0].text
print(f"completion: {text!r}")
assert any(c.isalpha() for c in text), text

parts = [c.choices[0].text for c in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True)
    if c.choices]
print(f"completion stream: {''.join(parts)!r}")
assert "".join(parts) == text

try:
    client.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    print(f"unknown model -> 404: {e.message}")
try:
    client.chat.completions.create(model=model, messages=question, max_tokens=1_000_000)
    raise SystemExit("an oversized request was accepted")
except openai.BadRequestError as e:
    print(f"oversized -> 400: {e.message}")
assert [m.id for m in client.models.list().data] == [model]
print("openai client e2e: ok")
