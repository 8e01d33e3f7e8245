"""What a benchmark sends: prompts with their intended output lengths, drawn reproducibly from one of four sources.

- random: windows of real English tokens (the built-in prompts' text, tokenized) at seeded random offsets,
  cut to lengths drawn from --input-len, so the server does real-text work at controlled sizes.
- sharegpt: a ShareGPT-format JSON file the user has; the first human turn is the prompt and the token
  length of the GPT reply that follows it is the output length.
- shared-prefix: one long system prompt shared by every request plus a distinct question each, the
  workload where prefix caching pays.
- builtin: ~100 realistic English prompts shipped with tokenmill (no download), in seeded order.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.bench import BenchError
from tokenmill.texts import builtin_prompts

if TYPE_CHECKING:
    from tokenmill.model.tokenizer import Tokenizer

DATASETS = ("random", "sharegpt", "shared-prefix", "builtin")
DEFAULT_OUTPUT_LEN = (64, 64)
# ShareGPT filters, as vLLM's benchmark applies them: drop near-empty turns and conversations too long to serve.
SHAREGPT_MIN_LEN, SHAREGPT_MAX_PROMPT, SHAREGPT_MAX_TOTAL = 4, 1024, 2048

LengthRange = tuple[int, int]  # inclusive; drawn uniformly


@dataclass(frozen=True)
class SampleRequest:
    """One request to send; the server's own usage numbers, not prompt_len, are what metrics count."""

    prompt: str
    output_len: int  # max_tokens
    prompt_len: int | None = None  # tokens by the benchmark's tokenizer; None where not counted (builtin)
    system: str | None = None  # a system prompt shared with other requests (shared-prefix)


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    num_prompts: int
    seed: int = 0
    input_len: LengthRange = (256, 256)
    output_len: LengthRange | None = None  # None: the dataset's default (ShareGPT: the reply's length)
    prefix_len: int = 512
    num_prefixes: int = 1  # shared-prefix: distinct system prompts (tenants), each request drawing one
    path: Path | None = None
    tokenizer: str | None = None  # a .gguf file or HF directory; None: the embedded default model


def parse_range(text: str) -> LengthRange:
    """'128' -> (128, 128); '64:256' -> (64, 256)."""
    lo_text, _, hi_text = text.partition(":")
    try:
        lo, hi = int(lo_text), int(hi_text or lo_text)
    except ValueError:
        raise BenchError(f"a length must be N or MIN:MAX with whole numbers, got {text!r}") from None
    if not 1 <= lo <= hi:
        raise BenchError(f"a length range needs 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


@cache
def load_tokenizer(model: str | None) -> Tokenizer:
    """Only the tokenizer of a model (GGUF metadata or tokenizer.json), without its weights; read once (seconds)."""
    from tokenmill.model.loader import load_tokenizer as load

    return load(model)


def corpus_tokens(tokenizer: Tokenizer) -> list[int]:
    """Real English token stream to cut prompts from: the built-in prompts, one after another."""
    return tokenizer.encode("\n\n".join(p["prompt"] for p in builtin_prompts()), add_special_tokens=False)


def _window(corpus: list[int], start: int, length: int) -> list[int]:
    return [corpus[(start + k) % len(corpus)] for k in range(length)]


def _text_of(tokenizer: Tokenizer, ids: list[int]) -> tuple[str, int]:
    """Text of `ids` and its length when encoded again (a cut can merge differently), so prompt_len is honest."""
    text = tokenizer.decode(ids)
    return text, len(tokenizer.encode(text, add_special_tokens=False))


def random_requests(tokenizer: Tokenizer, n: int, input_len: LengthRange, output_len: LengthRange,
                    rng: random.Random) -> list[SampleRequest]:
    corpus = corpus_tokens(tokenizer)
    requests = []
    for _ in range(n):
        text, length = _text_of(tokenizer, _window(corpus, rng.randrange(len(corpus)), rng.randint(*input_len)))
        requests.append(SampleRequest(text, rng.randint(*output_len), length))
    return requests


def shared_prefix_requests(tokenizer: Tokenizer, n: int, prefix_len: int, output_len: LengthRange,
                           rng: random.Random, num_prefixes: int = 1) -> list[SampleRequest]:
    """Every request: one of `num_prefixes` `prefix_len`-token system prompts (drawn at random: tenants whose
    users arrive interleaved), then its own numbered built-in question."""
    corpus = corpus_tokens(tokenizer)
    systems = [_text_of(tokenizer, _window(corpus, rng.randrange(len(corpus)), prefix_len))[0]
               for _ in range(num_prefixes)]
    prompts = list(builtin_prompts())
    rng.shuffle(prompts)
    requests = []
    for i in range(n):
        system = systems[rng.randrange(num_prefixes)] if num_prefixes > 1 else systems[0]
        question = f"Question {i + 1}: {prompts[i % len(prompts)]['prompt']}"  # numbered: distinct past 100 too
        length = len(tokenizer.encode(f"{system}\n\n{question}", add_special_tokens=False))
        requests.append(SampleRequest(question, rng.randint(*output_len), length, system))
    return requests


def builtin_requests(n: int, output_len: LengthRange, rng: random.Random) -> list[SampleRequest]:
    """Seeded order over the shipped prompts; past 100 requests the order repeats."""
    prompts = list(builtin_prompts())
    rng.shuffle(prompts)
    return [SampleRequest(prompts[i % len(prompts)]["prompt"], rng.randint(*output_len)) for i in range(n)]


def _first_exchange(conversation: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(first human turn, the GPT reply right after it), or None when the conversation has no such pair."""
    for turn, reply in zip(conversation, conversation[1:]):
        if turn.get("from") in ("human", "user") and reply.get("from") in ("gpt", "chatgpt", "assistant"):
            return str(turn.get("value", "")), str(reply.get("value", ""))
    return None


def sharegpt_requests(path: Path, tokenizer: Tokenizer, n: int, output_len: LengthRange | None,
                      rng: random.Random) -> list[SampleRequest]:
    """ShareGPT JSON: [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}, ...]."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BenchError(f"cannot read the ShareGPT file {path}: {exc}") from exc
    if not isinstance(entries, list):
        raise BenchError(f"{path} is not a ShareGPT file: expected a JSON list of {{'conversations': [...]}}")
    entries = list(entries)
    rng.shuffle(entries)
    requests: list[SampleRequest] = []
    for entry in entries:
        exchange = _first_exchange(entry.get("conversations") or []) if isinstance(entry, dict) else None
        if exchange is None:
            continue
        prompt, reply = exchange
        prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False))
        out_len = rng.randint(*output_len) if output_len else len(tokenizer.encode(reply, add_special_tokens=False))
        if (prompt_len < SHAREGPT_MIN_LEN or out_len < SHAREGPT_MIN_LEN or prompt_len > SHAREGPT_MAX_PROMPT
                or prompt_len + out_len > SHAREGPT_MAX_TOTAL):
            continue
        requests.append(SampleRequest(prompt, out_len, prompt_len))
        if len(requests) == n:
            return requests
    raise BenchError(f"{path} has only {len(requests)} usable conversations (a human turn followed by a GPT reply, "
                     f"each >= {SHAREGPT_MIN_LEN} tokens, prompt <= {SHAREGPT_MAX_PROMPT}, total <= "
                     f"{SHAREGPT_MAX_TOTAL}); ask for --num-prompts {len(requests)} or fewer")


def build_requests(config: DatasetConfig) -> list[SampleRequest]:
    """The requests of one benchmark run; the same config gives the same requests."""
    if config.num_prompts < 1:
        raise BenchError(f"--num-prompts must be >= 1, got {config.num_prompts}")
    rng = random.Random(config.seed)
    output_len = config.output_len or DEFAULT_OUTPUT_LEN
    if config.name == "builtin":
        return builtin_requests(config.num_prompts, output_len, rng)
    if config.name == "sharegpt" and config.path is None:
        raise BenchError("--dataset sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
    if config.name not in DATASETS:
        raise BenchError(f"unknown dataset {config.name!r}; choose one of {', '.join(DATASETS)}")
    tokenizer = load_tokenizer(config.tokenizer)
    if config.name == "random":
        return random_requests(tokenizer, config.num_prompts, config.input_len, output_len, rng)
    if config.name == "shared-prefix":
        if config.prefix_len < 1:
            raise BenchError(f"--prefix-len must be >= 1, got {config.prefix_len}")
        if config.num_prefixes < 1:
            raise BenchError(f"--num-prefixes must be >= 1, got {config.num_prefixes}")
        return shared_prefix_requests(tokenizer, config.num_prompts, config.prefix_len, output_len, rng,
                                      config.num_prefixes)
    return sharegpt_requests(config.path, tokenizer, config.num_prompts, config.output_len, rng)
