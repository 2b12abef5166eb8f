"""Heatmap of routing-slot share per MoE layer x expert (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import torch

from moepress.calib.observers import RoutingStats


def plot_share(stats: RoutingStats, path: str | Path, title: str = "") -> Path:
    """Write a PNG: rows are MoE layers, columns experts, colour the share of the routing slots in % (log scale,
    the uniform share 100/E marked on the colour bar); never-routed experts are grey cells with a red x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    layers, pct = share_percent(stats)
    e = pct.shape[1]
    never = pct == 0
    shown = pct.copy()
    shown[never] = float("nan")
    uniform = 100.0 / e

    w = min(max(4.0 + e * 0.32, 7.0), 32.0)
    h = min(max(1.8 + len(layers) * 0.45, 3.2), 24.0)
    fig, ax = plt.subplots(figsize=(w, h), dpi=110)
    ax.set_facecolor("#d9d9d9")
    finite = shown[shown == shown]
    lo = min(float(finite.min()) if finite.size else uniform / 10, uniform * 0.999)
    hi = max(float(finite.max()) if finite.size else uniform * 10, uniform * 1.001)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(shown, aspect="auto", cmap=cmap, norm=LogNorm(vmin=lo, vmax=hi), interpolation="nearest")
    rows, cols = never.nonzero()
    if rows.size:  # said in the subtitle (a legend above the plot covered it on narrow ones)
        ax.scatter(cols, rows, marker="x", c="#d62728", s=max(12, min(60, 900 / e)), linewidths=1.5, zorder=3)
    annotate = e <= 32 and len(layers) <= 24
    if annotate:
        _label_cells(ax, shown, (lo * hi) ** 0.5)
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    step = 1 if e <= 40 else max(1, e // 32)
    ax.set_xticks(range(0, e, step))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    cb = fig.colorbar(im, ax=ax, fraction=min(0.15, 0.5 / w), pad=min(0.04, 0.15 / w))
    cb.set_label("share of routing slots (%)", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    cb.ax.axhline(uniform, color="white", linewidth=2)
    # a token takes top-k slots: the shares sum to 100% over the experts, a share is not the tokens' fraction
    sub = ("cells: % of the layer's top-k routing slots; " if annotate else "") + \
        f"uniform share {uniform:.3g}% (white line on the colour bar)"
    never_line = f"red x: never routed ({rows.size})" if rows.size else ""
    ax.set_title("\n".join(t for t in (title, sub, never_line) if t), fontsize=9, loc="left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def share_percent(stats: RoutingStats):
    """(MoE layer indices, [layers, experts] share of the routing slots in %; NaN past a layer's expert count)."""
    layers = sorted(stats.layers)
    e = max(stats.layers[i].num_experts for i in layers)
    share = torch.full((len(layers), e), float("nan"), dtype=torch.float64)
    for r, i in enumerate(layers):
        lr = stats.layers[i]
        share[r, : lr.num_experts] = lr.share.cpu()
    return layers, (share * 100).numpy()


def _label_cells(ax, shown, mid: float) -> None:
    """Each routed cell's share written in it, white on the dark half of the colour map."""
    for r in range(shown.shape[0]):
        for c in range(shown.shape[1]):
            v = shown[r, c]
            if v == v:
                ax.text(c, r, cell_label(v), ha="center", va="center", fontsize=6.5,
                        color="white" if v < mid else "black")


def cell_label(v: float) -> str:
    """A cell's share in %, short: a routed expert's share under 0.005% reads "<.01", not ".00" (never routed)."""
    if 0 < v < 0.005:
        return "<.01"
    return f"{v:.0f}" if v >= 9.5 else f"{v:.1f}" if v >= 0.95 else f"{v:.2f}".lstrip("0")
