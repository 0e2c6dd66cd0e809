"""Model shapes for step profiling: a built-in table or a Hugging Face ``config.json`` (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

from tkernels.sched.latency_model import ModelShape

# name -> (layers, hidden, q heads, kv heads, head_dim, intermediate, vocab), unsharded.
BUILTIN: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "llama-3-8b": (32, 4096, 32, 8, 128, 14336, 128256),
    "llama-3-70b": (80, 8192, 64, 8, 128, 28672, 128256),
    "qwen2.5-7b": (28, 3584, 28, 4, 128, 18944, 152064),
    "smollm2-135m": (30, 576, 9, 3, 64, 1536, 49152),
    # Tiny shape of `--dry-run` (CPU, interpreter).
    "tiny": (2, 64, 2, 1, 32, 128, 512),
}


def model_shape(name_or_config: str, tensor_parallel: int = 1, dtype_bytes: int = 2) -> tuple[str, ModelShape]:
    """(display name, per-GPU shard) for a built-in name or a path to a ``config.json``."""
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel: must be >= 1, got {tensor_parallel}")
    key = name_or_config.lower()
    if key in BUILTIN:
        name, dims = key, BUILTIN[key]
    else:
        path = Path(name_or_config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--model: {name_or_config!r} is neither a built-in model "
                             f"({', '.join(sorted(BUILTIN))}) nor a config.json")
        cfg = json.loads(path.read_text())
        heads = cfg["num_attention_heads"]
        dims = (cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads", heads),
                cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"], cfg["vocab_size"])
        name = path.parent.name or path.stem
    layers, hidden, q_heads, kv_heads, head_dim, inter, vocab = dims
    if q_heads % tensor_parallel or inter % tensor_parallel:
        raise ValueError(f"tensor_parallel: {tensor_parallel} does not divide {q_heads} heads / {inter} MLP width")
    shard = ModelShape(layers, hidden, q_heads // tensor_parallel, max(kv_heads // tensor_parallel, 1), head_dim,
                       inter // tensor_parallel, vocab, dtype_bytes)
    return (f"{name}/tp{tensor_parallel}" if tensor_parallel > 1 else name), shard
