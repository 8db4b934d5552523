"""The benchmark's plan: returns the received model plus a small delta (no real training)."""

import torch
from torch import nn

from meshfl.plans import TorchTrainingPlan


class DeltaPlan(TorchTrainingPlan):
    def init_model(self, params=100_000):
        sizes = [int(params * f) for f in (0.4, 0.3, 0.2)]
        sizes.append(params - sum(sizes))
        module = nn.Module()
        for i, n in enumerate(sizes):
            module.register_parameter(f"w{i}", nn.Parameter(torch.zeros(n)))
        return module

    def train(self, model, train, args, device):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        return {}

    def evaluate(self, model, batch):
        return {}
