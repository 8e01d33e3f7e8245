"""Compiles every GPU-path kernel for a Hopper GPU (sm_90) down to a cubin, on this CPU-only machine: Triton's
interpreter runs Python semantics and lets through what its compiler refuses (a variable that changes type in a
branch, an unsupported op), so test_compile.py runs this in a process without TRITON_INTERPRET."""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tokenmill.kernels.gpu import attention, layer_ops, qlinear

TARGET = GPUTarget("cuda", 90, 32)
# per weight format (quant/gpu_layout.py FORMATS order): element types of low, scales, mins
WEIGHTS = {0: ("i8", "fp16", "fp16"), 1: ("u8", "fp16", "fp16"), 2: ("u8", "u8", "u8"), 3: ("u8", "i8", "i8"),
           4: ("u8", "fp16", "fp16")}


def _compile(kernel, types: dict[str, str], constexprs: dict) -> None:
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET)


def main() -> int:
    count = 0
    for fmt, (low, scales, mins) in WEIGHTS.items():
        ptrs = {"low": f"*{low}", "high": "*u8", "scales": f"*{scales}", "mins": f"*{mins}", "supers": "*fp16",
                "bias": "*fp32", "out": "*fp32"}
        for x, (bm, bn, bk), split in (("bf16", (16, 64, 128), 1), ("bf16", (64, 128, 64), 0),
                                       ("fp32", (16, 64, 128), 0)):
            _compile(qlinear._qlinear_kernel, ptrs | {"x": f"*{x}", "out": "*fp32" if split else f"*{x}"},
                     dict(FMT=fmt, GROUP=16 if fmt == 3 else 32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
                          IEEE=x == "fp32", HAS_BIAS=not split))
            count += 1
        _compile(qlinear._dequantize_kernel, ptrs | {"ids": "*i64", "K": "i32"},
                 dict(FMT=fmt, GROUP=16 if fmt == 3 else 32, BLOCK_K=128))
        count += 1
    for (kv_fmt, cache, scale), q in (((0, "bf16", "bf16"), "bf16"), ((1, "i8", "fp32"), "bf16"),
                                      ((2, "u8", "fp16"), "bf16"), ((0, "fp32", "fp32"), "fp32")):
        types = {"q": f"*{q}", "k": f"*{cache}", "v": f"*{cache}", "k_scale": f"*{scale}", "v_scale": f"*{scale}",
                 "tables": "*i64", "lens": "*i64", "out": f"*{q}", "scale": "fp32"}
        _compile(attention._attention_kernel, types, dict(GROUP=6, BLOCK_G=16, D=128, BLOCK_D=128, BLOCK_N=32,
                                                          BLOCK_SIZE=16, KV_FMT=kv_fmt, IEEE=q == "fp32"))
        count += 1
    for dtype in ("bf16",):
        _compile(layer_ops._rms_norm_kernel, {"x": f"*{dtype}", "w": f"*{dtype}", "out": f"*{dtype}", "eps": "fp32"},
                 dict(BLOCK=2048))
        _compile(layer_ops._rotary_kernel, {"q": f"*{dtype}", "k": f"*{dtype}", "positions": "*i64",
                                            "cos": "*fp32", "sin": "*fp32"}, dict(HALF=64))
        for gelu in (0, 1):
            _compile(layer_ops._act_and_mul_kernel, {"x": f"*{dtype}", "out": f"*{dtype}"}, dict(GELU=gelu, BLOCK=1024))
        _compile(layer_ops._write_kv_kernel, {"k": f"*{dtype}", "v": f"*{dtype}", "slots": "*i64",
                                              "k_cache": "*bf16", "v_cache": "*bf16"}, dict(BLOCK_D=128))
        count += 5
    print(f"compiled {count} kernels for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
