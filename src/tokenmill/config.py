"""Configuration dataclasses: what a model is (ModelConfig), independent of where it was loaded from."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding context extension, as HF's `rope_scaling` and GGUF's `rope.scaling.*` describe it.

    kind: "linear" divides positions by `factor`; "llama3" rescales low frequencies (Llama 3.1 style).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


HIDDEN_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer: the Llama family and its relatives (Qwen2, Gemma 3),
    which differ only in the optional fields below."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # biases on the Q, K, V projections
    # a bias on the output projection (Llama's attention_bias sets both; Qwen2 only QKV)
    attention_out_bias: bool = False
    hidden_act: str = "silu"  # the gate's activation in the gated MLP: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Gemma 3, Qwen3)
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power; None: head_dim
    layer_types: tuple[str, ...] | None = None  # per layer "full_attention" | "sliding_attention"; None: all full
    sliding_window: int | None = None  # keys a sliding layer sees, the query's own position included
    rope_local_theta: float | None = None  # RoPE base of sliding layers when it differs (Gemma 3: 10k vs 1M)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {HIDDEN_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(f"layer_types must give one of {LAYER_TYPES} for each of the {self.num_layers} "
                                 f"layers, got {self.layer_types}")
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
                raise ValueError(f"sliding_window must be a positive int when layer_types has sliding layers, "
                                 f"got {self.sliding_window}")

    def layer_window(self, layer: int) -> int | None:
        """How many positions layer `layer` attends to (itself included); None: all earlier ones."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def num_params_estimate(self) -> int:
        """Parameter count from the shapes (embeddings counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h


QUANTIZATION_METHODS = ("native", "int8", "int4")


@dataclass(frozen=True)
class QuantConfig:
    """How linear and embedding weights are stored and computed.

    "native": keep the checkpoint's own quantized blocks (GGUF Q4_0/Q4_1/Q8_0, or a tokenmill-quantized
    checkpoint) as they are; other tensor types run as floats;
    "int8" / "int4": round-to-nearest quantize float weights, int8 per output channel or int4 per
    `group_size` inputs; embeddings and the LM head stay int8 in both (they drive quality most).
    """

    method: str
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or None; "
                             f"got {self.method!r}")
        if self.group_size < 32 or self.group_size % 32:
            raise ValueError(f"group_size must be a positive multiple of 32, got {self.group_size}")


# Compute dtypes by vLLM's --dtype names; half/float16 resolve to the 16-bit type this CPU computes natively
# (hardware.resolve_dtype).
DTYPE_ALIASES = {"float": "float32", "half": "float16"}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", *DTYPE_ALIASES)
DEVICES = ("auto", "cpu", "cuda")  # EngineArgs.device; model/placement.py
KV_CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "int8", "int4", "turboquant")
DEFAULT_RECENT_BLOCKS = 2  # CacheConfig.kv_cache_recent_blocks of int4 and turboquant caches (BENCHMARKS.md)
KV_CACHE_BITS = (2.5, 3.0, 3.5, 4.0)  # turboquant's bits per element (cache/turboquant.py)
DEFAULT_KV_CACHE_MEMORY = 4 * 2**30  # like vLLM CPU's VLLM_CPU_KVCACHE_SPACE=4; backed lazily as blocks fill


@dataclass
class CacheConfig:
    """KV memory: `kv_cache_memory` is bytes (int > 1) or a fraction of available RAM (float in (0, 1])."""

    block_size: int = 16
    kv_cache_memory: int | float = DEFAULT_KV_CACHE_MEMORY
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES; see cache/kv_cache.py resolve_kv_dtype
    kv_cache_bits: float | None = None  # turboquant only: one of KV_CACHE_BITS, default 3.5
    kv_cache_smoothing: bool | None = None  # int4, turboquant: keys smoothed (model/kv_smoothing.py); None: where
    # it can be (the CPU path in one process), True: or fail, False: never
    kv_cache_recent_blocks: int | None = None  # compressed caches: each query's aligned group of n blocks, up to
    # its own, read from float16 twins (cache/recent_rows.py); None: DEFAULT_RECENT_BLOCKS for int4 and turboquant where
    # it can be (the CPU path in one process), else 0; 0: none

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_bits is not None and self.kv_cache_dtype != "turboquant":
            raise ValueError(f"kv_cache_bits sets turboquant's bits per element; kv_cache_dtype is "
                             f"{self.kv_cache_dtype!r}")
        if self.kv_cache_bits is not None and self.kv_cache_bits not in KV_CACHE_BITS:
            raise ValueError(f"kv_cache_bits must be one of {', '.join(map(str, KV_CACHE_BITS))}, got "
                             f"{self.kv_cache_bits}")
        if self.kv_cache_smoothing and self.kv_cache_dtype not in ("int4", "turboquant"):
            raise ValueError(f"kv_cache_smoothing smooths the keys of the rotated caches (int4, turboquant); "
                             f"kv_cache_dtype is {self.kv_cache_dtype!r}")
        if self.kv_cache_recent_blocks is not None and self.kv_cache_recent_blocks < 0:
            raise ValueError(f"kv_cache_recent_blocks must be >= 0, got {self.kv_cache_recent_blocks}")
        if self.kv_cache_recent_blocks and self.kv_cache_dtype not in ("int8", "int4", "turboquant"):
            raise ValueError(f"kv_cache_recent_blocks keeps recent rows of the compressed caches (int8, int4, "
                             f"turboquant) in float16; kv_cache_dtype is {self.kv_cache_dtype!r}")
        if not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes or a fraction in (0, 1], got {self.kv_cache_memory}")

    def budget_bytes(self, available: int | None = None) -> int:
        """available: the memory a fraction is of (the GPU's free memory on the GPU path); None: available RAM."""
        if isinstance(self.kv_cache_memory, float) and self.kv_cache_memory <= 1:
            return int(self.kv_cache_memory * (available or _available_memory()))
        return int(self.kv_cache_memory)


@dataclass(frozen=True)
class CacheInfo:
    """What LLM.cache_info() and /metrics' cache_config_info report (vLLM's cache config info)."""

    num_blocks: int
    block_size: int
    kv_cache_dtype: str
    bytes_per_block: int
    kv_cache_bits: float | None = None  # turboquant's bits per element
    kv_cache_recent_blocks: int = 0  # blocks read from float16 twins (CacheConfig.kv_cache_recent_blocks)


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


@dataclass
class SchedulerConfig:
    """Per-step limits. A smaller token budget keeps decodes flowing while long prompts prefill in chunks."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context length

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
