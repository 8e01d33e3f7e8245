"""Recent rows of the compressed KV caches (CacheConfig.kv_cache_recent_blocks, cache/recent_rows.py): the blocks
near a sequence's end keep a float16 twin of their rows, and each query reads its aligned group of n blocks, up to
its own, from there. The native write fills the twins; the native attention equals a reference that reads those blocks
from the twins and the rest from the codes; the manager pays for twins with pool blocks and gives them all back;
results do not depend on how rows share a step (verify runs, prefill chunks, prefix hits); and the twins bring
a compressed cache closer to the float16 one."""
from __future__ import annotations

import pytest
import torch

from test_kv_cache_dtype import PROMPTS, tiny_dir  # noqa: F401  (a fixture)
from test_kv_int4 import BUILDS
from test_native_kernels import assert_matches_sdpa
from tokenmill import LLM, SamplingParams
from tokenmill.cache import kv_cache
from tokenmill.cache import turboquant as tq
from tokenmill.cache.kv_cache_manager import KVCacheManager
from tokenmill.cache.recent_rows import RecentRows
from tokenmill.config import CacheConfig
from tokenmill.kernels import build, layer_ops, native

needs_kernels = pytest.mark.skipif(not native.available(), reason="native kernels need an AVX2 CPU and g++")


@pytest.fixture(params=BUILDS)
def kernel_build(request, monkeypatch):
    lib = build.load_library(request.param)
    monkeypatch.setattr(layer_ops, "library", lambda: lib)
    return request.param


def _cache(dtype: torch.dtype, blocks: int, bs: int, kv: int, d: int, code: tq.TurboQuant | None):
    """Empty K and V elements and scales of a `dtype` cache."""
    if dtype == torch.int8:
        widths, scale_width = (d, d), None
    elif dtype == kv_cache.INT4:
        widths, scale_width = (d // 2, d // 2), d // 32
    else:
        widths, scale_width = (code.row_bytes(True), code.row_bytes(False)), 1
    elements = [torch.zeros(blocks * bs * kv * w + 64, dtype=torch.uint8)[: blocks * bs * kv * w]
                .view(dtype if dtype != kv_cache.TURBOQUANT else torch.uint8).view(blocks, bs, kv, w) for w in widths]
    if dtype == kv_cache.TURBOQUANT:
        elements = [e.view(kv_cache.TURBOQUANT) for e in elements]
    shape = (blocks, bs, kv) if scale_width is None else (blocks, bs, kv, scale_width)
    scales = [torch.zeros(shape, dtype=torch.float32 if dtype == torch.int8 else torch.float16) for _ in range(2)]
    return elements, scales


CASES = [pytest.param(torch.int8, id="int8"), pytest.param(kv_cache.INT4, id="int4"),
         pytest.param(kv_cache.TURBOQUANT, id="turboquant")]


@needs_kernels
@pytest.mark.parametrize("dtype", CASES)
@pytest.mark.parametrize("window", [0, 9])
def test_attention_reads_recent_blocks_from_their_twins_and_older_ones_from_the_codes(kernel_build, dtype, window):
    """The native write stores each row's codes and, in blocks with a twin, the row in the cache's space as
    float16; decode attention with recent_blocks 2 equals SDPA over keys and values decoded from the codes except
    the blocks of the row's aligned pair up to its own, read from the twins (as far back as twins reach: a block
    without one, and every block before it, is read from the codes). Both builds; a sliding window reads codes."""
    torch.manual_seed(1)
    blocks, bs, kv, heads, d = 12, 4, 2, 6, 64
    code = tq.TurboQuant(d) if dtype == kv_cache.TURBOQUANT else None
    (k_cache, v_cache), scales = _cache(dtype, blocks, bs, kv, d, code)
    rotation = kv_cache.rotation(3, kv, d) if dtype != torch.int8 else None
    offset = torch.randn(kv, d)
    twins = torch.zeros(2, 6, bs, kv, d, dtype=torch.float16)
    twin_of = torch.full((blocks,), -1, dtype=torch.int32)
    twin_of[[7, 1, 2, 9, 11, 0]] = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    recent = layer_ops.RecentRowsRef(twins[0], twins[1], twin_of, 2)
    tables = torch.tensor([[3, 7, 1, 0], [5, 2, 9, 11], [8, 0, 0, 0], [4, 6, 10, 0]])
    # row 0: its own block has a twin, the one before in its pair none; row 1: both twinned; rows 2 and 3: their
    # own blocks have none (row 3's begins a pair)
    lens = torch.tensor([8, 16, 3, 12])
    rows = torch.randn(blocks * bs, 2, kv, d) * 2
    slots = torch.cat([tables[b, (t // bs)] * bs + t % bs for b in range(4) for t in torch.arange(lens[b])[:, None]])
    written = rows[slots]
    layer_ops.write_kv(written[:, 0], written[:, 1], slots, k_cache, v_cache, *scales, rotation, offset,
                       code and code.table(), recent)
    q = torch.randn(4, heads + 4, d)[:, :heads]
    out = layer_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, *scales, rotation,
                                           code and code.table(), recent)
    sides = [kv_cache.CacheSide(k_cache, scales[0], None if rotation is None else rotation[1], offset,
                                code and code.key),
             kv_cache.CacheSide(v_cache, scales[1], None if rotation is None else rotation[2], None,
                                code and code.value)]

    def rows_of(b: int, part: int) -> torch.Tensor:
        side, table = sides[part], tables[b]
        elements = side.elements.view(torch.uint8)[table].view(side.elements.dtype)  # (bits8 has no indexing)
        got = side.decode(elements.flatten(0, 1), side.scales[table].flatten(0, 1), torch.float32)
        twin = twins[part][twin_of[table].long().clamp(min=0)].flatten(0, 1).float()
        if side.signs is not None:
            twin = kv_cache.unrotate(twin, side.signs)
        own = (int(lens[b]) - 1) // bs
        for blk in range(own, own // 2 * 2 - 1, -1):
            if window or twin_of[table[blk]] < 0:
                break
            got[blk * bs:(blk + 1) * bs] = twin[blk * bs:(blk + 1) * bs]
        return got[: lens[b]]

    assert_matches_sdpa(out, q, [(rows_of(b, 0), rows_of(b, 1)) for b in range(4)], window, 0.25, rtol=1e-4)
    # the twins hold the rows in the cache's space, rounded to float16; blocks without a twin left none
    for b in range(4):
        for t in range(int(lens[b])):
            twin = int(twin_of[tables[b, t // bs]])
            if twin < 0:
                continue
            key = written[(slots == tables[b, t // bs] * bs + t % bs).nonzero()[0, 0], 0] - offset
            want = key if rotation is None else kv_cache.rotate(key, rotation[1])
            torch.testing.assert_close(twins[0, twin, t % bs], want.half(), rtol=0, atol=0)
    assert twins[:, 1].count_nonzero() == twins[:, 5].count_nonzero() == 0  # twins of blocks no row wrote


def _manager(num_blocks: int = 64, recent_blocks: int = 2, cost: int = 3) -> KVCacheManager:
    twin_of = torch.full((num_blocks,), -1, dtype=torch.int32)
    return KVCacheManager(num_blocks, 4, True, (None,), RecentRows(twin_of, num_blocks // cost + 1, recent_blocks,
                                                                     cost))


class _Seq:
    def __init__(self, request_id: str, tokens: list[int]) -> None:
        self.request_id, self.token_ids, self.num_computed_tokens, self.block_hashes = request_id, tokens, 0, []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def test_manager_keeps_twins_for_each_window_pays_for_them_and_gives_them_all_back():
    """Twins for the blocks a step writes and the earlier blocks of the next position's pair; commits give back
    the ones behind it, trims the ones past the computed tokens; each twin holds `cost` pool blocks; prefix hits
    end on a pair's boundary and leave no shared block in a window; freeing returns the whole pool."""
    manager = _manager()
    pool, twins = manager.pool, manager.recent

    def owned(seq: _Seq) -> list[int]:
        return sorted(manager.block_tables[seq.request_id][0].index(b) for b in twins.owned[seq.request_id])

    a = _Seq("a", list(range(100, 130)))
    assert manager.allocate(a, 10)  # positions 0..9: blocks 0, 1, 2, all in some row's window
    assert owned(a) == [0, 1, 2]
    assert pool.num_free == 64 - 3 - 3 * 3
    a.num_computed_tokens = 10
    manager.commit(a)  # the next query (position 10, block 2) begins the pair of blocks 2, 3
    assert owned(a) == [2]
    assert manager.allocate(a, 7)  # positions 10..16: blocks 2, 3, 4
    assert owned(a) == [2, 3, 4]
    a.num_computed_tokens = 12  # 5 of 7 rejected (speculation)
    manager.trim(a)
    manager.commit(a)
    assert owned(a) == [2]
    assert manager.allocate(a, 4)
    a.num_computed_tokens = 16
    manager.commit(a)  # full blocks 0..3 published; position 16 begins the pair of blocks 4, 5
    assert owned(a) == []
    b = _Seq("b", list(range(100, 116)) + [7, 8, 9])
    b.num_computed_tokens = manager.lookup_prefix(b)
    assert b.num_computed_tokens == 16  # 4 cached blocks: two whole pairs
    c = _Seq("c", list(range(100, 112)) + [7, 8, 9])
    c.num_computed_tokens = manager.lookup_prefix(c)
    assert c.num_computed_tokens == 8  # 3 cached blocks: one whole pair
    for seq in (b, c):
        assert manager.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
        shared = set(manager.block_tables[seq.request_id][0][: seq.num_computed_tokens // 4])
        assert twins.owned[seq.request_id] and not shared & set(twins.owned[seq.request_id])
    for seq in (a, b, c):
        manager.free(seq)
    assert pool.num_free == 64 and not twins.owned and (twins.twin_of == -1).all()
    assert sorted(twins.free) == list(range(64 // 3 + 1))


def test_recent_blocks_are_for_compressed_caches_on_native_kernels():
    with pytest.raises(ValueError, match="kv_cache_recent_blocks keeps recent rows of the compressed caches"):
        CacheConfig(kv_cache_dtype="float16", kv_cache_recent_blocks=2)
    with pytest.raises(ValueError, match="kv_cache_recent_blocks must be >= 0"):
        CacheConfig(kv_cache_dtype="int4", kv_cache_recent_blocks=-1)
    with pytest.raises(ValueError, match="kv_cache_recent_blocks is not supported with tensor_parallel_size > 1"):
        LLM(kv_cache_dtype="int4", kv_cache_recent_blocks=2, tensor_parallel_size=2)


@needs_kernels
@pytest.mark.parametrize("dtype", ["int4", "turboquant"])
def test_outputs_do_not_depend_on_how_rows_share_a_step(tiny_dir, dtype):  # noqa: F811
    """On the fused step (packed weights), greedy tokens and their logprobs are bit-identical whether the prompt is
    computed in one chunk or in 5-token chunks (rows attending as runs of different lengths), with n-gram
    speculation (verify runs) and with prefix caching hits (a second round of the same prompts)."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": p["prompt_token_ids"] * 2} for p in PROMPTS]  # repeats for the n-gram drafts

    def run(**kwargs) -> list[tuple]:
        llm = LLM(tiny_dir, quantization="int8", kv_cache_memory=2**22, kv_cache_dtype=dtype, **kwargs)
        assert llm.cache_info().kv_cache_recent_blocks == 2 and llm.engine.runner.fused is not None
        rounds = [llm.generate(prompts, params) for _ in range(2)]
        assert llm.engine.kv_manager.pool.num_free > 0
        return [(tuple(o.outputs[0].token_ids), tuple(lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                    o.outputs[0].token_ids)))
                for outs in rounds for o in outs]

    plain = run(enable_prefix_caching=False)
    assert run(max_num_batched_tokens=5, enable_prefix_caching=False) == plain
    assert run(speculative_config={"method": "ngram", "num_speculative_tokens": 4}) == plain


@needs_kernels
@pytest.mark.parametrize("dtype", ["int8", "int4", "turboquant"])
def test_twins_bring_a_compressed_cache_to_the_float16_one(tiny_dir, dtype):  # noqa: F811
    """With every block recent (recent_blocks beyond the prompt) a compressed cache reads only float16 twins: its
    prompt logits equal the float16 cache's to float16 rounding of the rotated rows; with 2 recent blocks they lie
    between that and no twins, on the fused step and the module path (LLM.score) alike."""
    ids = PROMPTS[2]["prompt_token_ids"]
    reference = LLM(tiny_dir, dtype="float32", kv_cache_memory=2**22, kv_cache_dtype="float16")
    want = reference.score(ids)

    def error(recent_blocks: int) -> float:
        llm = LLM(tiny_dir, dtype="float32", kv_cache_memory=2**22, kv_cache_dtype=dtype,
                  kv_cache_recent_blocks=recent_blocks)
        out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        scored = llm.score(ids)
        # the engine's prompt logprobs (fused step) and score's logits (module path) agree
        logprobs = scored.log_softmax(-1)
        for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
            assert entry[ids[i]].logprob == pytest.approx(logprobs[i - 1, ids[i]].item(), abs=1e-4)
        return (scored - want).abs().max().item()

    everything, two, none = error(64), error(2), error(0)
    assert everything < 2e-2
    assert everything < two < none
