"""Structured outputs and tool calls, p3 beside llama.cpp's llama-server, on the same GGUF and
the same prompts, in one run: is each output valid, and how fast did it come.

    python scripts/compare_structured.py --llama-server ../shared/tools/llama.cpp/bin/llama-server

Both serve the default model (SmolLM2-135M-Instruct, the same Q4_1 file; llama-server with
--jinja, which its response_format and tools need). For every prompt, a JSON schema answer,
a JSON-object answer and a required tool call, greedy and sampled, through the official
openai SDK; each output parsed and validated against its schema. Prints one line per case
with both verdicts and tokens/s (an invalid one says why, and its finish reason: "length"
is an answer cut at max_tokens), then the totals. Not a test: figures swing on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jsonschema
import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
PROMPTS = [
    "Describe Ann, aged 31, who likes chess and tea.",
    "Tell me about a retired sailor called Bo.",
    "Invent a person and describe them.",
    "What is the weather like in Lisbon today?",
]


def cases():
    for i, text in enumerate(PROMPTS):
        for temperature in (0.0, 0.8):
            body = {
                "messages": [{"role": "user", "content": text}],
                "temperature": temperature,
                "seed": 100 + i,
                "max_tokens": 200,
            }
            schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
            yield f"schema t={temperature} #{i}", PERSON, {**body, "response_format": schema}
            json_object = {"response_format": {"type": "json_object"}}
            yield f"object t={temperature} #{i}", {"type": "object"}, {**body, **json_object}
            tool = {"tools": TOOLS, "tool_choice": "required"}
            yield f"tool t={temperature} #{i}", WEATHER, {**body, **tool}


def ask(client: openai.OpenAI, model: str, body: dict, schema: dict) -> tuple[bool, str, float]:
    """(valid, why not, tokens/s) of one answer."""
    started = time.perf_counter()
    try:
        r = client.chat.completions.create(model=model, **body)
    except openai.APIError as exc:
        return False, f"error: {str(exc)[:60]}", 0.0
    elapsed = time.perf_counter() - started
    message = r.choices[0].message
    if body.get("tools"):
        calls = message.tool_calls or []
        if not calls:
            return False, f"no tool call: {(message.content or '')[:50]!r}", 0.0
        text = calls[0].function.arguments
    else:
        text = message.content or ""
    rate = r.usage.completion_tokens / elapsed if r.usage else 0.0
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError) as exc:
        finish = r.choices[0].finish_reason
        return False, f"{type(exc).__name__} ({finish}): {text[:40]!r}", rate
    return True, "", rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-server", required=True, help="path to llama-server")
    args = p.parse_args()
    from llama_cpp import llama_server

    from p3.nodes.actor.launch import free_port
    from p3.weights.files import default_gguf_path

    threads = len(os.sched_getaffinity(0))
    port = free_port("127.0.0.1")
    llama = llama_server(args.llama_server, default_gguf_path(), port, 4, threads, "--jinja")
    p3 = subprocess.Popen([sys.executable, "-m", "p3", "serve", "--port", "0", "--nodes", "1"],
                          stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = next(line.split(" at ")[1].strip() for line in p3.stdout if "serving" in line)
        clients = {
            "p3": openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=300),
            "llama.cpp": openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300
            ),
        }
        models = {name: c.models.list().data[0].id for name, c in clients.items()}
        totals = {name: [0, 0, []] for name in clients}
        print(f"{'case':<22} {'p3':>6} {'tok/s':>6}  {'llama.cpp':>9} {'tok/s':>6}  why not")
        for label, schema, body in cases():
            verdicts = {}
            for name, client in clients.items():
                ok, why, rate = ask(client, models[name], body, schema)
                verdicts[name] = (ok, why, rate)
                totals[name][0] += ok
                totals[name][1] += 1
                totals[name][2].append(rate)
            (a, _, ra), (b, _, rb) = verdicts["p3"], verdicts["llama.cpp"]
            why = "; ".join(f"{n}: {w}" for n, (_, w, _) in verdicts.items() if w)
            print(f"{label:<22} {'valid' if a else 'NO':>6} {ra:6.1f}  {'valid' if b else 'NO':>9} "
                  f"{rb:6.1f}  {why}", flush=True)  # fmt: skip
        for name, (ok, n, rates) in totals.items():
            mean = sum(rates) / len(rates)
            print(f"{name}: {ok}/{n} valid, {mean:.1f} tok/s a request on average")
    finally:
        for proc in (p3, llama):
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
