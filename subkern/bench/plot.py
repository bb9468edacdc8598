"""Speedup chart of a benchmark run (PNG via matplotlib's Agg backend, no display needed).

One panel per rival: bars = speedup of each of our implementations per case, a dashed line at
1x (parity), red ticks at the issue's targets; the y axis is logarithmic when the speedups span
more than a factor 20. Rows with an efficiency (GPU roofline) get an extra panel with it.
"""

from __future__ import annotations

from .harness import Row


def plot_rows(rows: list[Row], path: str, title: str) -> str | None:
    """Write the chart of ``rows`` to ``path``; returns None, or why no chart was written."""
    if not rows:
        return "no rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib is not importable ({err}); pip install matplotlib for the PNG"

    rivals = list(dict.fromkeys(row.rival for row in rows))
    with_eff = [row for row in rows if row.efficiency is not None]
    panels = len(rivals) + (1 if with_eff else 0)
    cases = list(dict.fromkeys(row.case for row in rows))
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 1.3 * len(cases) + 3), 3.6 * panels),
                             squeeze=False)
    for ax, rival in zip(axes[:, 0], rivals, strict=False):
        subset = [row for row in rows if row.rival == rival]
        _bars(ax, subset, cases, lambda r: r.speedup)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="1x (parity)")
        target_drawn = False
        oursets = list(dict.fromkeys(row.ours for row in subset))
        for row in subset:
            if row.target is None:
                continue
            x = _x(cases, oursets, row)
            ax.hlines(row.target, x - 0.4 / len(oursets), x + 0.4 / len(oursets), colors="red",
                      linewidth=2.5, label=None if target_drawn else "issue target")
            target_drawn = True
        values = [row.speedup for row in subset] + [1.0] + [
            row.target for row in subset if row.target is not None]
        if max(values) / max(min(values), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"vs {rival}")
        ax.legend(fontsize=8, loc="best")
    if with_eff:
        ax = axes[-1, 0]
        seen: set[tuple[str, str]] = set()
        eff_rows = []
        for row in with_eff:   # one bar per (case, ours), whichever rival row carried it
            if (row.case, row.ours) not in seen:
                seen.add((row.case, row.ours))
                eff_rows.append(row)
        _bars(ax, eff_rows, cases, lambda r: 100 * (r.efficiency or 0.0))
        ax.axhline(100.0, color="black", linestyle="--", linewidth=1, label="roofline")
        ax.set_ylabel("% of roofline")
        ax.set_title("efficiency = t_min / t_ours")
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _x(cases: list[str], oursets: list[str], row: Row) -> float:
    width = 0.8 / len(oursets)
    return cases.index(row.case) - 0.4 + width * (oursets.index(row.ours) + 0.5)


def _bars(ax, rows: list[Row], cases: list[str], value) -> None:
    oursets = list(dict.fromkeys(row.ours for row in rows))
    width = 0.8 / len(oursets)
    for ours in oursets:
        subset = [row for row in rows if row.ours == ours]
        xs = [_x(cases, oursets, row) for row in subset]
        heights = [value(row) for row in subset]
        colors = ["tab:blue" if row.match else "tab:red" for row in subset]
        bars = ax.bar(xs, heights, width=width * 0.95, label=ours, color=colors if len(
            oursets) == 1 else None, edgecolor=["none" if r.match else "red" for r in subset])
        for bar, height in zip(bars, heights, strict=True):
            text = f"{height:.0f}" if height >= 100 else f"{height:.3g}"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, height), ha="center",
                        va="bottom", fontsize=7)
    ax.margins(y=0.12)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)


__all__ = ["plot_rows"]
