"""PNG plots of the diagnostics (matplotlib, Agg backend: no display needed).

Each function takes the ``diagnostics.json`` dict (``linearize.diagnostics``) or the evaluate table and a path,
and returns the path written, or None when the run has nothing to plot for it. :func:`write_all` writes every
plot into the run directory and returns ``{name: file name}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

FILES = {
    "usage_heatmap": "usage_heatmap.png",
    "usage_by_position": "usage_by_position.png",
    "reach": "reach.png",
    "ablation": "ablation.png",
    "perplexity_by_position": "perplexity_by_position.png",
    "passkey": "passkey.png",
}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def usage_heatmap(diag: dict[str, Any], path: Path) -> Path | None:
    """Layer x head heatmaps of the LA mass and output shares at positions >= window (all positions if none)."""
    u = diag.get("usage")
    if u is None:
        return None
    side = "ge_window" if u["tokens"]["ge_window"] else "all"
    fig, axes = plt.subplots(1, 2, figsize=(2 + 0.5 * u["heads"] * 2, 1.5 + 0.22 * len(u["layers"])), squeeze=False)
    for ax, metric in zip(axes[0], ("la_mass_share", "la_output_share")):
        data = np.array([[np.nan if v is None else v for v in row] for row in u[metric][side]], dtype=float)
        image = ax.imshow(data, aspect="auto", vmin=0.0, vmax=1.0, cmap="viridis", origin="lower")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(u["layers"])), [str(layer) for layer in u["layers"]], fontsize=6)
        ax.set_xticks(range(u["heads"]))
        label = "n >= window" if side == "ge_window" else "all positions"
        ax.set_title(f"{metric.replace('_', ' ')} ({label})", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.05)
    return _save(fig, path)


def usage_by_position(diag: dict[str, Any], path: Path) -> Path | None:
    """Mean LA shares (over layers and heads) against the query position, with the window marked."""
    u = diag.get("usage")
    if u is None:
        return None
    prof = u["by_position"]
    centres = [s + prof["bin_size"] / 2 for s in prof["starts"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(centres, prof["la_mass_share"], marker="o", ms=3, label="LA mass share")
    ax.plot(centres, prof["la_output_share"], marker="s", ms=3, label="LA output share")
    ax.axvline(diag["window"], color="k", ls="--", lw=1, label=f"window = {diag['window']}")
    ax.set_xlabel("query position")
    ax.set_ylabel("share")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"LA share vs position ({u['source']}, mode {u['mode']})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reach_histograms(diag: dict[str, Any], path: Path) -> Path | None:
    """Per task: histogram of request lengths (tokens fed to the model) against the window."""
    reach = diag.get("reach")
    if not reach:
        return None
    fig, axes = plt.subplots(1, len(reach), figsize=(3.8 * len(reach), 3.2), squeeze=False)
    for ax, (task, r) in zip(axes[0], reach.items()):
        edges = r["histogram"]["edges"]
        ax.bar(edges[:-1], r["histogram"]["counts"], width=np.diff(edges), align="edge", edgecolor="white")
        ax.axvline(diag["window"], color="r", ls="--", lw=1, label=f"window = {diag['window']}")
        ax.set_xlabel("request length (tokens)")
        ax.set_ylabel("requests")
        ax.set_title(f"{task}: {100 * r['share_scored_ge_window']:.1f}% scored tokens >= window", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def ablation_bars(results: dict[str, dict[str, float]], path: Path) -> Path | None:
    """The evaluate table as grouped bars: one group per task (and AVG), one bar per row (base, modes)."""
    if not results:
        return None
    rows = list(results)
    keys = [k for k in next(iter(results.values())) if k != "rec"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(keys) * max(1, len(rows) / 3), 3.8))
    x = np.arange(len(keys))
    for i, row in enumerate(rows):
        values = [100 * results[row].get(k, np.nan) if results[row].get(k, 0) <= 1.0 else results[row][k] for k in keys]
        ax.bar(x + (i - (len(rows) - 1) / 2) * width, values, width, label=row)
    ax.set_xticks(x, keys)
    ax.set_ylabel("score (%)")
    ax.set_title("Component ablations", fontsize=9)
    ax.legend(fontsize=7, ncol=min(3, len(rows)))
    return _save(fig, path)


def perplexity_by_position(diag: dict[str, Any], path: Path) -> Path | None:
    ppl = diag.get("perplexity")
    if ppl is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for row, r in ppl["rows"].items():
        buckets = r["buckets"]
        ax.plot(range(len(buckets)), [b["ppl"] for b in buckets], marker="o", label=row)
        labels = [f"[{b['start']},{b['end']})" for b in buckets]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("query position bucket")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{ppl['file']}: perplexity by position (window = {diag['window']})", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def passkey_accuracy(diag: dict[str, Any], path: Path) -> Path | None:
    pk = diag.get("passkey")
    if pk is None:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for row, by_len in pk["rows"].items():
        lengths = [int(n) for n in by_len]
        ax.plot(lengths, [by_len[str(n)]["accuracy"] for n in lengths], marker="o", label=row)
    ax.axhline(pk["chance"], color="grey", ls=":", lw=1, label="chance")
    ax.axvline(diag["window"], color="k", ls="--", lw=1, label="window")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.legend(fontsize=7)
    return _save(fig, path)


def write_all(diag: dict[str, Any], results: dict[str, dict[str, float]], out_dir: Path) -> dict[str, str]:
    """Writes every plot that has data into ``out_dir``; returns ``{name: file name}``."""
    out_dir = Path(out_dir)
    makers = {
        "usage_heatmap": lambda p: usage_heatmap(diag, p),
        "usage_by_position": lambda p: usage_by_position(diag, p),
        "reach": lambda p: reach_histograms(diag, p),
        "ablation": lambda p: ablation_bars(results, p),
        "perplexity_by_position": lambda p: perplexity_by_position(diag, p),
        "passkey": lambda p: passkey_accuracy(diag, p),
    }
    written = {}
    for name, make in makers.items():
        if make(out_dir / FILES[name]) is not None:
            written[name] = FILES[name]
    return written
