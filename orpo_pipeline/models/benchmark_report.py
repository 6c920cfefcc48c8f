"""What a user reads of the lm-eval scores: the Nous table, a per-task table, a bar chart, the model card section."""

from __future__ import annotations

import re
from pathlib import Path

from .lm_eval_tasks import NOUS_GROUPS

NOUS_COLUMNS = {"agieval": "AGIEval", "gpt4all": "GPT4All", "truthfulqa": "TruthfulQA", "bigbench": "BigBench",
                "average": "Average"}
SECTION = "lm-eval benchmarks"


def _pct(v: float | None, se: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.2f}" + (f" ± {100 * se:.2f}" if se is not None else "")


def nous_table(scores: dict[str, dict], stderr: dict[str, dict]) -> str:
    """The Nous table's columns (percent), one row per model, then the tuned - base delta."""
    if not any(k.startswith("nous/") for s in scores.values() for k in s):
        return ""
    head = "| model | " + " | ".join(NOUS_COLUMNS.values()) + " |\n|---|" + "---|" * len(NOUS_COLUMNS)
    rows = [f"| {name} | " + " | ".join(_pct(s.get(f"nous/{c}"), stderr[name].get(f"nous/{c}")) for c in NOUS_COLUMNS)
            + " |" for name, s in scores.items()]
    if "base" in scores and "tuned" in scores:
        d = [(scores["tuned"].get(f"nous/{c}"), scores["base"].get(f"nous/{c}")) for c in NOUS_COLUMNS]
        rows.append("| Δ tuned − base | " + " | ".join(
            f"{100 * (t - b):+.2f}" if t is not None and b is not None else "–" for t, b in d) + " |")
    return "\n".join([head] + rows)


def task_table(scores: dict[str, dict], stderr: dict[str, dict]) -> str:
    """Every `<suite>/<task>/<metric>` and suite average: value per model, delta, lm-eval's stderr."""
    names = list(scores)
    keys = sorted({k for s in scores.values() for k in s}, key=lambda k: (k.split("/")[0], k.count("/") == 1, k))
    if not keys:
        return ""
    head = ("| suite | task | metric | " + " | ".join(names) + " | Δ tuned − base | stderr (base / tuned) |\n"
            "|---|---|---|" + "---|" * (len(names) + 2))
    lines = [head]
    for k in keys:
        parts = k.split("/")
        suite, task, metric = (parts + ["", ""])[:3] if len(parts) == 3 else (parts[0], parts[1], "")
        vals = [scores[n].get(k) for n in names]
        base, tuned = scores.get("base", {}).get(k), scores.get("tuned", {}).get(k)
        delta = f"{tuned - base:+.4f}" if base is not None and tuned is not None else "–"
        se = " / ".join("–" if stderr.get(n, {}).get(k) is None else f"{stderr[n][k]:.4f}" for n in ("base", "tuned"))
        bold = "**" if len(parts) == 2 else ""
        lines.append(f"| {suite} | {bold}{task}{bold} | {metric} | " +
                     " | ".join("–" if v is None else f"{v:.4f}" for v in vals) + f" | {delta} | {se} |")
    return "\n".join(lines)


def skipped_list(skipped: dict[str, str]) -> str:
    return "\n".join(f"- **{k}** skipped: {why}" for k, why in skipped.items())


def bars_png(scores: dict[str, dict], stderr: dict[str, dict], path: Path) -> Path | None:
    """Grouped bars of the suite-level scores (Nous columns and every suite average), one colour per model."""
    from orpo_pipeline.plots import plt

    keys = [k for k in [f"nous/{g}" for g in NOUS_GROUPS] if any(k in s for s in scores.values())]
    keys += sorted({k for s in scores.values() for k in s if k.endswith("/average")})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(keys) + 2), 3.6), dpi=90)
    width = 0.8 / max(1, len(scores))
    for i, (name, s) in enumerate(scores.items()):
        xs = [j + i * width for j in range(len(keys))]
        ax.bar(xs, [s.get(k, 0.0) for k in keys], width, label=name,
               yerr=[stderr[name].get(k) or 0.0 for k in keys], capsize=2)
    ax.set_xticks([j + width * (len(scores) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels([k.replace("/average", "") for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1), ylabel="score", title="lm-eval: base vs tuned (± stderr)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def card_section(nous: str, tasks: str, skipped: str, settings: dict) -> str:
    body = [f"Scored with lm-evaluation-harness by `lm_eval_scores`, base and tuned model under the same settings: "
            f"`{settings}`.", ""]
    if nous:
        body += ["Nous suite (percent, ± stderr):", "", nous, ""]
    if tasks:
        body += ["Per task:", "", tasks, ""]
    if skipped:
        body += [skipped, ""]
    return "\n".join(body)


def upsert_section(readme: str, body: str, name: str = SECTION) -> str:
    """The card with its `## name` section (between markers) replaced by `body`, or appended."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n## Benchmarks (lm-eval)\n\n{body.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(readme):
        return pattern.sub(lambda _: block, readme)
    return readme.rstrip("\n") + "\n\n" + block


def kept_section(readme: str, name: str = SECTION) -> str:
    """The marked section of an existing card ('' if none), for a writer that rebuilds the rest of the card."""
    m = re.search(re.escape(f"<!-- {name} -->") + r".*?" + re.escape(f"<!-- /{name} -->") + r"\n?", readme, re.S)
    return m.group(0) if m else ""
