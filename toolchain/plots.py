"""PNG plots for reports people would rather look at than read.

matplotlib with the Agg backend (no display needed); every plot states where its numbers come
from (measured / simulated / predicted) in its title, as every figure in apq must.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def new_figure(width: float, height: float) -> tuple[Any, Any]:
    """(figure, axes) on the Agg backend: plots are written by jobs without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def save_figure(fig: Any, path: str | Path) -> Path:
    """Lay out, write ``path`` as PNG (creating its folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_layer_latency(rows: list[dict[str, Any]], path: str | Path, title: str, top: int = 20) -> Path:
    """Horizontal bar chart of per-kernel time per inference (rows from ProfileReport.to_json())."""
    rows = sorted(rows, key=lambda r: r["total_ms"], reverse=True)
    shown, rest = rows[:top], rows[top:]
    labels = [str(r["name"])[:48] for r in shown]
    values = [float(r["total_ms"]) for r in shown]
    if rest:
        labels.append(f"({len(rest)} more)")
        values.append(sum(float(r["total_ms"]) for r in rest))
    fig, ax = new_figure(9, 0.32 * len(labels) + 1.4)
    ax.barh(range(len(labels))[::-1], values, color="#4477aa")
    ax.set_yticks(range(len(labels))[::-1])
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("ms per inference")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
