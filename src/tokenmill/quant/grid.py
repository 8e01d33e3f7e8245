"""Grid: how one matrix is quantized (bits, inputs per scale, scale storage), shared by every algorithm."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.quant.weights import QuantizedWeight, fake_quantize, quantize_rtn


@dataclass(frozen=True)
class Grid:
    bits: int  # 4: asymmetric (scale, min) per group; 8: symmetric scale per group
    group_size: int | None  # inputs per scale; None: one scale per output channel (whole row)
    scale_dtype: torch.dtype = torch.float32

    def group(self, in_features: int) -> int:
        return self.group_size or in_features

    def fake(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
        """Round-to-nearest values as float32, unpacked (for searches)."""
        return fake_quantize(w, self.bits, self.group(w.shape[1]), clip=clip, scale_dtype=self.scale_dtype)

    def quantize(self, w: torch.Tensor, clip: torch.Tensor | float = 1.0) -> QuantizedWeight:
        return quantize_rtn(w, self.bits, self.group(w.shape[1]), clip=clip, scale_dtype=self.scale_dtype)
