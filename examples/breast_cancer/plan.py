"""The training plan that travels to the hospitals.

It lives in its own module on purpose: meshfl sends the plan class's source plus this module's
top-level imports (nothing else from the file), and each node operator approves exactly that
text by its SHA-256 hash. Any change to this file's class or imports changes the hash and needs
a new approval; whitespace at line ends and line-ending style do not.
"""

import torch
from torch import nn

from meshfl.plans import TorchTrainingPlan


class BreastCancerPlan(TorchTrainingPlan):
    """A small MLP on the 30 Wisconsin features.

    The features span five orders of magnitude (areas in the thousands, fractal dimensions near
    0.05), so the model takes log1p of them and starts with BatchNorm; FedAvg averages the
    BatchNorm running statistics too, which gives a global normalisation nobody computed on
    pooled data.
    """

    task = "classification"  # integer labels: cross-entropy loss, accuracy reported

    def init_model(self, features: int = 30, hidden: int = 16) -> nn.Module:
        return nn.Sequential(
            nn.BatchNorm1d(features),
            nn.Linear(features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2),
        )

    def preprocess(self, x, y):
        # runs on the node, before its train/test split; the researcher applies it too when it
        # scores the global model on its own held-out patients
        return torch.log1p(x.clamp_min(0)), y


class ScaledPlan(TorchTrainingPlan):
    """Logistic regression on features the nodes standardise first (`analyze.py`).

    No log1p and no BatchNorm: plain SGD on these features only works once every node has scaled
    them the same way, with the global mean and standard deviation that federated analytics
    computed (`Experiment(..., preprocess=[Standardize()])`).
    """

    task = "classification"

    def init_model(self, features: int = 30) -> nn.Module:
        return nn.Linear(features, 2)

    def init_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=lr)
