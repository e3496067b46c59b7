"""Reads a GGUF file with the `gguf` package (llama.cpp's own Python reader) and writes what it
finds, for stlm's comparison: `fields.json` (every metadata key but the GGUF.* header ones, with
its value and type name), `tensors.json` (name, type name, dimensions innermost first) and each
tensor's values, dequantized to float32, as `<name>.f32`.

usage: gguf_read.py FILE.gguf OUT_DIR
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, quants

path, out = Path(sys.argv[1]), Path(sys.argv[2])
reader = GGUFReader(path)
fields = {}
for key, field in reader.fields.items():
    if key.startswith("GGUF."):
        continue
    types = [GGUFValueType(t).name for t in field.types]
    fields[key] = {"types": types, "value": field.contents()}
(out / "fields.json").write_text(json.dumps(fields))
tensors = []
for t in reader.tensors:
    kind = GGMLQuantizationType(t.tensor_type)
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = np.asarray(t.data, dtype="<f4")
    else:
        values = quants.dequantize(t.data, kind).astype("<f4")
    values.tofile(out / f"{t.name}.f32")
    tensors.append({"name": t.name, "type": kind.name, "shape": [int(d) for d in t.shape]})
(out / "tensors.json").write_text(json.dumps(tensors))
