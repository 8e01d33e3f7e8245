"""The KV-cache evaluation tools: scoring through the cache in chunks (equal to the uncached pass on a float32
cache), `eval kld` (zero against itself, above zero for a compressed cache), `eval ppl --kv-cache-dtype`, and
the passkey prompts."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tinymodel import write_tiny_llama
from tokenmill import LLM
from tokenmill.cli import main
from tokenmill.compress.passkey import FILLER, passkey_prompt
from tokenmill.model.loader.checkpoint import load_checkpoint
from tokenmill.texts import shipped_text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    write_tiny_llama(folder, load_checkpoint().tokenizer, seed=5)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=2**22, block_size=4)
    return folder, llm, llm.tokenizer.encode(shipped_text("eval_en.txt"))[:45]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_scoring_through_a_float32_cache_equals_the_uncached_pass(tiny, chunk):
    """The plain path (one uncached pass) and the cached one (chunks written to the cache, then attended from
    it) give the same logits; the blocks go back to the pool."""
    _, llm, ids = tiny
    assert llm.engine.kv_cache.dtype == torch.float32
    free = llm.engine.kv_manager.pool.num_free
    torch.testing.assert_close(llm.engine.score_through_cache(ids, chunk), llm.score(ids), rtol=1e-4, atol=1e-4)
    assert llm.engine.kv_manager.pool.num_free == free


def test_eval_kld_is_zero_against_itself_and_not_for_int8(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    results = {}
    for dtype in ("float32", "int8"):
        out = tmp_path / f"{dtype}.json"
        argv = ["eval", "kld", str(folder), "--dtype", "float32", "--kv-cache-dtype", dtype,
                "--reference-kv-cache-dtype", "float32", "--max-tokens", "48", "--context-len", "32", "--stride",
                "16", "--max-num-batched-tokens", "8", "--save-result", str(out)]
        assert main(argv) == 0
        results[dtype] = json.loads(out.read_text())
    assert "KLD" in capsys.readouterr().out
    same, int8 = results["float32"], results["int8"]
    assert same["num_tokens"] == 47 and same["mean"] == 0 and same["top1_agreement"] == 1
    assert same["perplexity_change"] == 0
    assert int8["mean"] > 0 and int8["kv_cache_dtype"] == "int8" and int8["chunk"] == 8


def test_eval_kld_of_turboquant_falls_with_its_bits(tiny, tmp_path):
    """--kv-cache-bits reaches the cache: at 4 bits the KL divergence from float32 is below 2.5 bits' (with no
    recent rows: at this context, the default two blocks would cover every key)."""
    folder, _, _ = tiny
    means = {}
    for bits in ("2.5", "4"):
        out = tmp_path / f"tq{bits}.json"
        assert main(["eval", "kld", str(folder), "--dtype", "float32", "--kv-cache-dtype", "turboquant",
                     "--kv-cache-bits", bits, "--kv-cache-recent-blocks", "0", "--reference-kv-cache-dtype",
                     "float32", "--max-tokens", "48",
                     "--context-len", "32", "--stride", "16", "--max-num-batched-tokens", "8",
                     "--save-result", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["kv_cache_bits"] == float(bits)
        means[bits] = result["mean"]
    assert 0 < means["4"] < means["2.5"]


def test_eval_ppl_through_the_cache(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    scores = {}
    for extra in ([], ["--kv-cache-dtype", "float32", "--max-num-batched-tokens", "7"]):
        out = tmp_path / "ppl.json"
        assert main(["eval", "ppl", str(folder), "--dtype", "float32", "--max-tokens", "40", "--context-len", "32",
                     "--stride", "16", "--save-result", str(out), *extra]) == 0
        scores[bool(extra)] = json.loads(out.read_text())
    assert "in the loop (7-token chunks)" in capsys.readouterr().out
    assert scores[True]["kv_cache_dtype"] == "float32" and scores[False]["kv_cache_dtype"] is None
    assert scores[True]["perplexity"] == pytest.approx(scores[False]["perplexity"], rel=1e-4)


def test_eval_chunk_flag_without_a_cache_type_is_refused(capsys):
    assert main(["eval", "ppl", "/model/that/is/never/opened.gguf", "--max-num-batched-tokens", "8"]) == 2
    err = capsys.readouterr().err
    assert "--kv-cache-dtype" in err and "never/opened" not in err


@pytest.mark.parametrize("length,depth", [(512, 0.1), (2048, 0.5), (2048, 0.9)])
def test_passkey_prompt_hides_the_key_at_its_depth(length, depth):
    tokenizer = load_checkpoint().tokenizer
    prompt = passkey_prompt(SimpleNamespace(tokenizer=tokenizer), length, depth, 73915)
    assert abs(len(tokenizer.encode(prompt)) - length) < 0.05 * length
    assert prompt.count("73915") == 2 and prompt.endswith("The pass key is")
    before = prompt[: prompt.index("The pass key is 73915")].count(FILLER)
    assert abs(before / prompt.count(FILLER) - depth) < 0.02


def test_eval_passkey_cli_runs_each_length_and_depth(tiny, tmp_path):
    folder, _, _ = tiny
    out = tmp_path / "passkey.json"
    assert main(["eval", "passkey", str(folder), "--dtype", "float32", "--lengths", "96", "128", "--depths", "0.2",
                 "0.8", "--kv-cache-dtype", "int8", "--max-num-batched-tokens", "32", "--save-result", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["kv_cache_dtype"] == "int8"
    assert [(t["length"], t["depth"]) for t in saved["trials"]] == [(96, 0.2), (96, 0.8), (128, 0.2), (128, 0.8)]
    assert all(abs(t["prompt_tokens"] - t["length"]) < 16 for t in saved["trials"])
