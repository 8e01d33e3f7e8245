"""The fused native step (model/fused_decode.py) against the module path it replaces: same kernels and the same
order of float operations, so greedy tokens and logprobs must agree, on a batched prefill and batched decodes of
sequences of different lengths, with Q/K/V biases (Qwen2), a sliding window crossing block boundaries (Mistral) and a
projection whose parts come in two formats. Prefix caching is off: a cache hit on the second run would shrink
its prefill below the packed kernels' row limit and so change which kernel computes the prompt."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tokenmill import LLM, SamplingParams
from tokenmill.cache.kv_cache import COMPRESSED, ROTATED, resolve_kv_dtype
from tokenmill.kernels import build, native
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.llama import LlamaModel
from tokenmill.quant.weights import quantize_rtn

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels need an AVX2 CPU and g++")

SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
             vocab_size=49152, max_position_embeddings=256, initializer_range=0.1)
PROMPTS = [[(i * 7919 + j * 104729) % 40000 + 100 for i in range(n)] for j, n in enumerate((3, 9, 17, 30))]


def _checkpoint(folder, tokenizer_dir, model) -> str:
    with torch.no_grad():  # transformers initializes biases to zero; random ones catch a dropped term
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(folder))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return str(folder)


def _run(llm: LLM, fused: bool, one_by_one: bool = False) -> list:
    runner = llm.engine.runner
    saved = runner.fused
    if not fused:
        runner.fused = None
    try:
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        if one_by_one:
            return [llm.generate(p, params, use_tqdm=False)[0] for p in prompts]
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        runner.fused = saved


def _assert_paths_agree(llm: LLM, module_one_by_one: bool = False) -> None:
    """A compressed KV cache turns the paths' last-bit differences into a code one step off where a value sits at a
    rounding boundary: ~1e-3 in a logprob with int8 codes (measured 2.4e-3), up to ~3e-2 with the rotated 4-bit and
    turboquant ones (measured 2.9e-2 with smoothed keys, whose factors turn last bits differently in the two paths).
    So tokens must agree, or with such a cache part only at a near-tie (the other path's token within that
    tolerance of the chosen one), logprobs within it up to there, and the top-3 sets only where both hold a token.
    module_one_by_one: compare with the module path run on each prompt
    alone. Its batched decode attends over
    keys padded to the batch's widest block table, and a wider softmax sums in another order: a last-bit change
    that the next layer's int8 activation quantization can turn into ~1e-3 in a logprob. The fused step is
    batch-invariant (each row attends over its own keys), so it must equal the module path's lone rows."""
    assert llm.engine.runner.fused is not None, "this model should take the fused decode step"
    calls = []
    run = llm.engine.runner.fused.run
    llm.engine.runner.fused.run = lambda *args: (calls.append(args[0].shape[0]), run(*args))
    fused = _run(llm, fused=True)
    del llm.engine.runner.fused.run
    prefill_fused = llm.engine.runner.fused.max_rows >= sum(map(len, PROMPTS))
    if prefill_fused:
        assert calls[0] == sum(map(len, PROMPTS))  # the prompts' prefill went through it
    assert calls.count(len(PROMPTS)) >= 2 and len(calls) >= 19 + prefill_fused  # and the batched decodes
    modules = _run(llm, fused=False, one_by_one=module_one_by_one)
    coded = llm.engine.kv_cache.dtype in COMPRESSED
    tolerance = 3e-2 if llm.engine.kv_cache.dtype in ROTATED else 1e-2 if coded else 1e-4
    for a, b in zip(fused, modules):
        tokens_a, tokens_b = a.outputs[0].token_ids, b.outputs[0].token_ids
        n = next((i for i, pair in enumerate(zip(tokens_a, tokens_b)) if pair[0] != pair[1]), len(tokens_a))
        if n < len(tokens_a):
            step = a.outputs[0].logprobs[n]
            assert coded and tokens_b[n] in step, f"the paths part at token {n}, not at a near-tie"
            assert step[tokens_a[n]].logprob - step[tokens_b[n]].logprob < tolerance
        for step_a, step_b in zip(a.outputs[0].logprobs[:n + 1], b.outputs[0].logprobs[:n + 1]):
            assert coded or step_a.keys() == step_b.keys()
            for token in step_a.keys() & step_b.keys():
                assert step_a[token].logprob == pytest.approx(step_b[token].logprob, abs=tolerance)


@pytest.mark.parametrize("quantization,kv_cache_dtype,want", [("int4", "auto", torch.float16),
                                                             ("int8", "auto", torch.float16),
                                                             ("int4", "float32", torch.float32),
                                                             ("int4", "int8", torch.int8)])
def test_qwen2_with_biases(tmp_path, tokenizer_dir, quantization, kv_cache_dtype, want):
    """Packed weights get a float16 KV cache by default; every cache type takes the fused step."""
    torch.manual_seed(0)
    folder = _checkpoint(tmp_path, tokenizer_dir, Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval())
    llm = LLM(folder, quantization=quantization, block_size=4, enable_prefix_caching=False,
              kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.kv_cache.dtype == want
    _assert_paths_agree(llm)


@pytest.mark.parametrize("kv_cache_dtype,bits", [("int4", None), ("turboquant", 2.5), ("turboquant", 3.5)])
def test_rotated_caches_on_the_fused_step(tmp_path, tokenizer_dir, kv_cache_dtype, bits):
    """The rotated int4 cache (head_dim 32: one group per head row) and turboquant codes through the fused step
    and the module path."""
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "hidden_size": 128})).eval()
    folder = _checkpoint(tmp_path, tokenizer_dir, model)
    llm = LLM(folder, quantization="int4", block_size=4, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype,
              kv_cache_bits=bits)
    assert llm.engine.kv_cache.dtype == resolve_kv_dtype(kv_cache_dtype, torch.float32, True)
    assert llm.config.head_dim == 32 and llm.engine.kv_cache.smoothed  # keys smoothed by default
    _assert_paths_agree(llm)


def _cache_error(folder: str):
    """A measure of a cache type's error on the model in `folder`: the mean over positions of the largest |logprob
    change| from the float32 cache's, for the float32 cache's greedy tokens scored through the cache in 4-token
    chunks."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    exact = LLM(folder, dtype="float32", kv_cache_dtype="float32", enable_prefix_caching=False)
    want = exact.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)

    def error(llm: LLM) -> float:
        diffs = []
        for p, w in zip(PROMPTS, want):
            ids = p + w.outputs[0].token_ids
            logits = llm.engine.score_through_cache(ids, 4).log_softmax(-1)
            ref = exact.engine.score_through_cache(ids, 4).log_softmax(-1)
            diffs += (logits[len(p) - 1:-1] - ref[len(p) - 1:-1]).abs().amax(-1).tolist()
        return sum(diffs) / len(diffs)

    return error


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4", "turboquant"])
def test_key_offsets_keep_a_large_k_bias_out_of_the_codes(tmp_path, tokenizer_dir, monkeypatch, kv_cache_dtype):
    """Qwen2's k biases reach hundreds in its first layers. A compressed cache stores keys minus the bias's
    RoPE-averaged part (LlamaModel.key_offsets): the softmax does not change, and the codes keep their range for
    the rest. With a bias of 300 on the slowest RoPE pairs, the logprobs of the float32 cache's tokens stay close
    to it, and move several times further without the offsets."""
    torch.manual_seed(3)
    model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "hidden_size": 128})).eval()
    folder = _checkpoint(tmp_path, tokenizer_dir, model)
    d, kv = 32, SHAPE["num_key_value_heads"]
    with torch.no_grad():
        for layer in model.model.layers:
            bias = layer.self_attn.k_proj.bias.view(kv, d)
            bias[:, [d // 2 - 1, d - 1]] += 300.0  # the slowest-turning pair of each KV head
    model.save_pretrained(folder)
    error = _cache_error(folder)
    with_offsets = LLM(folder, dtype="float32", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    assert with_offsets.engine.kv_cache.k_offsets is not None
    monkeypatch.setattr(LlamaModel, "key_offsets", lambda self, positions=4096: None)
    without = LLM(folder, dtype="float32", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    assert without.engine.kv_cache.k_offsets is None
    assert error(with_offsets) < 0.3 * error(without)  # measured: int8 0.07 vs 2.4, int4 0.82 vs 3.97


@pytest.mark.parametrize("kv_cache_dtype", ["int4", "turboquant"])
def test_key_smoothing_takes_a_channel_queries_barely_read_out_of_the_codes(tmp_path, tokenizer_dir, kv_cache_dtype):
    """One RoPE pair's keys scaled up 30x and its queries down 30x: the float model computes the same scores, but
    that pair now dominates every key row's length and so the codes' step. The calibrated smoothing (on by default
    for rotated caches, model/kv_smoothing.py) divides most of it back out of the keys: the logprobs of the float32
    cache's tokens move several times less than with the plain rotation."""
    torch.manual_seed(5)
    model = Qwen2ForCausalLM(Qwen2Config(**{**SHAPE, "hidden_size": 128})).eval()
    folder = _checkpoint(tmp_path, tokenizer_dir, model)
    d, kv, heads = 32, SHAPE["num_key_value_heads"], SHAPE["num_attention_heads"]
    pair = [3, 3 + d // 2]
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            for proj, count, factor in ((attention.k_proj, kv, 30.0), (attention.q_proj, heads, 1 / 30)):
                proj.weight.view(count, d, -1)[:, pair] *= factor
                proj.bias.view(count, d)[:, pair] *= factor
    model.save_pretrained(folder)
    error = _cache_error(folder)
    smoothed = LLM(folder, dtype="float32", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False)
    plain = LLM(folder, dtype="float32", kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
                kv_cache_smoothing=False)
    assert smoothed.engine.kv_cache.smoothed and not plain.engine.kv_cache.smoothed
    assert error(smoothed) < 0.5 * error(plain)


def test_channel_rms_are_those_of_the_attention_inputs(tmp_path, tokenizer_dir, monkeypatch):
    """The calibration's statistics are the root mean squares of what attention gets: queries per KV head over
    its query heads and the positions, keys minus the offsets, both after RoPE."""
    from tokenmill.model import kv_smoothing, llama

    torch.manual_seed(6)
    folder = _checkpoint(tmp_path, tokenizer_dir, Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval())
    llm = LLM(folder, dtype="float32", enable_prefix_caching=False)
    ids, offsets = PROMPTS[3], llm.model.key_offsets()
    seen, attend = [], llama.paged_attention
    monkeypatch.setattr(llama, "paged_attention", lambda q, k, *rest: (seen.append((q, k)), attend(q, k, *rest))[1])
    llm.engine.runner.score(ids)
    monkeypatch.undo()
    rms = kv_smoothing.channel_rms(llm.model, ids, offsets)
    kv = SHAPE["num_key_value_heads"]
    for layer, (q, k) in enumerate(seen):
        want_q = q.double().view(len(ids), kv, -1, q.shape[-1]).pow(2).mean((0, 2)).sqrt()
        want_k = (k.double() - offsets[layer].double()).pow(2).mean(0).sqrt()
        torch.testing.assert_close(rms[0, layer], want_q)
        torch.testing.assert_close(rms[1, layer], want_k)


def test_smoothing_factors_are_kept_per_model(tmp_path, tokenizer_dir, monkeypatch):
    """The calibration pass runs once per model: later starts load its factors; another model's weights (or a
    damaged file) mean a new pass."""
    from tokenmill.model import kv_smoothing

    torch.manual_seed(7)
    folder = _checkpoint(tmp_path / "model", tokenizer_dir, Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval())
    llm = LLM(folder, dtype="float32", enable_prefix_caching=False)
    passes, measure = [], kv_smoothing.channel_rms
    monkeypatch.setattr(kv_smoothing, "channel_rms", lambda *args: (passes.append(1), measure(*args))[1])
    cache = tmp_path / "cache"

    def factors():
        return kv_smoothing.key_smoothing(llm.model, llm.tokenizer, None, cache)

    first = factors()
    assert torch.equal(factors(), first) and len(passes) == 1
    (file,) = cache.iterdir()
    file.write_bytes(b"not a tensor")
    assert torch.equal(factors(), first) and len(passes) == 2
    with torch.no_grad():
        llm.model.layers[0].self_attn.qkv_proj.weight[0, 0] += 1.0
    factors()
    assert len(passes) == 3 and len(list(cache.iterdir())) == 2


def test_gemma3_qk_norm_geglu_sandwich_norms(tmp_path, tokenizer_dir):
    """Gemma 3's layer on the fused step: QK-norm, GeGLU, the sandwich norms, its attention scale, sliding layers
    with their own RoPE base beside a global one, random norm weights so a dropped or misplaced norm shows."""
    torch.manual_seed(4)
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    config = Gemma3TextConfig(**{**SHAPE, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=24,
                              sliding_window=8, layer_types=layer_types)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.5)
    folder = _checkpoint(tmp_path, tokenizer_dir, model)
    llm = LLM(folder, quantization="int4", block_size=4, enable_prefix_caching=False)
    assert llm.config.qk_norm and llm.config.hidden_act == "gelu_pytorch_tanh"
    _assert_paths_agree(llm, module_one_by_one=True)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_sliding_window_across_blocks(tmp_path, tokenizer_dir, kv_cache_dtype):
    torch.manual_seed(1)
    model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8)).eval()
    folder = _checkpoint(tmp_path, tokenizer_dir, model)
    llm = LLM(folder, quantization="int4", block_size=4, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.kv_cache.layout.windows == (8,)
    _assert_paths_agree(llm)


def test_projection_with_parts_in_two_formats(tmp_path, tokenizer_dir):
    """As a Q4_K_M GGUF stores v_proj in Q6_K next to Q4_K q/k: the fused step must walk both parts."""
    torch.manual_seed(2)
    folder = _checkpoint(tmp_path, tokenizer_dir, Qwen2ForCausalLM(Qwen2Config(**SHAPE)).eval())
    llm = LLM(folder, quantization="int4", block_size=4, enable_prefix_caching=False)
    for layer in llm.model.layers:
        qkv = layer.self_attn.qkv_proj
        weight = torch.cat([p.weight.dequantize() for p in qkv.parts])
        q_rows = layer.self_attn.split[0]
        mixed = QuantizedLinear([quantize_rtn(weight[:q_rows], 4, 32), quantize_rtn(weight[q_rows:], 8, 16)], qkv.bias)
        layer.self_attn.qkv_proj = mixed
    llm.engine.runner.fused = type(llm.engine.runner.fused).build(llm.model, llm.engine.kv_cache)
    assert len(llm.model.layers[0].self_attn.qkv_proj.parts) == 2
    _assert_paths_agree(llm)


@pytest.mark.parametrize("bits,group,tiled", [(4, 32, False), (8, 32, False), (8, 16, False), (4, 64, False),
                                              (4, 32, True), (8, 32, True), (4, 64, True)])  # 16-groups: rows only
def test_packed_kernel_rows_do_not_depend_on_the_batch(bits, group, tiled):
    """Bit-identical rows whatever the batch: speculative verification (several rows of one sequence) must
    reproduce plain decoding (one row) exactly, so greedy tokens cannot change with speculation."""
    from tokenmill.kernels import quant_ops

    torch.manual_seed(0)
    w = quantize_rtn(torch.randn(40, 576), bits, group)
    w = w.tile() if tiled else w
    x = torch.randn(83, 576)  # 64 rows and more: AMX tile products where the CPU has them
    alone = torch.cat([quant_ops.linear(x[i:i + 1].contiguous(), w) for i in range(len(x))])
    for m in (2, 3, 4, 5, 7, 16, 23, 64, 83):
        assert torch.equal(quant_ops.linear(x[:m].contiguous(), w), alone[:m])


@pytest.fixture(params=["native", "avx2"])
def kernel_build(request, monkeypatch):
    """The kernels as built for this CPU, and (where that build is wider) the AVX2 build, whose attention holds
    fewer queries per pass in its 16 registers."""
    if request.param == "avx2":
        if not build.isa_flags():
            pytest.skip("this CPU's build is the AVX2 build")
        monkeypatch.setattr(native, "load_library", lambda: build.load_library(()))
    native.library.cache_clear()
    yield request.param
    monkeypatch.undo()
    native.library.cache_clear()


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_verify_rows_attend_exactly_as_decode_rows(tmp_path, tokenizer_dir, sliding_window, kernel_build):
    """A verify chunk's rows share one attention task per KV head (each key read once for all of them); every
    row must still come out bit for bit as it does computed alone, or speculation would change greedy tokens."""
    torch.manual_seed(3)
    model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=sliding_window)).eval()
    llm = LLM(_checkpoint(tmp_path, tokenizer_dir, model), quantization="int4", block_size=4,
              enable_prefix_caching=False)
    fused, kv = llm.engine.runner.fused, llm.engine.kv_cache
    bs, hidden = kv.block_size, llm.model.config.hidden_size
    kv.k.normal_()  # earlier context: random keys and values
    kv.v.normal_()
    saved = kv.k.clone(), kv.v.clone()
    seq_a, seq_b, seq_c, seq_d = list(range(0, 12)), list(range(12, 20)), list(range(20, 24)), list(range(24, 28))
    # four runs of rows: a task per KV head holds all heads of a run, and seq_a's 7 rows x 2 heads take two
    # passes over the keys (12 queries per pass with AVX-512, 6 with AVX2)
    rows = [(seq_a, p) for p in range(37, 44)] + [(seq_b, 20)] + [(seq_c, 9), (seq_c, 10)] + [(seq_d, 5)]

    def run(rows: list, x: torch.Tensor) -> None:
        tables = torch.tensor([table + [0] * (12 - len(table)) for table, _ in rows])
        lens = torch.tensor([p + 1 for _, p in rows])
        slots = torch.tensor([table[p // bs] * bs + p % bs for table, p in rows])
        fused.run(x, torch.tensor([p for _, p in rows]), [(tables, lens, slots)] * len(kv.layout.windows))

    def restore() -> None:
        kv.k.copy_(saved[0])
        kv.v.copy_(saved[1])

    x = torch.randn(len(rows), hidden)
    together = x.clone()
    run(rows, together)
    alone = x.clone()
    for i in range(len(rows)):  # row i alone, after the rows before it (one at a time) wrote their keys
        restore()
        for j in range(i):
            run(rows[j:j + 1], x[j:j + 1].clone())
        run(rows[i:i + 1], alone[i:i + 1])
    assert torch.equal(together, alone)
    assert not torch.equal(together, x)
