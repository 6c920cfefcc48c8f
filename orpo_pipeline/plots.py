"""Small PNG plots for Dagster metadata and MLflow artifacts (headless matplotlib)."""

from __future__ import annotations

import base64
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def histograms_png(series: dict[str, list[float]], path: Path, title: str, xlabel: str, bins: int = 30) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=90)
    for name, values in series.items():
        if len(values):
            ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
    ax.set(title=title, xlabel=xlabel, ylabel="pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def curves_png(history: list[dict], keys: list[str], path: Path, title: str, columns: int = 3) -> Path:
    """One small plot per key, `columns` to a row: 3 x 2.9 in at 90 dpi is 783 px wide, which fits the Dagster
    metadata panel (~900 px) without a scroll bar."""
    rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.9 * columns, 2.4 * rows), dpi=90, squeeze=False)
    flat = axes.ravel()
    for ax, key in zip(flat, keys):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set(title=key, xlabel="step")
    for ax in flat[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def markdown_image(path: Path, alt: str) -> str:
    """Inline PNG for Dagster's markdown metadata, which renders data URIs."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def markdown_table(df) -> str:
    """A polars DataFrame as a markdown table (no pandas/tabulate needed)."""
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ")[:120] for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head] + rows)
