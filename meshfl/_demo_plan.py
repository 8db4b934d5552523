"""The demo's training plan (kept in its own module: only its imports travel with it)."""

import torch
from torch import nn

from meshfl.plans import TorchTrainingPlan


class BreastCancerPlan(TorchTrainingPlan):
    """A small MLP on the 30 Wisconsin features; log1p then BatchNorm, whose running statistics
    FedAvg averages into a global normalisation without anyone seeing the data."""

    def init_model(self, features: int = 30, hidden: int = 16) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def preprocess(self, x, y):
        return torch.log1p(x.clamp_min(0)), y
