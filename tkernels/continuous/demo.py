"""``tkernels continuous-demo``: digits from a tiny MAR-style pair, with and without speculation.

Trains (once, cached) a target and a draft on scikit-learn's 8x8 digits, then samples one grid
per class with the target alone, with exact speculative decoding, and with CSpD's relaxed
(lossy) ratio; writes a PNG of the three grids and prints acceptance, target calls and times.
"""

from __future__ import annotations

import argparse
import time

import torch

from tkernels.continuous.mar import load_or_train_pair, unpatchify
from tkernels.continuous.sampler import SpeculationStats, generate, generate_speculative


def _run(fn) -> tuple[torch.Tensor, SpeculationStats, float]:
    stats = SpeculationStats()
    start = time.perf_counter()
    tokens = fn(stats)
    return tokens, stats, time.perf_counter() - start


def _report(name: str, stats: SpeculationStats, seconds: float, base: SpeculationStats | None) -> str:
    line = f"{name:<28} wall {seconds:6.2f} s  target backbone calls {stats.target_backbone_calls:4d}  target head calls {stats.target_head_calls:5d}"
    if base is not None:
        saved_backbone = 1 - stats.target_backbone_calls / base.target_backbone_calls
        saved_head = 1 - stats.target_head_calls / base.target_head_calls
        line += (
            f"  (saved {saved_backbone:.0%} / {saved_head:.0%})  acceptance {stats.acceptance_rate:.3f}"
            f" ({stats.accepted}/{stats.drafted})  residual tokens {stats.residual_tokens}"
            f" tries {stats.residual_tries}  fallbacks {stats.fallbacks}"
            f"  draft backbone/head calls {stats.draft_backbone_calls}/{stats.draft_head_calls}"
        )
    return line


def _save_grid(path: str, panels: list[tuple[str, torch.Tensor]], per_class: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 0.4 * per_class + 0.5))
    for ax, (title, tokens) in zip(axes, panels):
        images = unpatchify(tokens.clamp(-1, 1)).reshape(per_class, 10, 8, 8)  # rows: samples, cols: classes
        images = torch.nn.functional.pad(images, (0, 1, 0, 1), value=-1.0)  # a blank line between digits
        ax.imshow(images.permute(0, 2, 1, 3).reshape(per_class * 9, 90).numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="continuous_demo.png", help="PNG to write")
    parser.add_argument("--cache-dir", default=None, help="where trained weights are cached (default ~/.cache/tkernels/continuous)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="barely trained models, one sample per class (smoke test)")
    parser.add_argument("--per-class", type=int, default=None, help="samples per class (default 6, 1 with --quick)")
    parser.add_argument("--window", type=int, default=4, help="draft tokens per speculation round")
    parser.add_argument("--inner-temperature", type=float, default=42.0, help="CSpD's relaxed ratio for the lossy run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tkernels continuous-demo", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:

    torch.manual_seed(args.seed)
    target, draft = load_or_train_pair(args.cache_dir, seed=args.seed, quick=args.quick)
    per_class = args.per_class or (1 if args.quick else 6)
    labels = torch.arange(10).repeat(per_class)
    runs = {
        "target only": lambda s: generate(target, labels, torch.Generator().manual_seed(args.seed), stats=s),
        "speculative, exact": lambda s: generate_speculative(
            target, draft, labels, torch.Generator().manual_seed(args.seed), window=args.window, stats=s),
        f"relaxed T={args.inner_temperature:g} (lossy)": lambda s: generate_speculative(
            target, draft, labels, torch.Generator().manual_seed(args.seed), window=args.window,
            inner_temperature=args.inner_temperature, stats=s),
    }
    print(f"{labels.numel()} digits x 16 tokens, {target.head.schedule.num_steps} diffusion steps, window {args.window}")
    panels, base = [], None
    for name, fn in runs.items():
        tokens, stats, seconds = _run(fn)
        print(_report(name, stats, seconds, base))
        base = base or stats
        panels.append((name, tokens))
    _save_grid(args.out, panels, per_class)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
