"""PyTorch training plans (see :mod:`meshfl.plans`)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import TrainingPlan


class TorchTrainingPlan(TrainingPlan):
    """Base class of PyTorch training plans (see the module docstring)."""

    def init_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr)

    def training_step(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        out = model(x)
        if self.task == "classification":
            return nn.functional.cross_entropy(out, y.long())
        return nn.functional.mse_loss(out.reshape(y.shape), y.float())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch) -> dict[str, float]:
        x, y = batch
        out = model(x)
        if self.task == "classification":
            loss = nn.functional.cross_entropy(out, y.long()).item()
            accuracy = (out.argmax(dim=1) == y.long()).float().mean().item()
            return {"loss": loss, "accuracy": accuracy}
        return {"loss": nn.functional.mse_loss(out.reshape(y.shape), y.float()).item()}
