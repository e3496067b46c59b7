"""Quantizes float32 rows with the `gguf` package's Q8_0 and Q4_0 (ggml's reference rules) and
writes the block bytes and the dequantized values, for stlm's byte-for-byte comparison.

usage: gguf_quants.py VALUES.f32 COLS OUT_DIR
"""
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants

values, cols, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
x = np.fromfile(values, dtype="<f4").reshape(-1, cols)
for name, kind in [("q8_0", GGMLQuantizationType.Q8_0), ("q4_0", GGMLQuantizationType.Q4_0)]:
    blocks = quants.quantize(x, kind)
    blocks.tofile(out / f"{name}.bin")
    quants.dequantize(blocks, kind).astype("<f4").tofile(out / f"{name}.f32")
