"""Post-training quantization: quantize -> save -> load -> generate round trips on a tiny random HF Llama,
AWQ's scaling is exact in float, and the calibrated methods beat round-to-nearest where activations have
outlier channels (measured as KL divergence from the float model on held-out text: a random model's
perplexity is noise, its output distribution is not)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from tinymodel import write_tiny_llama
from tokenmill import LLM
from tokenmill.cli import main
from tokenmill.compress.awq import awq
from tokenmill.compress.calibration import LinearInputs
from tokenmill.compress.gptq import gptq_quantize
from tokenmill.compress.quantize import QuantizeOptions, calibrate, float_weights, model_scorer, quantize_weights
from tokenmill.config import CacheConfig, QuantConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.errors import UnsupportedModelError
from tokenmill.model.build import build_model
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.loader.checkpoint import Checkpoint, load_checkpoint
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.quant.checkpoint import save_checkpoint
from tokenmill.quant.grid import Grid
from tokenmill.quant.weights import QuantizedWeight
from tokenmill.sampling_params import SamplingParams
from tokenmill.texts import shipped_text

CALIBRATION_TOKENS = 384
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_checkpoint().tokenizer


@pytest.fixture(scope="module")
def calibration_ids(tokenizer) -> list[int]:
    return tokenizer.encode(shipped_text("calibration_en.txt"))[:CALIBRATION_TOKENS]


@pytest.fixture(scope="module")
def heldout_ids(tokenizer) -> list[int]:
    return tokenizer.encode(shipped_text("eval_en.txt"))[:128]


@pytest.fixture(scope="module")
def outlier_ckpt(tmp_path_factory, tokenizer) -> Checkpoint:
    folder = tmp_path_factory.mktemp("outliers")
    write_tiny_llama(folder, tokenizer, seed=0, outlier_scale=20.0)
    return load_checkpoint(folder)


@pytest.fixture(scope="module")
def outlier_inputs(outlier_ckpt, calibration_ids):
    return calibrate(outlier_ckpt, calibration_ids, seq_len=128)


def _with_weights(ckpt: Checkpoint, weights: dict) -> Checkpoint:
    return Checkpoint(ckpt.path, ckpt.format, ckpt.config, weights, ckpt.tokenizer, 0)


def _logits(ckpt: Checkpoint, ids: list[int]) -> torch.Tensor:
    quant = QuantConfig("native") if ckpt.is_quantized else None
    return model_scorer(build_model(ckpt, torch.float32, quant))(ids)


def _greedy(model, tokenizer, ids: list[int]) -> list[int]:
    engine = LLMEngine(model, tokenizer, torch.float32, CacheConfig(kv_cache_memory=2**20))
    engine.add_request("0", ids, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True))
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids
    raise AssertionError("the request never finished")


def test_tokenizer_save_round_trip(tmp_path, tokenizer):
    tokenizer.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    text = "Hello <|im_start|>world 12345, naïve café!\n\tend"
    assert again.encode(text) == tokenizer.encode(text)
    assert (again.bos_token_id, again.eos_token_id, again.add_bos) == (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                       tokenizer.add_bos)
    messages = [{"role": "user", "content": "Hi"}]
    assert again.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)
    assert again.stop_token_ids == tokenizer.stop_token_ids


def _assert_same_weights(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys() and "layers.0.self_attn.q_proj.weight" in loaded  # unfused names
    for name, w in expected.items():
        if isinstance(w, QuantizedWeight):
            got = loaded[name]
            assert (got.bits, got.group_size) == (w.bits, w.group_size), name
            for part in ("qweight", "scales", "mins"):
                a, b = getattr(got, part), getattr(w, part)
                assert (a is None and b is None) or torch.equal(a, b), (name, part)
        else:
            assert torch.equal(loaded[name], w), name


@pytest.mark.parametrize("method,group_size,algorithm", [("int4", 64, "awq"), ("int8", 32, "gptq")])
def test_quantize_save_load_generate(tmp_path, tokenizer, calibration_ids, heldout_ids, method, group_size, algorithm):
    source, out = tmp_path / "float", tmp_path / "quantized"
    write_tiny_llama(source, tokenizer, seed=1, tie_word_embeddings=algorithm == "awq")
    ckpt = load_checkpoint(source)
    options = QuantizeOptions(method, group_size, algorithm, seq_len=128)
    weights = quantize_weights(ckpt, options, calibration_ids)
    save_checkpoint(out, ckpt.config, weights, ckpt.tokenizer, options.config_dict())

    llm = LLM(model=str(out), kv_cache_memory=2**20)  # dtype auto: a quantized checkpoint runs natively
    _assert_same_weights(llm.checkpoint.weights, weights)
    decoder = weights["layers.0.mlp.down_proj.weight"]
    assert decoder.bits == (4 if method == "int4" else 8) and weights["embed_tokens.weight"].bits == 8
    assert ("lm_head.weight" in weights) != ckpt.config.tie_word_embeddings
    assert isinstance(llm.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "tokenmill", "bits": decoder.bits, "group_size": options.grid.group_size,
                      "algorithm": algorithm, "embedding_bits": 8}

    ids = heldout_ids[:24]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    generated = llm.generate({"prompt_token_ids": ids}, params)[0].outputs[0].token_ids
    model = build_model(_with_weights(ckpt, weights), torch.float32, QuantConfig("native"))
    assert generated == _greedy(model, tokenizer, ids)
    assert len(generated) == NEW_TOKENS


def test_quantize_cli_writes_a_loadable_checkpoint(tmp_path, tokenizer, capsys):
    source, out = tmp_path / "float", tmp_path / "quantized"
    write_tiny_llama(source, tokenizer, seed=2)
    assert main(["quantize", str(source), "--method", "int4", "--group-size", "64", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ckpt = load_checkpoint(source)
    _assert_same_weights(load_checkpoint(out).weights, quantize_weights(ckpt, QuantizeOptions("int4", 64)))


def test_awq_scaling_is_exact_in_float(outlier_ckpt, outlier_inputs, heldout_ids):
    """Folding 1/s into the norms and into v_proj / up_proj rows (with GQA ties) leaves the float model unchanged;
    and the scales are not trivial, so this checks the folds."""
    floats = float_weights(outlier_ckpt)
    result = awq(floats, outlier_ckpt.config, outlier_inputs, Grid(4, 32), clip=False)
    assert any(alpha > 0 for alpha in result.alphas.values())
    assert not torch.equal(result.weights["layers.0.input_layernorm.weight"], floats["layers.0.input_layernorm.weight"])
    before = _logits(outlier_ckpt, heldout_ids)
    after = _logits(_with_weights(outlier_ckpt, result.weights), heldout_ids)
    torch.testing.assert_close(after, before, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("group_size", [32, 128])
def test_calibrated_methods_beat_rtn_with_outlier_channels(outlier_ckpt, outlier_inputs, heldout_ids, group_size):
    reference = _logits(outlier_ckpt, heldout_ids).log_softmax(-1)
    kl = {}
    for algorithm in ("rtn", "awq", "gptq"):
        weights = quantize_weights(outlier_ckpt, QuantizeOptions("int4", group_size, algorithm), inputs=outlier_inputs)
        logits = _logits(_with_weights(outlier_ckpt, weights), heldout_ids)
        kl[algorithm] = F.kl_div(logits.log_softmax(-1), reference, log_target=True, reduction="batchmean").item()
    assert kl["awq"] < 0.75 * kl["rtn"], kl
    assert kl["gptq"] < kl["rtn"], kl


def test_gptq_is_rtn_for_uncorrelated_inputs_and_better_for_correlated_ones():
    torch.manual_seed(0)
    w = torch.randn(48, 256)
    grid = Grid(4, 64, torch.float16)
    identity = torch.eye(256) * 1000
    plain = grid.quantize(w)
    same = gptq_quantize(w, identity, grid)  # H diagonal: no error feedback, so exactly round-to-nearest
    assert torch.equal(same.qweight, plain.qweight) and torch.equal(same.scales, plain.scales)

    x = torch.randn(2000, 32) @ torch.randn(32, 256) + 0.1 * torch.randn(2000, 256)  # strongly correlated inputs
    stats = LinearInputs(x.abs().mean(0), x.T @ x, len(x))
    rtn_error = stats.error(w - plain.dequantize())
    gptq_error = stats.error(w - gptq_quantize(w, stats.gram, grid).dequantize())
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)


def test_loader_rejects_other_quantization_formats(tmp_path, tokenizer):
    write_tiny_llama(tmp_path, tokenizer, seed=2)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method 'awq'"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("argv,field", [(["--method", "int3"], "--method"), (["--method", "int4", "--group-size", "48"],
                                        "group_size"), (["--method", "int4", "--algorithm", "gptq", "--calibration",
                                                         "/no/such/text.txt"], "/no/such/text.txt"),
                                        (["--method", "int8", "--calibration", "x.txt"], "--calibration")])
def test_quantize_cli_errors_before_loading(tmp_path, argv, field, capsys):
    try:
        code = main(["quantize", "/model/that/is/never/opened.gguf", "-o", str(tmp_path / "out"), *argv])
    except SystemExit as exc:  # argparse's own choice check
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and field in err and "never/opened" not in err


def test_group_size_that_does_not_divide_the_model_is_refused_before_calibrating(outlier_ckpt):
    with pytest.raises(ValueError, match="group_size 96 does not divide .* takes group_size 32, 64, 128"):
        quantize_weights(outlier_ckpt, QuantizeOptions("int4", 96, "awq"), calibration_ids=None)


def test_quantize_cli_refuses_a_non_empty_output(tmp_path, tokenizer, capsys):
    source, out = tmp_path / "float", tmp_path / "out"
    write_tiny_llama(source, tokenizer, seed=2)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["quantize", str(source), "--method", "int8", "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"
