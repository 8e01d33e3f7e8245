"""PackedTensor: a GGUF tensor's raw blocks, the type the GGUF loader yields and gguf_blocks repacks.

It lives here, below the model, so that quant never imports model."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


@dataclass
class PackedTensor:
    """A GGUF tensor as stored: `data` holds one row of ggml blocks per output row (or plain floats)."""

    data: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    @property
    def is_quantized(self) -> bool:
        return self.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def dequantize(self) -> torch.Tensor:
        """Exact float32 values of the stored blocks."""
        values = np.require(dequantize(self.data, self.qtype), np.float32, ["C", "W"])  # copies only mmap views
        return torch.from_numpy(values).reshape(self.shape)

    def permute_rows(self, order: np.ndarray) -> PackedTensor:
        """Reorder output rows; ggml blocks run along a row, so this is exact on packed data too."""
        return PackedTensor(np.ascontiguousarray(self.data[order]), self.qtype, self.shape)
