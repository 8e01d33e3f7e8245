"""A real model's GGUF with random quantized blocks, for timing where its weights cannot travel (the lent GPU
machine takes 64 MiB; Qwen2.5-Coder-1.5B Q4_K_M is 1.1 GB). Speed depends on the shapes and block types, not on
the values, so a model with the file's metadata (tokenizer included), its float tensors (norms, biases) and random
blocks of each quantized tensor's own type and shape streams the same bytes through the same kernels. Its outputs
are meaningless text; timings use fixed output lengths (ignore_eos).

  python benchmarks/gpu/synthetic_gguf.py skeleton REAL.gguf SKELETON.gguf   # here: metadata + float tensors
  python benchmarks/gpu/synthetic_gguf.py fill SKELETON.gguf MODEL.gguf      # there: random blocks added
"""
from __future__ import annotations

import argparse
import json
import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

MANIFEST = "tokenmill.synthetic.tensors"  # the skeleton's list of quantized tensors to fill: name, type, shape
# Per block type: bytes per block, the offset of its float16 scale d and the range of its random values (weights of
# a few hundredths, as trained models have), and the offset and factor of a float16 min set to factor * d so that
# weights centre on 0 (Q4_K: w = d sc q - dmin m with sc, m, q uniform; Q4_1: w = d q + m).
BLOCKS = {Q.Q4_K: (144, 0, (2e-5, 1e-4), 2, 7.5), Q.Q6_K: (210, 208, (5e-6, 2e-5), None, 0),
          Q.Q8_0: (34, 0, (1e-4, 4e-4), None, 0), Q.Q4_0: (18, 0, (2e-3, 6e-3), None, 0),
          Q.Q4_1: (20, 0, (2e-3, 6e-3), 2, -7.5), Q.Q5_0: (22, 0, (1e-3, 3e-3), None, 0)}


def skeleton(src: str, out: str) -> None:
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    quantized = []
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]  # numpy order: rows first
        if t.tensor_type in (Q.F32, Q.F16):
            writer.add_tensor(t.name, np.array(t.data).reshape(shape))
        elif t.tensor_type in BLOCKS:
            quantized.append({"name": t.name, "type": t.tensor_type.name, "shape": shape})
        else:
            sys.exit(f"{t.name}: {t.tensor_type.name} blocks are not generated here")
    writer.add_string(MANIFEST, json.dumps(quantized))
    _write(writer)


def fill(src: str, out: str, seed: int = 0) -> None:
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(out, arch)
    rng = np.random.default_rng(seed)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", MANIFEST):
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), field.types[0], sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape([int(d) for d in reversed(t.shape)]))
    for entry in json.loads(reader.fields[MANIFEST].contents()):
        qtype = Q[entry["type"]]
        rows, cols = entry["shape"]
        size, d_at, (low, high), min_at, min_factor = BLOCKS[qtype]
        block_values = gguf.GGML_QUANT_SIZES[qtype][0]
        blocks = rng.integers(0, 256, (rows * cols // block_values, size), dtype=np.uint8)
        d = rng.uniform(low, high, (len(blocks), 1))
        blocks[:, d_at:d_at + 2] = d.astype(np.float16).view(np.uint8)
        if min_at is not None:
            blocks[:, min_at:min_at + 2] = (d * min_factor).astype(np.float16).view(np.uint8)
        writer.add_tensor(entry["name"], blocks.reshape(rows, -1), raw_dtype=qtype)
    _write(writer)


def _write(writer: GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["skeleton", "fill"])
    parser.add_argument("src")
    parser.add_argument("out")
    args = parser.parse_args()
    (skeleton if args.command == "skeleton" else fill)(args.src, args.out)


if __name__ == "__main__":
    main()
