"""Markdown tables of the experiments' reports, written by one function so every report looks alike.

Light on purpose (no JAX, no TensorFlow): `experiments/demo_report.py` imports it after training.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def format_cell(value: Any) -> str:
    """Floats with four decimals (the precision the reports compare at), anything else as `str`."""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table with the first row's keys as header, one line per row."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(format_cell(row[key]) for key in header) + " |" for row in rows]
    return "\n".join(lines)


def over_seeds(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of one figure over seeds (the std is nan for one seed)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else float("nan")


def mean_std(entry: Mapping[str, Any], name: str, decimals: int = 4) -> str:
    """`mean ± std` of a tuned summary entry's `<name> mean` and `<name> std` (std is nan for one seed)."""
    return f"{entry[name + ' mean']:.{decimals}f} ± {entry[name + ' std']:.{decimals}f}"
