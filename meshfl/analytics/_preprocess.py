"""Federated preprocessing: global statistics, fitted once, applied the same way on every node.

An experiment declares its steps (``Experiment(..., preprocess=[Standardize(), ImputeMean()])``).
Before round 1 they are *fitted* by federated analytics (:meth:`fit`, under secure aggregation if
the experiment uses it): each becomes a plain record of its global statistics, kept in the
experiment's checkpoint (a resumed experiment reuses it) and sent with every training task. The
node applies it to its data (:func:`apply`) before the plan's own ``preprocess`` sees it, so
every node scales, fills and encodes its features identically.

=============== ============================================ ===================================
step            fitted from                                  applied as
=============== ============================================ ===================================
Standardize     global mean and (sample) std per column      (x - mean) / std
MinMaxScale     global min and max per column (exact where   (x - min) / (max - min)
                the nodes allow it, else rounded outward: the
                values then lie inside [0, 1])
ImputeMean      global mean per column                       missing values -> mean
OneHot          the column's levels seen on at least each    one 0/1 feature per level, appended
                node's minimum of records (or those given)   after the numeric features
=============== ============================================ ===================================

Columns are named as the dataset's registry names them (a CSV's header; ``"0"``, ``"1"``, ... for
array datasets); ``columns=None`` means every numeric feature column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._query import AnalyticsError

STEPS = ("standardize", "minmax", "impute", "onehot")


@dataclass(frozen=True)
class Standardize:
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class MinMaxScale:
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImputeMean:
    columns: tuple[str, ...] | None = None


@dataclass(frozen=True)
class OneHot:
    """One-hot encode a text column; ``levels``: the candidates (needed under secure aggregation,
    where a node's own levels cannot be asked for)."""

    column: str
    levels: tuple | None = None


def fit(steps: list, analytics) -> list[dict]:
    """The steps with their global statistics (JSON records), computed by ``analytics``
    (an :class:`~meshfl.analytics.Analytics` over the experiment's nodes, purpose preprocessing)."""
    fitted: list[dict] = []
    numeric = [s for s in steps if not isinstance(s, OneHot)]
    columns = sorted({c for s in numeric for c in _columns(s, analytics)}, key=str)
    summary = analytics.describe(columns) if columns else None
    for step in steps:
        if isinstance(step, OneHot):
            levels = list(step.levels) if step.levels is not None else analytics.levels(step.column)
            if not levels:
                raise AnalyticsError(f"column {step.column!r} has no level seen on enough records to encode")
            fitted.append({"step": "onehot", "column": str(step.column), "levels": levels})
            continue
        cols = _columns(step, analytics)
        stats = [summary.columns[c] for c in cols]
        if isinstance(step, Standardize):
            fitted.append({"step": "standardize", "columns": cols, "mean": [s.mean for s in stats],
                           "std": [s.std if s.std > 0 and math.isfinite(s.std) else 1.0 for s in stats]})
        elif isinstance(step, MinMaxScale):
            if not all(math.isfinite(s.min) and math.isfinite(s.max) for s in stats):
                raise AnalyticsError("min-max scaling needs finite extremes on every column", code="bad_bins")
            fitted.append({"step": "minmax", "columns": cols, "min": [s.min for s in stats],
                           "max": [s.max if s.max > s.min else s.min + 1.0 for s in stats]})
        elif isinstance(step, ImputeMean):
            fitted.append({"step": "impute", "columns": cols, "mean": [s.mean for s in stats]})
        else:
            raise AnalyticsError(f"unknown preprocessing step {step!r}")
    return fitted


def _columns(step, analytics) -> list[str]:
    return [str(c) for c in step.columns] if step.columns is not None else analytics.columns()


def check(fitted) -> list[dict]:
    """A train request's ``preprocess`` records, checked (a node refuses malformed ones)."""
    if not isinstance(fitted, list):
        raise AnalyticsError("preprocess is a list of fitted steps", code="bad_preprocess")
    for step in fitted:
        if not isinstance(step, dict) or step.get("step") not in STEPS:
            raise AnalyticsError(f"a preprocessing step is one of {', '.join(STEPS)}", code="bad_preprocess")
        if step["step"] == "onehot":
            if not isinstance(step.get("column"), str) or not isinstance(step.get("levels"), list) \
                    or not step["levels"]:
                raise AnalyticsError("onehot needs a column and its levels", code="bad_preprocess")
            continue
        columns = step.get("columns")
        stats = [step.get(k) for k in {"standardize": ("mean", "std"), "minmax": ("min", "max"),
                                        "impute": ("mean",)}[step["step"]]]
        if not isinstance(columns, list) or not all(
                isinstance(v, list) and len(v) == len(columns)
                and all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in stats):
            raise AnalyticsError(f"{step['step']} needs its columns and one finite number per column for "
                                 f"each of its statistics", code="bad_preprocess")
    return fitted


def apply(x: np.ndarray, names: list[str], fitted: list[dict], text: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """``x`` (rows x the named feature columns, float) with the fitted steps applied, in order;
    one-hot features appended at the end (``text``: the text columns' values, by name)."""
    x = np.array(x, dtype=np.float64, copy=True)
    index = {n: i for i, n in enumerate(names)}
    extra = []
    for step in fitted:
        if step["step"] == "onehot":
            values = (text or {}).get(step["column"])
            if values is None:
                raise AnalyticsError(f"no text column {step['column']!r} to encode in this dataset",
                                     code="unknown_column")
            extra.append(np.stack([values == str(level) for level in step["levels"]], axis=1).astype(np.float64))
            continue
        cols = []
        for name in step["columns"]:
            if name not in index:
                raise AnalyticsError(f"no feature column {name!r} in this dataset", code="unknown_column")
            cols.append(index[name])
        part = x[:, cols]
        if step["step"] == "standardize":
            part = (part - np.asarray(step["mean"])) / np.asarray(step["std"])
        elif step["step"] == "minmax":
            lo, hi = np.asarray(step["min"]), np.asarray(step["max"])
            part = (part - lo) / (hi - lo)
        else:
            part = np.where(np.isnan(part), np.asarray(step["mean"]), part)
        x[:, cols] = part
    return np.concatenate([x, *extra], axis=1) if extra else x


def output_width(names: list[str], fitted: list[dict]) -> int:
    """Features a model gets after ``fitted`` (the numeric ones, then one per one-hot level)."""
    return len(names) + sum(len(s["levels"]) for s in fitted if s["step"] == "onehot")
