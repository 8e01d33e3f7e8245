"""The fuzz phase of benchmarks/reliability.py: ~100 bad inputs (lone surrogates, n and prompt counts over the
limits, huge stop lists, a 20 MB body, non-finite numbers written as JSON tokens, wrong types), each with the param
its 4xx error must name, and run_fuzz, which sends each one followed by a good request on the same connection.
"""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
from tqdm import tqdm


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def fuzz_cases() -> list[tuple[str, str, bytes, str | None]]:
    """(name, path, raw body, the param the error must name; None: no single field is to blame)."""
    C, K, T, D = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, str, bytes, str | None]] = []

    def add(name: str, path: str, body: Any, param: str | None) -> None:
        cases.append((name, path, body if isinstance(body, bytes) else _json(body), param))

    # lone surrogates, escaped and as raw UTF-8-encoded bytes (ED A0 80)
    for s in ("\ud800", "\udfff", "a\udc00b"):
        add(f"surrogate {s!a} in prompt", C, {"prompt": s, "max_tokens": 1}, "prompt")
        add(f"surrogate {s!a} in chat content", K, {"messages": [{"role": "user", "content": s}], "max_tokens": 1},
            "messages[0].content")
    add("surrogate in prompt list", C, {"prompt": ["ok", "\ud800"], "max_tokens": 1}, "prompt[1]")
    add("surrogate in stop", C, {"prompt": "hi", "max_tokens": 1, "stop": ["\ud800"]}, "stop[0]")
    add("surrogate in stop string", C, {"prompt": "hi", "max_tokens": 1, "stop": "\ud800"}, "stop")
    add("surrogate in user", C, {"prompt": "hi", "max_tokens": 1, "user": "\ud800"}, "user")
    add("surrogate in model", C, {"prompt": "hi", "max_tokens": 1, "model": "\ud800"}, "model")
    add("surrogate in text part", K, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}],
                                      "max_tokens": 1}, "messages[0].content[0].text")
    add("surrogate in tokenize prompt", T, {"prompt": "x\ud800"}, "prompt")
    add("surrogate in tokenize messages", T, {"messages": [{"role": "user", "content": "\udbff"}]},
        "messages[0].content")
    add("raw ED A0 80 bytes in prompt", C, b'{"prompt": "a\xed\xa0\x80", "max_tokens": 1}', "prompt")
    add("raw ED A0 80 bytes in chat content", K,
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}], "max_tokens": 1}', "messages[0].content")
    add("raw ED B0 80 bytes in tokenize", T, b'{"prompt": "\xed\xb0\x80"}', "prompt")
    # n and prompt counts
    for n in (129, 1000, 100000, 10**12):
        add(f"n={n}", C, {"prompt": "hi", "max_tokens": 1, "n": n}, "n")
    add("n=1000 chat", K, {"messages": msg, "max_tokens": 1, "n": 1000}, "n")
    for n in (0, -1):
        add(f"n={n}", C, {"prompt": "hi", "max_tokens": 1, "n": n}, "n")
    add("n as string", C, {"prompt": "hi", "max_tokens": 1, "n": "two"}, "n")  # "2" is coerced to 2 (pydantic lax)
    add("n as float", C, {"prompt": "hi", "max_tokens": 1, "n": 1.5}, "n")
    for k in (257, 300, 5000):
        add(f"{k} prompts", C, {"prompt": ["hi"] * k, "max_tokens": 1}, "prompt")
    add("300 token-id prompts", C, {"prompt": [[1, 2]] * 300, "max_tokens": 1}, "prompt")
    add("empty prompt list", C, {"prompt": [], "max_tokens": 1}, "prompt")
    # stop lists
    for k in (129, 200, 10000):
        add(f"{k} stop strings", C, {"prompt": "hi", "max_tokens": 1, "stop": [f"s{i}" for i in range(k)]}, "stop")
    add("one 600-char stop", C, {"prompt": "hi", "max_tokens": 1, "stop": ["x" * 600]}, "stop")
    add("200 stop strings chat", K, {"messages": msg, "max_tokens": 1, "stop": [f"s{i}" for i in range(200)]}, "stop")
    add("stop as int", C, {"prompt": "hi", "max_tokens": 1, "stop": 5}, "stop")
    add("stop list of ints", C, {"prompt": "hi", "max_tokens": 1, "stop": [1, 2]}, "stop")
    # non-finite and out-of-range numbers, as the JSON tokens Python's decoder accepts
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        for token in ("Infinity", "-Infinity", "NaN"):
            add(f"{field}={token}", C, f'{{"prompt": "hi", "max_tokens": 1, "{field}": {token}}}'.encode(), field)
    add("temperature=Infinity chat", K,
        b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": Infinity}', "temperature")
    add("temperature=1e999 (overflows to inf)", C, b'{"prompt": "hi", "max_tokens": 1, "temperature": 1e999}',
        "temperature")
    for field, value in (("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", -2), ("min_p", 2),
                         ("presence_penalty", 3), ("frequency_penalty", -3), ("repetition_penalty", 0),
                         ("repetition_penalty", -1), ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10**6),
                         ("logprobs", 21), ("logprobs", -1), ("seed", 2**64), ("priority", 2**70)):
        add(f"{field}={value}", C, {"prompt": "hi", "max_tokens": 1, field: value}, field)
    add("top_logprobs=21", K, {"messages": msg, "max_tokens": 1, "logprobs": True, "top_logprobs": 21},
        "top_logprobs")
    add("max_completion_tokens=0", K, {"messages": msg, "max_completion_tokens": 0}, "max_completion_tokens")
    # wrong types and shapes
    for field, value in (("temperature", "hot"), ("max_tokens", "ten"), ("top_k", 1.5), ("stream", "maybe"),
                         ("echo", "maybe"), ("user", 5), ("model", 5), ("seed", "x"), ("priority", [1]),
                         ("stream_options", "x"), ("logprobs", "x"), ("ignore_eos", "x")):
        add(f"{field} as {type(value).__name__}", C, {"prompt": "hi", "max_tokens": 1, field: value}, field)
    add("stream_options without stream", C,
        {"prompt": "hi", "max_tokens": 1, "stream_options": {"include_usage": True}}, "stream_options")
    add("prompt as int", C, {"prompt": 5, "max_tokens": 1}, "prompt")
    add("prompt as dict", C, {"prompt": {"a": 1}, "max_tokens": 1}, "prompt")
    add("prompt mixed list", C, {"prompt": [[1, 2], "a"], "max_tokens": 1}, "prompt")
    add("prompt with bool ids", C, {"prompt": [True, False], "max_tokens": 1}, "prompt")
    add("prompt token id out of vocabulary", C, {"prompt": [999999999], "max_tokens": 1}, "prompt")
    add("prompt negative token id", C, {"prompt": [-1], "max_tokens": 1}, "prompt")
    add("prompt missing", C, {"max_tokens": 1}, "prompt")
    add("prompt too long for the context", C, {"prompt": "hello " * 9000, "max_tokens": 1}, "prompt")
    add("unknown model", C, {"prompt": "hi", "max_tokens": 1, "model": "no-such-model"}, "model")
    add("messages empty", K, {"messages": [], "max_tokens": 1}, "messages")
    add("messages missing", K, {"max_tokens": 1}, "messages")
    add("messages not a list", K, {"messages": "hi", "max_tokens": 1}, "messages")
    add("role robot", K, {"messages": [{"role": "robot", "content": "hi"}], "max_tokens": 1}, "messages[0].role")
    add("content int", K, {"messages": [{"role": "user", "content": 5}], "max_tokens": 1}, "messages[0].content")
    add("content image part", K, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x"}}]}], "max_tokens": 1}, "messages[0].content")
    add("content missing", K, {"messages": [{"role": "user"}], "max_tokens": 1}, "messages[0].content")
    add("tokenize prompt int", T, {"prompt": 5}, "prompt")
    add("detokenize strings", D, {"tokens": ["a"]}, "tokens[0]")
    add("detokenize negative id", D, {"tokens": [-5]}, "tokens")
    add("detokenize huge id", D, {"tokens": [2**40]}, "tokens")
    add("detokenize missing", D, {}, "tokens")
    # bodies
    add("invalid JSON", C, b'{"prompt": "hi", ', None)
    add("empty body", C, b"", None)
    add("JSON array body", C, b'[1, 2]', None)
    add("JSON null body", C, b"null", None)
    add("not UTF-8", C, b'{"prompt": "\xff\xfe"}', None)
    add("20 MB body", C, b'{"prompt": "' + b"a" * (20 * 2**20) + b'", "max_tokens": 1}', None)
    add("deeply nested", C, b'{"prompt": "hi", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", None)
    return cases


def _client_port(response: httpx.Response) -> int | None:
    stream = response.extensions.get("network_stream")
    try:
        return stream.get_extra_info("client_addr")[1] if stream is not None else None
    except Exception:  # noqa: BLE001 - only a diagnostic
        return None


def run_fuzz(url: str) -> dict[str, Any]:
    good = {"prompt": "Hi", "max_tokens": 1}
    rows = []
    with httpx.Client(timeout=120) as client:
        for name, path, raw, param in tqdm(fuzz_cases(), desc="fuzz", unit="case"):
            row: dict[str, Any] = {"case": name, "path": path, "expected_param": param}
            try:
                r = client.post(url + path, content=raw, headers={"Content-Type": "application/json"})
                row["status"] = r.status_code
                row["connection_close"] = r.headers.get("connection", "").lower() == "close"
                try:
                    error = r.json().get("error", {}) if r.status_code != 200 else {}
                except (json.JSONDecodeError, AttributeError):
                    error = {"message": f"(not a JSON error body: {r.text[:100]!r})"}
                row["param"] = error.get("param")
                row["message"] = str(error.get("message", ""))[:160]
                port = _client_port(r)
            except httpx.HTTPError as exc:
                row.update(status=None, param=None, message=f"{type(exc).__name__}: {exc}"[:160])
                port = None
            row["is_4xx"] = row["status"] is not None and 400 <= row["status"] < 500
            row["param_ok"] = param is None or row["param"] == param
            try:
                follow = client.post(url + "/v1/completions", json=good)
                row["follow_up"] = follow.status_code
                row["same_connection"] = port is not None and _client_port(follow) == port
            except httpx.HTTPError as exc:
                row["follow_up"] = f"{type(exc).__name__}"
                row["same_connection"] = False
            rows.append(row)
    return {
        "cases": len(rows),
        "four_xx": sum(r["is_4xx"] for r in rows),
        "status_5xx": sum((r["status"] or 0) >= 500 for r in rows),
        "no_response": sum(r["status"] is None for r in rows),
        "with_expected_param": sum(r["expected_param"] is not None for r in rows),
        "param_ok": sum(r["param_ok"] and r["expected_param"] is not None for r in rows),
        "follow_up_ok": sum(r["follow_up"] == 200 for r in rows),
        "follow_up_same_connection": sum(r["same_connection"] for r in rows),
        "statuses": dict(Counter(str(r["status"]) for r in rows)),
        "not_ok": [r for r in rows if not (r["is_4xx"] and r["param_ok"] and r["follow_up"] == 200)],
        "new_connection_cases": [f"{r['case']} ({r['status']}, Connection: close={r.get('connection_close')})"
                                 for r in rows if not r["same_connection"]],
        "rows": rows,
    }
