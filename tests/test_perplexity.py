"""Perplexity: the sliding window scores every token once, and the numbers equal a hand computation on
transformers' forward pass of the same tiny random checkpoint."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from tinymodel import write_tiny_llama
from tokenmill import LLM
from tokenmill.cli import main
from tokenmill.compress.perplexity import perplexity, sliding_windows
from tokenmill.model.loader.checkpoint import load_checkpoint
from tokenmill.texts import shipped_text


@pytest.fixture(scope="module")
def tokenizer():
    return load_checkpoint().tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny")
    model = write_tiny_llama(folder, tokenizer, seed=3)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=2**20)
    ids = llm.tokenizer.encode(shipped_text("eval_en.txt"))[:70]
    return folder, model, llm, ids


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 16, 4), (16, 16, 4), (17, 16, 4), (100, 16, 5),
                                              (100, 16, 15), (101, 8, 1), (1000, 512, 256)])
def test_windows_score_every_token_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    targets = [t for w in windows for t in range(w.first_target, w.end)]
    assert targets == list(range(1, n))  # each token but the first, once, in order
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.first_target <= w.end <= n and w.end - w.begin <= context
        if i:  # later windows: `stride` new tokens (fewer at the end), each with >= context - stride before it
            assert w.first_target - w.begin >= context - stride
            assert w.end - w.first_target <= stride
            assert w.begin == windows[i - 1].begin + stride


@pytest.mark.parametrize("n,context,stride,field", [(10, 1, 1, "context_len"), (10, 8, 8, "stride"),
                                                    (10, 8, 0, "stride"), (1, 8, 4, "at least 2 tokens")])
def test_bad_windows_are_named(n, context, stride, field):
    with pytest.raises(ValueError, match=field):
        sliding_windows(n, context, stride)


def _hf_token_nlls(model, ids: list[int]) -> torch.Tensor:
    """NLL of ids[1:] from one plain forward pass over all of ids."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").double()


def test_one_window_equals_exp_mean_nll_of_a_plain_forward(tiny):
    _, model, llm, ids = tiny
    result = perplexity(llm.score, ids, context_len=128, stride=64)
    expected = _hf_token_nlls(model, ids)
    assert result.num_tokens == len(ids) - 1 and result.num_windows == 1
    assert math.isclose(result.nll, expected.mean().item(), rel_tol=1e-5)
    assert math.isclose(result.perplexity, math.exp(expected.mean().item()), rel_tol=1e-5)


def test_sliding_windows_equal_a_plain_forward_over_each_windows_tokens(tiny):
    _, model, llm, ids = tiny
    context, stride = 16, 6
    result = perplexity(llm.score, ids, context, stride)
    by_hand = []
    for w in sliding_windows(len(ids), context, stride):  # token t is predicted from ids[w.begin:t] alone
        by_hand.append(_hf_token_nlls(model, ids[w.begin:w.end])[w.first_target - w.begin - 1:])
    assert sum(len(n) for n in by_hand) == result.num_tokens == len(ids) - 1
    assert math.isclose(result.nll, torch.cat(by_hand).mean().item(), rel_tol=1e-5)
    # less context than one long window: the loss differs, so the windowing is not a no-op at this size
    assert not math.isclose(result.nll, _hf_token_nlls(model, ids).mean().item(), rel_tol=1e-4)


def test_eval_ppl_cli_prints_and_saves(tiny, tmp_path, capsys):
    folder, _, llm, _ = tiny
    dataset = tmp_path / "text.txt"
    dataset.write_text(shipped_text("calibration_en.txt"))
    out = tmp_path / "ppl.json"
    argv = ["eval", "ppl", str(folder), "--dataset", str(dataset), "--dtype", "float32", "--max-tokens", "64",
            "--context-len", "32", "--stride", "16", "--save-result", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    ids = llm.tokenizer.encode(dataset.read_text())[:64]
    expected = perplexity(llm.score, ids, 32, 16)
    assert saved["num_tokens"] == 63 and saved["num_windows"] == expected.num_windows
    assert math.isclose(saved["perplexity"], expected.perplexity, rel_tol=1e-6)
    assert f"{expected.perplexity:.4f}" in printed and "63 tokens" in printed


@pytest.mark.parametrize("argv,field", [(["--stride", "512"], "stride"), (["--max-tokens", "1"], "--max-tokens"),
                                        (["--dataset", "/no/such/file.txt"], "/no/such/file.txt")])
def test_eval_ppl_cli_errors_before_loading(argv, field, capsys):
    assert main(["eval", "ppl", "/model/that/is/never/opened.gguf", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and field in err and "never/opened" not in err


def test_shipped_texts_are_long_and_disjoint(tokenizer):
    evaluation, calibration = shipped_text("eval_en.txt"), shipped_text("calibration_en.txt")
    assert len(tokenizer.encode(evaluation)) > 13000 and len(tokenizer.encode(calibration)) > 2000
    paragraphs = {p.strip() for p in evaluation.split("\n\n") if p.strip()}
    assert not paragraphs & {p.strip() for p in calibration.split("\n\n") if p.strip()}


@pytest.mark.slow
def test_native_gguf_perplexity_within_2_percent_of_float32(llm_f32):
    """The issue's bound, on the first 1024 tokens of the shipped text (3 windows) to keep it short. 512-token
    windows run the quantized layers' dequantize-then-GEMM path; 32-token windows (on fewer tokens) run the native
    int8-dot kernels, which also quantize activations, so both paths are held to the bound."""
    native = LLM(kv_cache_memory=2**24)  # dtype auto: the GGUF's own Q4_1 / Q8_0 blocks
    assert native.quant_config is not None and native.quant_config.method == "native"
    ids = llm_f32.tokenizer.encode(shipped_text("eval_en.txt"))[:1024]
    for tokens, context, stride in ((1024, 512, 256), (256, 32, 16)):
        reference = perplexity(llm_f32.score, ids[:tokens], context, stride)
        ours = perplexity(native.score, ids[:tokens], context, stride)
        assert ours.num_tokens == reference.num_tokens == tokens - 1
        assert abs(ours.perplexity / reference.perplexity - 1) < 0.02, (context, ours.perplexity, reference.perplexity)
