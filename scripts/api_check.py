"""Checks `neuroshard serve` with the official OpenAI Python client (see api-check.sh)."""

import json
import sys

import openai

api, work, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
client = openai.OpenAI(base_url=api, api_key="sk-check", max_retries=0, timeout=60)
messages = [{"role": "user", "content": prompt}]
passed = failed = 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def cli(name):
    with open(f"{work}/{name}.json") as f:
        return json.load(f)


greedy, sampled, stopped = cli("greedy"), cli("sampled"), cli("stopped")

models = client.models.list()
check("models", [m.id for m in models.data] == ["demo"], models)

whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0)
check("whole text", whole.choices[0].message.content == greedy["text"], (whole.choices[0].message.content, greedy["text"]))
check("whole finish", whole.choices[0].finish_reason == "length", whole.choices[0].finish_reason)
check("usage", (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
      == (len(greedy["prompt_ids"]), 24, len(greedy["prompt_ids"]) + 24), whole.usage)

stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.choices:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
check("streamed text", text == greedy["text"], (text, greedy["text"]))
check("streamed finish", finish == "length", finish)
check("streamed usage", usage is not None and usage.completion_tokens == 24, usage)

same_seed = client.chat.completions.create(model="demo", messages=messages, max_tokens=24,
                                           temperature=0.8, top_p=0.95, seed=5)
check("sampled text", same_seed.choices[0].message.content == sampled["text"],
      (same_seed.choices[0].message.content, sampled["text"]))

stop = client.chat.completions.create(model="demo", messages=messages, max_tokens=24, temperature=0, stop=[" brought"])
check("stop text", stop.choices[0].message.content == stopped["text"], (stop.choices[0].message.content, stopped["text"]))
check("stop finish", stop.choices[0].finish_reason == "stop", stop.choices[0].finish_reason)
check("stop unprinted", " brought" not in stop.choices[0].message.content, stop.choices[0].message.content)

completion = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
check("completion", completion.object == "text_completion" and completion.usage.completion_tokens == 8
      and completion.choices[0].finish_reason == "length", completion)

# Log-probabilities as the client library types them: greedy, so each token is its position's best.
lp = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, temperature=0,
                                    logprobs=True, top_logprobs=3)
content = lp.choices[0].logprobs.content if lp.choices[0].logprobs else []
check("logprobs count", len(content) == 8, content)
check("logprobs text", "".join(bytes(t.bytes).decode("utf-8", "replace") for t in content)
      == lp.choices[0].message.content, content)
check("logprobs best", all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == t.logprob
                           and t.logprob <= 0 for t in content), content)

for name, call, status in [
    ("unknown model", lambda: client.chat.completions.create(model="nope", messages=messages), 404),
    ("n=2", lambda: client.chat.completions.create(model="demo", messages=messages, n=2), 400),
    ("negative max_tokens", lambda: client.chat.completions.create(model="demo", messages=messages, max_tokens=-1), 400),
    ("wrong key", lambda: openai.OpenAI(base_url=api, api_key="sk-wrong", max_retries=0).models.list(), 401),
]:
    try:
        call()
        check(name, False, "no error")
    except openai.APIStatusError as e:
        check(name, e.status_code == status and bool(e.message), (e.status_code, e.message))

print(f"api: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
