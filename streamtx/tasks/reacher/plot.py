"""The demo's figure: fingertip paths and targets, final distances, and the control loop's latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .env import SUCCESS_DISTANCE
from .evaluate import EvalResult

__all__ = ["plot_evaluation"]

REACH = 0.21  # fingertip distance from the base with the arm stretched


def plot_evaluation(
    result: EvalResult,
    path: str | Path,
    *,
    latencies: np.ndarray | None = None,
    expert: EvalResult | None = None,
    model_time_ms: dict[str, float] | None = None,
    max_paths: int = 16,
    title: str = "",
) -> None:
    """Write a PNG: (1) the first ``max_paths`` fingertip paths (line) towards their targets (cross), (2) the
    histogram of final distances (and the expert's), (3) the histogram of client-measured chunk ``latencies``
    (seconds) with the daemon's model-time percentiles ``model_time_ms`` (e.g. ``{"p50": .., "p99": ..}``) marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    ax = axes[0]
    ax.add_patch(plt.Circle((0, 0), REACH, fill=False, ls=":", color="gray"))
    colors = plt.cm.tab20(np.linspace(0, 1, max_paths))
    for i in range(min(max_paths, len(result.seeds))):
        ax.plot(*result.fingertip[i].T, color=colors[i], lw=1.2)
        ax.plot(*result.fingertip[i, -1], "o", color=colors[i], ms=4)
        ax.plot(*result.target[i], "x", color=colors[i], ms=9, mew=2)
    ax.plot(0, 0, "ks", ms=6)
    ax.set(
        aspect="equal",
        xlim=(-0.25, 0.25),
        ylim=(-0.25, 0.25),
        xlabel="x (m)",
        ylabel="y (m)",
        title="fingertip paths (line) and targets (x)",
    )

    ax = axes[1]
    bins = np.linspace(0, max(0.05, float(result.final_distance.max())), 40)
    ax.hist(result.final_distance, bins=bins, alpha=0.7, label=f"policy ({result.success_rate:.0%})")
    if expert is not None:
        ax.hist(expert.final_distance, bins=bins, alpha=0.5, label=f"expert ({expert.success_rate:.0%})")
    ax.axvline(SUCCESS_DISTANCE, color="k", ls="--", lw=1, label="success threshold")
    ax.set(xlabel="final fingertip-target distance (m)", ylabel="episodes", title="final distance")
    ax.legend()

    ax = axes[2]
    if latencies is not None and len(latencies):
        ms = 1e3 * np.asarray(latencies)
        ax.hist(ms, bins=50, alpha=0.8, label="client round trip")
        for name, q in (("p50", 50), ("p99", 99)):
            ax.axvline(
                np.percentile(ms, q),
                color="C0",
                ls="--" if name == "p50" else ":",
                lw=1,
                label=f"client {name} {np.percentile(ms, q):.2f} ms",
            )
    for (name, value), ls in zip((model_time_ms or {}).items(), ("--", ":")):
        ax.axvline(value, color="C3", ls=ls, lw=1, label=f"daemon model {name} {value:.2f} ms")
    ax.set(xlabel="latency per action chunk (ms)", ylabel="requests", title="control-loop latency")
    ax.legend(fontsize=8)

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
