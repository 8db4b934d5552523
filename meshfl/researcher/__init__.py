"""The researcher's side: the thin client and the experiment round loop."""

from ._experiment import Experiment, PrivacyBudgetExhausted, RoundFailed
from ._researcher import Researcher

__all__ = ["Experiment", "PrivacyBudgetExhausted", "Researcher", "RoundFailed"]
