"""scikit-learn training plans: linear estimators that learn with ``partial_fit``.

A node trains the estimator on its data and sends back its learned parameters (``coef_``,
``intercept_``); the researcher averages them. So that they travel, aggregate, mask under secure
aggregation and checkpoint exactly like a torch model's tensors, they live in a
:class:`SKLearnModel`: a ``torch.nn.Module`` holding them as parameters beside the estimator. The
model's shape must be the same on every node, so a plan declares its ``classes`` and the number
of features up front (``model_args={"n_features": ...}``).

Each round a node builds the estimator afresh with :meth:`SKLearnTrainingPlan.init_estimator`,
loads the round's parameters into it and runs ``epochs`` passes of ``partial_fit`` over its
training split. The estimator's own counters (the learning-rate schedule's ``t_``) restart each
round, so a constant or adaptive learning rate suits federated rounds best. Estimators: those of
``sklearn.linear_model`` with ``partial_fit`` and ``coef_``/``intercept_`` (SGDClassifier,
SGDRegressor, Perceptron, PassiveAggressive*). MLPClassifier is not offered: its first
``partial_fit`` draws its own initial weights, so nodes would not start from one model.

scikit-learn is the ``[sklearn]`` extra; a side without it gets ``missing_dependency``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import MeshflError
from ._base import TrainingPlan


class SKLearnModel(nn.Module):
    """An estimator's learned parameters as tensors (``coef``, ``intercept``), beside the
    estimator that learns them. :meth:`fitted` gives the estimator with these parameters, ready
    for ``predict`` and ``score`` (a researcher's ``evaluate`` callback uses it)."""

    def __init__(self, estimator: Any, n_features: int, classes: tuple = (), task: str = "classification") -> None:
        super().__init__()
        if not (hasattr(estimator, "partial_fit") and hasattr(estimator, "get_params")):
            raise MeshflError(f"{type(estimator).__name__} cannot learn incrementally (it has no partial_fit)",
                              code="bad_plan")
        if estimator.get_params().get("average"):
            raise MeshflError("averaged SGD (average=True) keeps state that does not travel: use average=False",
                              code="bad_plan")
        self.estimator, self.task = estimator, task
        self.classes = np.asarray(classes) if task == "classification" else None
        if task == "classification":
            if self.classes is None or len(self.classes) < 2:
                raise MeshflError("a classification plan declares its classes up front (classes = (0, 1, ...)), "
                                  "so that every node's model has the same shape", code="bad_plan")
            rows = 1 if len(self.classes) == 2 else len(self.classes)
            coef, intercept = (rows, int(n_features)), (rows,)
        else:
            coef, intercept = (int(n_features),), (1,)
        # Zeros: where scikit-learn's own SGD starts, and the same on every node.
        self.coef = nn.Parameter(torch.zeros(coef), requires_grad=False)
        self.intercept = nn.Parameter(torch.zeros(intercept), requires_grad=False)

    def fitted(self) -> Any:
        """The estimator holding this model's parameters (float64, as scikit-learn computes)."""
        est = self.estimator
        est.coef_ = self.coef.detach().double().numpy().copy()
        est.intercept_ = self.intercept.detach().double().numpy().copy()
        est.n_features_in_ = self.coef.shape[-1]
        if self.classes is not None:
            est.classes_ = self.classes
        return est

    def learned(self, est: Any) -> None:
        """Take the estimator's parameters back after training."""
        with torch.no_grad():
            self.coef.copy_(torch.from_numpy(np.asarray(est.coef_, dtype=np.float64).reshape(self.coef.shape)))
            self.intercept.copy_(torch.from_numpy(np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64))))


class SKLearnTrainingPlan(TrainingPlan):
    """Base class of scikit-learn plans (see the module docstring). Define
    ``init_estimator(**model_args)`` and, for classification, ``classes``."""

    #: The labels a classifier can predict, declared so every node's model has the same shape.
    classes: tuple = ()
    uses_cuda = False

    def init_estimator(self, **model_args: Any) -> Any:
        raise NotImplementedError("a scikit-learn plan must define init_estimator()")

    def init_model(self, n_features: int, **model_args: Any) -> SKLearnModel:
        return SKLearnModel(self.init_estimator(**model_args), n_features, tuple(self.classes), self.task)

    def train(self, model: SKLearnModel, train, args: dict, device) -> dict:
        """``epochs`` passes of ``partial_fit`` from the round's parameters."""
        est = model.fitted()
        if "random_state" in est.get_params() and est.get_params()["random_state"] is None:
            est.set_params(random_state=int(args["seed"]))  # the task's seed: a round replays exactly
        x, y = _arrays(train)
        extra = {"classes": model.classes} if model.classes is not None else {}
        epochs = int(args.get("epochs") or 1)
        if x.shape[0]:
            for _ in range(epochs):
                est.partial_fit(x, y, **extra)
        model.learned(est)
        return {"epochs": epochs if x.shape[0] else 0}

    def evaluate(self, model: SKLearnModel, batch) -> dict[str, float]:
        est = model.fitted()
        x, y = _arrays(batch)
        predicted = est.predict(x)
        if self.task != "classification":
            return {"loss": float(np.mean((predicted - y) ** 2))}
        metrics = {"accuracy": float(np.mean(predicted == y))}
        if hasattr(est, "predict_proba"):  # a probabilistic loss (log_loss, modified_huber)
            from sklearn.metrics import log_loss

            metrics["loss"] = float(log_loss(y, est.predict_proba(x), labels=model.classes))
        return metrics


def _arrays(data) -> tuple[np.ndarray, np.ndarray]:
    """Float64 features and numpy labels: scikit-learn's SGD needs the features' dtype to match
    its float64 parameters."""
    x, y = data
    return x.detach().cpu().double().numpy(), y.detach().cpu().numpy()
