"""Federated analytics: statistics as sums of per-node sufficient statistics.

* :mod:`._query` - the ops a researcher may ask, checked, and the layout of their answer;
* :mod:`._local` - a node's side: the answer over its table, suppression of small cells;
* :mod:`._limbs` - exact fixed-point sums, in the clear or under secure aggregation;
* :mod:`._combine` - totals to statistics (means, variances, extremes, histograms, quantiles);
* :mod:`._client` - :class:`Analytics`, the researcher's API;
* :mod:`._preprocess` - federated preprocessing: steps fitted from global statistics.
"""

from . import _preprocess as preprocess
from ._preprocess import ImputeMean, MinMaxScale, OneHot, Standardize

from ._combine import Answer, ColumnStats, Histogram, Quantile
from ._limbs import encode
from ._local import Table, coarsen_extremes, compute, keep_levels, suppress
from ._query import AnalyticsError, Op, check_columns, columns_of, nbytes, parse, summary

_LAZY = {"Analytics": "._client", "AnalysisFailed": "._client", "Summary": "._client"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'meshfl.analytics' has no attribute {name!r}")


__all__ = ["AnalysisFailed", "Analytics", "AnalyticsError", "Answer", "ColumnStats", "Histogram", "ImputeMean",
           "MinMaxScale", "OneHot", "Op", "Quantile", "Standardize", "Summary", "Table", "preprocess", "check_columns", "coarsen_extremes", "columns_of", "compute", "encode",
           "keep_levels", "nbytes", "parse", "summary", "suppress"]
