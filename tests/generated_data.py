"""Generated data of the kinds people fine-tune on, at realistic shapes, for tests that must not need shared files.

Agent trajectories (OpenAI messages and LLaMA-Factory ShareGPT): a tools field, multi-step calls, parallel calls,
calls with null or empty content, arguments stored as JSON text, tool results in Chinese and long ones; raw text
(documents of very different lengths); prompt/completion pairs, plain and conversational. Deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search_docs", "description": "Full-text search over the manual",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer"}},
                   "required": ["query"]}}}
TOOLS = [WEATHER, SEARCH]
CITIES = ["Paris", "東京", "Berlin", "上海", "Lima", "Oslo"]
WEATHER_ZH = ["晴，22°C，东南风三级", "多云转小雨，17°C", "大雪，-3°C，注意防寒", "阴，12°C，空气质量良"]


def _call(name: str, arguments: dict, index: int, as_text: bool) -> dict:
    args = json.dumps(arguments, ensure_ascii=False) if as_text else arguments
    return {"id": f"call{index:05d}", "type": "function", "function": {"name": name, "arguments": args}}


def trajectory(k: int, system: bool = True, say_before_calls: bool = True) -> dict:
    """One agent record: a weather call (arguments as JSON text on odd k), its Chinese result, an answer; then a
    follow-up with two parallel searches (with a sentence before them unless not ``say_before_calls``) whose results
    are long, and a final answer."""
    rng = random.Random(k)
    city, other = rng.sample(CITIES, 2)
    messages = [{"role": "system", "content": "You are a careful travel assistant."}] if system else []
    messages += [
        {"role": "user", "content": f"What's the weather in {city} right now?"},
        {"role": "assistant", "content": None if k % 2 else "",
         "tool_calls": [_call("get_weather", {"city": city, "unit": "c"}, 1, as_text=bool(k % 2))]},
        {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": rng.choice(WEATHER_ZH)},
        {"role": "assistant", "content": f"In {city} it is {rng.choice(['sunny', 'rainy', 'cold'])} today."},
        {"role": "user", "content": f"Compare the manual's advice for {city} and {other}."},
        {"role": "assistant", "content": "Let me look both up." if say_before_calls else "",
         "tool_calls": [_call("search_docs", {"query": city, "top_k": 3}, 2, as_text=False),
                        _call("search_docs", {"query": other, "top_k": 3}, 3, as_text=True)]},
        {"role": "tool", "tool_call_id": "call00002", "content": _long_result(city, rng)},
        {"role": "tool", "tool_call_id": "call00003", "content": _long_result(other, rng)},
        {"role": "assistant", "content": f"{city}: pack layers. {other}: bring an umbrella."},
    ]
    return {"messages": messages, "tools": TOOLS if k % 3 else json.dumps(TOOLS, ensure_ascii=False)}


def _long_result(city: str, rng: random.Random) -> str:
    lines = [f"[{i}] {city}: " + " ".join(rng.choice(["walk", "museum", "雨伞", "train", "café", "地铁", "coat"])
                                          for _ in range(10)) for i in range(6)]
    return "\n".join(lines)


def sharegpt_trajectory(k: int) -> dict:
    """The same kind of record in LLaMA-Factory's ShareGPT convention: function_call / observation turns and a
    ``tools`` field holding a JSON string of flat function specs."""
    rng = random.Random(100 + k)
    city = rng.choice(CITIES)
    flat = [t["function"] for t in TOOLS]
    return {"conversations": [
        {"from": "human", "value": f"Weather in {city}?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": city}},
                                                      ensure_ascii=False)},
        {"from": "observation", "value": rng.choice(WEATHER_ZH)},
        {"from": "gpt", "value": f"{city}: see above, dress accordingly."},
    ], "system": "Use tools when needed.", "tools": json.dumps(flat, ensure_ascii=False)}


def document(k: int) -> dict:
    rng = random.Random(200 + k)
    words = ["the", "river", "city", "春", "风", "walks", "through", "old", "streets", "月", "light", "and"]
    size = 3000 if k % 4 == 0 else rng.choice([20, 60, 120])  # every fourth document is long
    return {"text": " ".join(rng.choice(words) for _ in range(size)) + "."}


def completion(k: int) -> dict:
    return {"prompt": f"Q: what is {k} + {k}?\nA:", "completion": f" {2 * k}"}


def conversational_completion(k: int) -> dict:
    return {"prompt": [{"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": f"Capital of country #{k}?"},
                       {"role": "assistant", "content": "Which list?"},
                       {"role": "user", "content": "The UN list."}],
            "completion": [{"role": "assistant", "content": f"City{k}"}]}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_all(folder: Path, n: int = 12) -> dict[str, Path]:
    """One file per format in ``folder``: tools.jsonl, sharegpt_tools.json, corpus.jsonl, book.txt,
    completions.jsonl, chat_completions.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    book = folder / "book.txt"
    book.write_text("\n\n".join(document(1000 + k)["text"] for k in range(6)) + "\n", encoding="utf-8")
    sharegpt = folder / "sharegpt_tools.json"
    sharegpt.write_text(json.dumps([sharegpt_trajectory(k) for k in range(n)], ensure_ascii=False, indent=1),
                        encoding="utf-8")
    return {
        "tools": write_jsonl(folder / "tools.jsonl", [trajectory(k, system=k % 2 == 0) for k in range(n)]),
        "sharegpt": sharegpt,
        "corpus": write_jsonl(folder / "corpus.jsonl", [document(k) for k in range(n)]),
        "book": book,
        "completions": write_jsonl(folder / "completions.jsonl", [completion(k) for k in range(n)]),
        "chat_completions": write_jsonl(folder / "chat_completions.jsonl",
                                        [conversational_completion(k) for k in range(n)]),
    }


def all_texts(n: int = 12) -> list[str]:
    """Texts of every kind, for training a tiny tokenizer that knows them."""
    texts = [json.dumps(trajectory(k), ensure_ascii=False) for k in range(n)]
    texts += [json.dumps(sharegpt_trajectory(k), ensure_ascii=False) for k in range(n)]
    texts += [document(k)["text"] for k in range(n)] + [json.dumps(completion(k)) for k in range(n)]
    texts += [json.dumps(conversational_completion(k)) for k in range(n)]
    return texts
