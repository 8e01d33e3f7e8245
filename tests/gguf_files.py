"""Small GGUF files written on the fly for tests that need a real file but not a real model."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

# A minimal SentencePiece vocabulary: <unk>, BOS, EOS, then pieces that merge into '▁hi'.
TOKENS = ["<unk>", "<s>", "</s>", "▁", "h", "i", "▁h", "▁hi", "é😀"]


def write_small_gguf(path: Path, arch: str = "llama", context: int = 4096) -> Path:
    """A small but complete GGUF: scalar, string and array metadata, a vocabulary, F32, F16 and Q8_0 tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(context)
    writer.add_block_count(1)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0])
    writer.add_token_types([2, 3, 3, 1, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64), dtype=np.float32))
    writer.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float16))
    q8_rows = rng.integers(0, 255, (16, 2 * 34), dtype=np.uint8)  # 16 rows of 64 values: two Q8_0 blocks each
    writer.add_tensor("blk.0.ffn_down.weight", q8_rows, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
