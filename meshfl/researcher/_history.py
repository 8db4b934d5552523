"""An experiment's history - one dict per round - and the two ways to look at it: a figure
(:meth:`History.plot`, matplotlib) and TensorBoard event files (:class:`TensorBoardLog`).

Both need the ``[plot]`` extra (``pip install meshfl[plot]``); without it they raise
:class:`~meshfl.errors.MissingDependency`. matplotlib and tensorboard are imported only when used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

from ..errors import MissingDependency


#: Metrics that count rather than score (optimizer steps): left out of plots and summaries by default.
COUNTS = frozenset({"steps"})


class History(list):
    """The rounds of an experiment, oldest first: a plain list of the round dicts (see the
    researcher guide), plus :meth:`plot`. ``experiment`` is the experiment's id (the plot's title)."""

    def __init__(self, rounds: Iterable[dict] = (), experiment: str = "") -> None:
        super().__init__(rounds)
        self.experiment = experiment

    def plot(self, path: str | Path, *, metrics: Iterable[str] | None = None,
             baselines: Mapping[str, Mapping[str, float]] | None = None, title: str | None = None) -> Path:
        """Draw the global and per-node metrics over the rounds into one image file (PNG, SVG or
        PDF, by ``path``'s suffix): one small panel per metric, each line labelled at its end.

        ``metrics``: which to draw (default: every metric but counts such as ``steps``).
        ``baselines``: reference values drawn as dashed lines, e.g.
        ``{"centralized": {"accuracy": 0.96}}``. Returns the path.
        """
        from ._plot import plot_history

        return plot_history(self, Path(path), metrics=metrics, baselines=baselines,
                            title=self.experiment if title is None else title)


def global_metrics(entry: dict) -> dict[str, float]:
    return {k: float(v) for k, v in (entry.get("global") or {}).items() if _number(v)}


def node_metrics(entry: dict) -> dict[str, dict[str, float]]:
    """{node name: {metric: value}} of one round (empty under secure aggregation)."""
    return {node: {k: float(v) for k, v in (info.get("metrics") or {}).items() if _number(v)}
            for node, info in (entry.get("nodes") or {}).items()}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TensorBoardLog:
    """TensorBoard event files for one experiment, a round at a time: ``global/<metric>``,
    ``<metric>/<node>`` (one chart per metric, a line per node), and ``round/seconds``,
    ``round/samples``, ``round/nodes``, ``round/failed``, ``round/dropped``. Uses
    ``torch.utils.tensorboard``, which needs only the ``tensorboard`` package."""

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._writer = None

    @staticmethod
    def check() -> None:
        """Raise :class:`MissingDependency` now, rather than after the first round, if tensorboard is missing."""
        _summary_writer()

    def write(self, entry: dict) -> None:
        if self._writer is None:
            self._writer = _summary_writer()(log_dir=str(self.log_dir))
        step, add = int(entry["round"]), self._writer.add_scalar
        for k, v in global_metrics(entry).items():
            add(f"global/{k}", v, step)
        for node, values in node_metrics(entry).items():
            for k, v in values.items():
                add(f"{k}/{node}", v, step)
        add("round/seconds", float(entry.get("seconds") or 0.0), step)
        add("round/samples", float(entry.get("samples") or 0), step)
        for key in ("nodes", "failed", "dropped"):
            add(f"round/{key}", float(len(entry.get(key) or ())), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch ships the writer; it needs the tensorboard package
        raise MissingDependency("TensorBoard", "plot") from None
    return SummaryWriter
