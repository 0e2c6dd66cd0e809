"""From step measurements to the per-GPU config's ``latency_model``, ``budgets`` and ``tree_budgets``."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from tkernels.sched.budget import DecodeMaximalPolicy, Prefill
from tkernels.sched.latency_model import LatencyModel, ModelShape, fit_rates
from tkernels.spec.tree import MAX_TREE_NODES
from tkernels.spec.tree_policy import DynamicTreePolicy

# The load each SLO's budget is derived for (docs/design.md's W1: 64 decodes at context 2048 while
# a long prompt is being prefilled), and the batch sizes tree budgets are derived for.
REFERENCE_DECODES = 64
REFERENCE_CONTEXT = 2048
TREE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)
TREE_MAX_NODES = MAX_TREE_NODES  # the largest tree the kernels and plugins take


def derive(shape: ModelShape, costs, measured_us, slos_ms: list[float]) -> dict:
    """latency_model, budgets and tree_budgets sections (plus fit quality) for the config."""
    rates = fit_rates(shape, costs, measured_us)
    model = LatencyModel(shape, rates)
    predicted = [model.step_us(*c) for c in costs]
    errors = [abs(p / m - 1) for p, m in zip(predicted, measured_us)]

    reference = dict(decode_context_lens=[REFERENCE_CONTEXT] * REFERENCE_DECODES, prefills=[Prefill(0, 1 << 20)])
    per_slo = {}
    for slo in slos_ms:
        policy = DecodeMaximalPolicy(shape, slo_ms=slo, rates=rates)
        per_slo[f"{slo:g}"] = policy.plan(**reference).tokens
    default_slo = sorted(slos_ms)[len(slos_ms) // 2]

    tree = DynamicTreePolicy(step_time=model)  # every node attends to the reference context (priced)
    tree_budgets = {str(b): len(tree.choose(b, TREE_MAX_NODES, context=REFERENCE_CONTEXT)) for b in TREE_BATCH_SIZES}
    return {
        "latency_model": {**asdict(rates), "fit_max_rel_error": max(errors), "fit_median_rel_error":
                          float(np.median(errors)), "points": len(costs)},
        "budgets": {"default_tokens": per_slo[f"{default_slo:g}"], "default_slo_ms": default_slo,
                    "per_slo_ms": per_slo, "reference_load": f"{REFERENCE_DECODES} decodes at context "
                    f"{REFERENCE_CONTEXT} + a long prefill"},
        "tree_budgets": {"nodes_per_request": tree_budgets, "context": REFERENCE_CONTEXT,
                         "acceptance": "DynamicTreePolicy prior (measured acceptance replaces it online)"},
    }, predicted


def plot(path, points, measured_us, predicted_us, budgets: dict, title: str) -> None:
    """PNG: measured vs fitted step time per point, and the token budget per SLO."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    order = sorted(range(len(points)), key=lambda i: measured_us[i])
    ax1.plot(range(len(order)), [measured_us[i] / 1e3 for i in order], "o", label="measured")
    ax1.plot(range(len(order)), [predicted_us[i] / 1e3 for i in order], "x", label="fitted model")
    ax1.set_xticks(range(len(order)), [points[i].id for i in order], rotation=90, fontsize=6)
    ax1.set_ylabel("step time (ms)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("decoder step: measured vs latency model")
    slos = sorted(budgets["per_slo_ms"], key=float)
    ax2.plot([float(s) for s in slos], [budgets["per_slo_ms"][s] for s in slos], "o-")
    ax2.set_xlabel("TBT SLO (ms)")
    ax2.set_ylabel("token budget per step")
    ax2.set_title(f"budget for {budgets['reference_load']}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
