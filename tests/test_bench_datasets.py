"""Benchmark datasets: reproducible, the asked-for sizes, ShareGPT read the standard way, the built-in set shipped."""
from __future__ import annotations

import json
import random

import pytest

from tokenmill.bench import BenchError
from tokenmill.bench.datasets import (
    DatasetConfig,
    build_requests,
    load_tokenizer,
    parse_range,
    sharegpt_requests,
)
from tokenmill.texts import builtin_prompts


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def test_builtin_prompts_are_shipped_and_varied():
    prompts = builtin_prompts()
    assert len(prompts) >= 100
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert {"question", "summarization", "code", "creative"} <= {p["category"] for p in prompts}
    requests = build_requests(DatasetConfig("builtin", 150, seed=1, output_len=(8, 32)))
    assert len(requests) == 150 and all(8 <= r.output_len <= 32 for r in requests)
    assert len({r.prompt for r in requests[:100]}) == 100  # every prompt once before any repeats
    assert requests == build_requests(DatasetConfig("builtin", 150, seed=1, output_len=(8, 32)))
    assert requests != build_requests(DatasetConfig("builtin", 150, seed=2, output_len=(8, 32)))


def test_random_prompts_are_real_text_cut_to_length(tokenizer):
    config = DatasetConfig("random", 20, seed=0, input_len=(50, 120), output_len=(16, 16))
    requests = build_requests(config)
    assert requests == build_requests(config)
    assert len({r.prompt for r in requests}) == 20
    for r in requests:
        assert r.output_len == 16 and r.system is None
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))  # what is sent, counted
        assert 45 <= r.prompt_len <= 125  # a cut may re-tokenize a few tokens differently
        assert sum(c.isalpha() for c in r.prompt) > len(r.prompt) / 2  # prose, not random ids
    assert build_requests(DatasetConfig("random", 3, input_len=(600, 600)))[0].prompt_len >= 590


def test_shared_prefix_requests_share_one_system_prompt(tokenizer):
    requests = build_requests(DatasetConfig("shared-prefix", 120, seed=0, prefix_len=300, output_len=(4, 4)))
    assert len({r.system for r in requests}) == 1
    assert 290 <= len(tokenizer.encode(requests[0].system, add_special_tokens=False)) <= 310
    assert len({r.prompt for r in requests}) == 120  # distinct questions, also past the 100 built-in prompts
    assert all(r.prompt_len > 300 for r in requests)


def test_shared_prefix_requests_draw_from_several_tenants():
    requests = build_requests(DatasetConfig("shared-prefix", 200, seed=1, prefix_len=64, num_prefixes=16,
                                            output_len=(4, 4)))
    systems = [r.system for r in requests]
    assert len(set(systems)) == 16 and max(map(systems.count, systems)) < 40  # every tenant, none dominating
    assert systems != sorted(systems, key=systems.index)  # interleaved, not in runs
    with pytest.raises(BenchError, match="--num-prefixes must be >= 1"):
        build_requests(DatasetConfig("shared-prefix", 2, num_prefixes=0))


def conversation(*turns: tuple[str, str]) -> dict:
    return {"id": "x", "conversations": [{"from": who, "value": text} for who, text in turns]}


def test_sharegpt_first_human_turn_and_reply_length(tmp_path, tokenizer):
    long_reply = "The answer has quite a few words in it, to make the reply longer than four tokens."
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        conversation(("system", "be nice"), ("human", "What is the capital city of France, please?"),
                     ("gpt", long_reply), ("human", "And Spain?"), ("gpt", "Madrid.")),
        conversation(("gpt", "Hello! How can I help you today?")),  # no human turn: skipped
        conversation(("human", "Hi"), ("gpt", long_reply)),  # prompt under 4 tokens: skipped
        conversation(("human", "Tell me a joke about computers and their owners."), ("gpt", "No.")),  # reply too short
        {"not": "a conversation"},
    ]))
    (request,) = sharegpt_requests(path, tokenizer, 1, None, random.Random(0))
    assert request.prompt == "What is the capital city of France, please?"
    assert request.output_len == len(tokenizer.encode(long_reply, add_special_tokens=False))
    assert request.prompt_len == len(tokenizer.encode(request.prompt, add_special_tokens=False))
    (fixed,) = sharegpt_requests(path, tokenizer, 1, (7, 7), random.Random(0))
    assert fixed.output_len == 7
    with pytest.raises(BenchError, match="only 1 usable conversations"):
        sharegpt_requests(path, tokenizer, 2, None, random.Random(0))


@pytest.mark.parametrize("config,message", [
    (DatasetConfig("sharegpt", 4), "needs --dataset-path"),
    (DatasetConfig("builtin", 0), "--num-prompts must be >= 1"),
    (DatasetConfig("nope", 1), "unknown dataset"),
])
def test_bad_dataset_configs_are_clear_errors(config, message):
    with pytest.raises(BenchError, match=message):
        build_requests(config)


def test_unreadable_sharegpt_file_is_a_clear_error(tmp_path, tokenizer):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchError, match="cannot read the ShareGPT file"):
        sharegpt_requests(bad, tokenizer, 1, None, random.Random(0))


def test_parse_range():
    assert parse_range("128") == (128, 128)
    assert parse_range("64:256") == (64, 256)
    for bad in ("0", "9:3", "a", "1:b"):
        with pytest.raises(BenchError):
            parse_range(bad)


def test_held_out_prompts_are_the_benchmarks_and_never_train():
    from tokenmill.texts import HELD_OUT, held_out_prompts, training_prompts

    chat, code = held_out_prompts("question"), held_out_prompts("code")
    assert chat == list(builtin_prompts()[:HELD_OUT["question"]])  # the chat workloads' first 16 prompts
    assert len(code) == HELD_OUT["code"] and {p["category"] for p in code} == {"code"}
    train = {p["id"] for p in training_prompts()}
    assert not train & {p["id"] for p in chat + code}
    assert len(train) + len(chat) + len(code) == len(builtin_prompts())
