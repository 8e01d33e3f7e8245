"""LLMEngine: requests in, one step of continuous batching at a time, RequestOutputs out.

step(): [a proposer guesses tokens] -> the scheduler picks this step's chunks -> the runner computes logits
-> the sampler picks tokens [or verification accepts drafts] -> requests record them (stop checks,
detokenization) -> the scheduler frees what finished [and rolls back the KV of rejected drafts].
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Sequence as Seq

import torch

from tokenmill.cache import kv_cache
from tokenmill.cache.kv_cache import COMPRESSED, ROTATED, TURBOQUANT, KVCache, bytes_per_block, resolve_kv_dtype
from tokenmill.cache.kv_cache_manager import KVCacheManager
from tokenmill.cache.recent_rows import RecentRows
from tokenmill.cache.turboquant import DEFAULT_BITS, TurboQuant
from tokenmill.config import DEFAULT_RECENT_BLOCKS, CacheConfig, SchedulerConfig
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.kv_events import KVEventsConfig, ZmqEventPublisher
from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.engine.parent_request import ParentRequest
from tokenmill.engine.request import Request, token_logprobs
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.spec_decode.config import SpeculativeConfig
from tokenmill.engine.spec_decode.speculator import Speculator, make_speculator
from tokenmill.engine.stats import SchedulerStats, SpecCounters
from tokenmill.engine.stop_strings import StopStrings
from tokenmill.engine.structured_output import GrammarCompiler
from tokenmill.kernels import native
from tokenmill.model.batch import BatchChunk, StepBatch
from tokenmill.model.decode_graphs import DecodeGraphs
from tokenmill.model.kv_smoothing import key_smoothing
from tokenmill.model.layers.quantized import QuantizedLinear
from tokenmill.model.llama import LlamaModel
from tokenmill.model.runner import ModelRunner
from tokenmill.model.sampler import SampledToken, StepLogits, TokenRules, sample
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.outputs import RequestOutput, TokenLogprobs
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger("tokenmill.engine")


class LLMEngine:
    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, dtype: torch.dtype,
                 cache_config: CacheConfig | None = None, scheduler_config: SchedulerConfig | None = None,
                 speculative_config: SpeculativeConfig | None = None, draft_model: LlamaModel | None = None,
                 draft_dtype: torch.dtype | None = None, gpu: torch.device | None = None,
                 enforce_eager: bool = False) -> None:
        """draft_model (and its activation dtype, default `dtype`): for speculative_config.method 'draft_model'.
        gpu: the GPU path's tensor device, for a model placed there (model/placement.py); None: the CPU path.
        enforce_eager: the GPU path runs decode steps eagerly, not at fixed sizes as CUDA graphs (vLLM's flag)."""
        if gpu is not None and speculative_config is not None:
            raise ValueError("speculative_config is not supported with device='cuda' yet")
        self.model = model
        self.tokenizer = tokenizer
        self.cache_config = cache_config or CacheConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        context = model.config.max_position_embeddings
        asked = self.scheduler_config.max_model_len
        if asked is not None and asked > context:  # as vLLM: told, not silently capped
            raise ValueError(f"max_model_len={asked} is more than the model's context of {context} tokens "
                             f"(max_position_embeddings); ask for at most {context}")
        self.max_model_len = asked or context
        block_size = self.cache_config.block_size
        packed = any(isinstance(m, QuantizedLinear) for m in model.modules())
        kv_dtype = resolve_kv_dtype(self.cache_config.kv_cache_dtype, dtype, packed and gpu is None)
        turbo = (TurboQuant(model.config.head_dim, self.cache_config.kv_cache_bits or DEFAULT_BITS)
                 if kv_dtype == TURBOQUANT else None)
        block_bytes = bytes_per_block(model.config, block_size, kv_dtype, turbo)
        on_cuda = gpu is not None and gpu.type == "cuda"
        num_blocks = self.cache_config.budget_bytes(torch.cuda.mem_get_info(gpu)[0] if on_cuda else None) // block_bytes
        recent_blocks = self._recent_blocks(kv_dtype, dtype, gpu)
        twin_cost = -(-kv_cache.recent_twin_bytes(model.config, block_size) // block_bytes)  # pool blocks a twin holds
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={self.cache_config.kv_cache_memory} holds no KV block of "
                             f"{block_bytes} bytes")
        offsets = model.key_offsets() if kv_dtype in COMPRESSED else None  # float caches store keys as they are
        smoothing = None
        if self._smooths_keys(kv_dtype, gpu):
            smoothing = key_smoothing(model, tokenizer, offsets)
        num_twins = num_blocks // twin_cost + 1 if recent_blocks else 0
        self.kv_cache = KVCache(model.config, num_blocks, block_size, kv_dtype, offsets, turbo, gpu,
                                padding_block=gpu is not None, smoothing=smoothing, recent_blocks=recent_blocks,
                                recent_twins=num_twins)
        recent = RecentRows(self.kv_cache.recent_of, num_twins, recent_blocks, twin_cost) if recent_blocks else None
        self.kv_manager = KVCacheManager(num_blocks, block_size, self.cache_config.enable_prefix_caching,
                                         self.kv_cache.layout.windows, recent)
        self._fit_max_model_len()
        self.input_processor = InputProcessor(tokenizer, self.max_model_len, model.config.vocab_size,
                                              model.config.hidden_size)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager)
        graphs = None
        if gpu is not None and not enforce_eager:
            graphs = DecodeGraphs(model, self.kv_cache, gpu, self.scheduler_config.max_num_seqs,
                                  -(-self.max_model_len // block_size))
        self.runner = ModelRunner(model, self.kv_cache, gpu, graphs)
        self.parents: dict[str, ParentRequest] = {}
        self.delta_outputs = False  # outputs carry only what is new (the engine core streams them); else all so far
        self.kv_events: ZmqEventPublisher | None = None  # publish_kv_events
        self.speculator: Speculator | None = None
        if speculative_config is not None:
            self.speculator = make_speculator(speculative_config, draft_model, draft_dtype or dtype, block_size,
                                              num_blocks, self.scheduler_config.max_num_seqs)
        # The model's many long-lived objects would otherwise be rescanned by every collection the steps' small
        # allocations trigger (a visible share of a batch-1 step); as vLLM does, move them out of the collector's
        # sight.
        gc.freeze()

    def _smooths_keys(self, kv_dtype: torch.dtype, gpu: torch.device | None) -> bool:
        """CacheConfig.kv_cache_smoothing resolved: on for rotated caches on the CPU path unless turned off."""
        asked = self.cache_config.kv_cache_smoothing
        if asked and gpu is not None:
            raise ValueError("kv_cache_smoothing is not supported on the GPU path yet: leave it unset or False")
        return kv_dtype in ROTATED and gpu is None and asked is not False

    def _recent_blocks(self, kv_dtype: torch.dtype, dtype: torch.dtype, gpu: torch.device | None) -> int:
        """CacheConfig.kv_cache_recent_blocks resolved: DEFAULT_RECENT_BLOCKS for rotated caches where the native
        kernels, which alone read the twins, run the attention (float32 activations on the CPU path)."""
        asked = self.cache_config.kv_cache_recent_blocks
        possible = gpu is None and dtype == torch.float32 and native.available()
        if asked and not possible:
            raise ValueError("kv_cache_recent_blocks needs the native CPU kernels on float32 activations (not the GPU "
                             "path, another dtype or TOKENMILL_NATIVE_KERNELS=0): leave it unset or 0")
        if asked is None:
            return DEFAULT_RECENT_BLOCKS if kv_dtype in ROTATED and possible else 0
        return asked

    def _fit_max_model_len(self) -> None:
        """A request never outgrows the whole cache, so running alone it always finishes (no preemption loop).
        A cache too small for one max_model_len request would cut requests short with finish_reason "length"
        while clients are told the full context: as vLLM, an explicit max_model_len that does not fit is an
        error; the model's own context is lowered to what fits, and the log says so."""
        fits = self.kv_manager.max_request_tokens(self.scheduler_config.max_num_batched_tokens, self.max_model_len)
        if fits >= self.max_model_len:
            return
        advice = f"raise kv_cache_memory (now {self.cache_config.budget_bytes()} bytes) or lower max_model_len"
        if self.scheduler_config.max_model_len is not None:
            raise ValueError(f"max_model_len={self.max_model_len} does not fit in the KV cache, which holds one "
                             f"request of at most {fits} tokens: {advice}")
        logger.warning("the KV cache holds one request of at most %d tokens, less than the model's context of %d: "
                       "serving max_model_len=%d (%s)", fits, self.max_model_len, fits, advice)
        self.max_model_len = fits

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams, priority: int = 0) -> None:
        self.submit(self.input_processor.process(request_id, prompt, params, priority))

    def submit(self, request: EngineCoreRequest) -> None:
        """Queue a request the input processor validated: its n sequences are built here, once."""
        if request.request_id in self.parents:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        params, ids = request.params, request.prompt_token_ids
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.tokenizer.stop_token_ids)
        stop_strings = StopStrings(params.stop)  # one automaton for the n sequences
        rules = TokenRules(params.min_tokens, tuple(sorted(stop_ids)), request.bad_words_token_ids)
        children = [Request(
            request_id=request.request_id if params.num_sequences == 1 else f"{index}_{request.request_id}",
            prompt_token_ids=ids,
            params=params,
            max_tokens=request.max_tokens,
            stop_token_ids=stop_ids,
            detokenizer=IncrementalDetokenizer(self.tokenizer, ids, stop_strings, params.skip_special_tokens,
                                               params.include_stop_str_in_output),
            generator=torch.Generator().manual_seed(params.seed + index) if params.seed is not None else None,
            rules=rules,
            grammar=(self.grammars.matcher(params.structured_outputs) if params.structured_outputs is not None
                     else None),
            priority=request.priority,
            index=index,
            parent_id=request.request_id,
            arrival_time=request.arrival_time,
        ) for index in range(params.num_sequences)]
        parent = ParentRequest(request.request_id, request.prompt, ids, children, params.n)
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = self._prompt_logprobs(ids, params.prompt_logprobs)
        self.parents[request.request_id] = parent
        for child in children:
            self.scheduler.add(child)

    def embed(self, token_ids: list[int], pooling: str = "mean") -> list[float]:
        """The prompt's embedding: its final hidden states pooled ("mean" or "last"), L2-normalized; one uncached
        pass over the prompt, beside the steps."""
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        return self.runner.embed(token_ids, pooling).tolist()

    def score_through_cache(self, token_ids: list[int], chunk: int) -> torch.Tensor:
        """Logits [len, vocab] at every position, computed the way the engine serves: `chunk` tokens per step
        through the KV cache, each row attending to the keys and values the cache gives back (compressed ones
        included) of the chunks before it and of its own chunk. The eval tools' way to put the cache in the loop
        (`tokenmill eval ppl/kld --kv-cache-dtype`); runs beside the steps, on blocks of its own, freed at the end."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        sequence = _ScoredSequence(f"score-{id(token_ids)}-{time.monotonic_ns()}", token_ids)
        logits = []
        try:
            for start in range(0, len(token_ids), chunk):
                piece = token_ids[start:start + chunk]
                if not self.kv_manager.allocate(sequence, len(piece)):
                    raise ValueError(f"{len(token_ids)} tokens do not fit the KV cache's free blocks")
                tables = self.kv_manager.block_tables[sequence.request_id]
                # a verify-shaped chunk: one logit row per token, each row attending to its own prefix
                batch = StepBatch([BatchChunk(piece, start, tables, num_drafts=len(piece) - 1)])
                logits.append(self.runner.execute(batch))
                sequence.num_computed_tokens += len(piece)
        finally:
            self.kv_manager.free(sequence)
        return torch.cat(logits)

    def _prompt_logprobs(self, ids: list[int], top_n: int) -> list[TokenLogprobs | None]:
        """Each prompt token's logprob (and top_n alternatives) under the tokens before it, from one uncached pass
        over the prompt, as its own forward beside the steps (vLLM takes them from the prefill's logits)."""
        step = StepLogits(self.runner.score(ids))
        return [None] + [token_logprobs(step.sampled(i, token, top_n), self._token_text)
                         for i, token in enumerate(ids[1:])]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output (None if unknown or finished)."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return None
        for child in parent.children:
            if not child.finished:
                child.finish(time.monotonic(), "abort")
                self.scheduler.finish(child)
        self._retain_speculation()
        return parent.make_output(self.delta_outputs)

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def stats(self) -> SchedulerStats:
        stats = self.scheduler.stats()
        if self.speculator is None:
            return stats
        spec = self.speculator.stats
        by_method = tuple(SpecCounters(method, m.num_drafts, m.num_draft_tokens, m.num_accepted_tokens,
                                       tuple(m.accepted_per_pos), m.propose_seconds)
                          for method, m in self.speculator.method_stats.items())
        return dataclasses.replace(stats, spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
                                   spec_num_accepted_tokens=spec.num_accepted_tokens,
                                   spec_accepted_per_pos=tuple(spec.accepted_per_pos),
                                   spec_method=self.speculator.config.method, spec_propose_seconds=spec.propose_seconds,
                                   spec_by_method=by_method)

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an output for every request that produced a token (or several) this step."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        if not scheduled.chunks:
            return []
        step_logits = StepLogits(self.runner.execute(scheduled.batch))
        sampling = [(c, row) for c, row in zip(scheduled.chunks, scheduled.batch.first_logit_row) if row is not None]
        failed: list[ParentRequest] = []
        for chunk, row in sampling:
            request, drafts = chunk.request, chunk.draft_token_ids
            try:
                tokens = self._next_tokens(request, drafts, step_logits, row)
            except Exception as exc:  # one row's failure ends its own request; the batch goes on
                logger.exception("sampling failed for request %s", request.parent_id)
                failed.append(self.parents[request.parent_id])
                failed[-1].error = f"sampling failed: {type(exc).__name__}: {exc}"
                tokens = []
            emitted = 0
            for token in tokens:
                request.record(token, self._token_text)
                emitted += 1
                if request.finished:
                    break
            chunk.num_accepted = max(emitted - 1, 0) if drafts else 0
        for parent in failed:
            for child in parent.children:
                if not child.finished:
                    child.finish(time.monotonic(), "abort")
        self.scheduler.update(scheduled)
        for parent in failed:
            for child in parent.children:
                self.scheduler.finish(child)
        if self.speculator is not None:
            self.speculator.observe_step(scheduled.chunks, time.perf_counter() - started)
            self.speculator.learn([c.request for c, _ in sampling if c.request.finish_reason in ("stop", "length")])
            self._retain_speculation()
        outputs = []
        for parent_id in dict.fromkeys(c.request.parent_id for c, _ in sampling):
            parent = self.parents[parent_id]
            outputs.append(parent.make_output(self.delta_outputs))
            if parent.finished:
                del self.parents[parent_id]
        if self.kv_events is not None and self.kv_manager.pool.events:
            self.kv_events.publish(self.kv_manager.pool.events)
            self.kv_manager.pool.events = []
        return outputs

    def publish_kv_events(self, config: KVEventsConfig) -> None:
        """From now on, each step's prefix-cache changes go out as KV events (engine/kv_events.py)."""
        self.kv_events = ZmqEventPublisher(config) if config.publisher == "zmq" else None
        self.kv_manager.pool.events = [] if self.kv_events is not None else None

    def _next_tokens(self, request: Request, drafts: list[int], step_logits: StepLogits,
                     row: int) -> list[SampledToken]:
        """The tokens a sampling chunk emits: the accepted drafts plus one, or one sampled token."""
        if drafts:
            return self.speculator.verify(request, drafts, step_logits, row)
        allowed = request.grammar.allowed() if request.grammar is not None else None
        return [sample(step_logits, row, request.params, request.prompt_token_ids, request.output_ids,
                       request.generator, request.rules, allowed)]

    def _retain_speculation(self) -> None:
        """Proposer state (draft KV blocks) lives only as long as its request runs."""
        if self.speculator is not None:
            self.speculator.retain({r.request_id for r in self.scheduler.running})

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@dataclasses.dataclass
class _ScoredSequence:
    """What the KV manager reads of a sequence scored through the cache (it is never published or shared)."""

    request_id: str
    token_ids: list[int]
    num_computed_tokens: int = 0
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)
