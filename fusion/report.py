"""Evaluation reports: ``report.json``, ``report.md`` and PNG plots in one directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fusion.labels import LabelSpace
from fusion.metrics import SUMMARY_KEYS, reliability

log = logging.getLogger(__name__)


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(metric, uncalibrated, calibrated) for the metrics present."""
    unc = metrics.get("uncalibrated", {})
    return [(k, unc.get(k), metrics[k]) for k in SUMMARY_KEYS if k in metrics]


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_summary(metrics: dict[str, Any]) -> str:
    lines = [f"{'metric':<16}{'uncalibrated':>14}{'calibrated':>12}"]
    lines += [f"{k:<16}{_fmt(u):>14}{_fmt(c):>12}" for k, u, c in summary_rows(metrics)]
    lines.append(f"temperature {metrics.get('temperature', 1.0):.3f}, n = {metrics['n']}")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str], markdown: bool = False) -> str:
    """Rows of dicts as an aligned text table (or a Markdown table); absent values print as '-'."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*columns)] + [fmt.format(*row) for row in cells])


def _plot_confusion(cm: list[list[int]], classes: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    m = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(classes), 1.0 + 0.8 * len(classes)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_reliability(curves: dict[str, dict[str, list[float]]], eces: dict[str, float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    for name, r in curves.items():
        seen = np.asarray(r["count"]) > 0
        ax.plot(
            np.asarray(r["confidence"])[seen],
            np.asarray(r["accuracy"])[seen],
            "o-",
            label=f"{name} (ECE {eces[name]:.3f})",
        )
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("Reliability diagram")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def can_plot() -> bool:
    """matplotlib is installed (the ``demo`` extra); without it reports have tables but no PNG plots."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        import matplotlib

        matplotlib.use("Agg")
        return True
    log.warning("matplotlib is not installed: the report has no plots (pip install 'labelfuse[demo]')")
    return False


def write_report(
    out_dir: str | Path,
    metrics: dict[str, Any],
    space: LabelSpace,
    y_true: np.ndarray,
    proba: np.ndarray,
    proba_uncalibrated: np.ndarray | None,
    info: dict[str, Any],
    sections: dict[str, tuple[list[dict[str, Any]], tuple[str, ...]]] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, reliability.png and (multiclass) confusion_matrix.png.

    ``proba_uncalibrated`` None (only calibrated answers known, e.g. from a live endpoint) leaves
    the uncalibrated curve and column out. ``sections`` adds titled tables ``{title: (rows, columns)}`` (method comparison, LLM
    usage, call rates, learning curves) to both files."""
    sections = sections or {}
    plots = can_plot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    if plots:
        paths["reliability"] = out / "reliability.png"
    curves, eces = {}, {}
    if proba_uncalibrated is not None:
        curves["uncalibrated"] = reliability(proba_uncalibrated, y_true, space.multilabel)
        eces["uncalibrated"] = metrics["uncalibrated"]["ece"]
    curves["calibrated"] = reliability(proba, y_true, space.multilabel)
    eces["calibrated"] = metrics["ece"]
    if plots:
        _plot_reliability(curves, eces, paths["reliability"])
    if plots and "confusion_matrix" in metrics:
        paths["confusion"] = out / "confusion_matrix.png"
        _plot_confusion(metrics["confusion_matrix"], space.classes, paths["confusion"])

    tables = {title: rows for title, (rows, _) in sections.items()}
    paths["json"].write_text(
        json.dumps({"info": info, "metrics": metrics, "reliability": curves, "tables": tables}, indent=2)
    )

    md = [f"# labelfuse evaluation: {info.get('data', '')}", ""]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += ["", "## Summary", "", "| metric | uncalibrated | calibrated |", "|---|---|---|"]
    md += [f"| {k} | {_fmt(u)} | {_fmt(c)} |" for k, u, c in summary_rows(metrics)]
    temperature = f"Temperature: {metrics['temperature']:.3f}. " if "temperature" in metrics else ""
    md += ["", temperature + "ECE: 15 equal-width bins; definitions in `fusion/metrics.py`.", ""]
    for title, (rows, cols) in sections.items():
        md += [f"## {title}", "", format_table(rows, cols, markdown=True), ""]
        if plots and title == "Learning curves":
            md += ["![learning curves](learning_curves.png)", ""]
    md += ["## Per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    md += [
        f"| {c} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
        for c, m in metrics["per_class"].items()
    ]
    if "confusion" in paths:
        md += ["", "## Confusion matrix", "", "![confusion matrix](confusion_matrix.png)"]
    if plots:
        md += ["", "## Calibration", "", "![reliability diagram](reliability.png)", ""]
    paths["markdown"].write_text("\n".join(md))
    return paths
