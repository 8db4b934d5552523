"""Training plans used by the integration tests (own module: only these imports travel).

Each plan stands alone: a plan's source is its class plus its module's imports, nothing else.
"""

import fcntl
import os
import threading

import torch
from torch import nn

from meshfl.plans import TorchTrainingPlan


class TinyPlan(TorchTrainingPlan):
    """Logistic regression on whatever tabular dataset the node has."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)


class AddOnePlan(TorchTrainingPlan):
    """No training: every parameter += 1, so FedAvg of any nodes is exactly global + 1."""

    def init_model(self, features=4, classes=2, width=1):
        return nn.Sequential(nn.Linear(features, width), nn.Linear(width, classes))

    def train(self, model, train, args, device):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"steps": 0}


class RaisingPlan(TorchTrainingPlan):
    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        raise ValueError("plan bug at step 3")


class HangingPlan(TorchTrainingPlan):
    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        threading.Event().wait()  # hangs until the node kills its worker at the task's time limit


class DyingPlan(TorchTrainingPlan):
    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        os._exit(3)


class GatedPlan(TorchTrainingPlan):
    """Waits at a gate, then adds samples / 100 to every parameter: FedAvg over any set of nodes
    is global + sum(n_i**2) / sum(n_i) / 100. The gate is the file ``args["gate"]``, which the test
    holds under an exclusive lock: the plan blocks on a shared lock until the test releases it (or
    exits, which releases it too); the task's time limit bounds the wait."""

    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)

    def train(self, model, train, args, device):
        with open(args["gate"], "rb") as gate:
            fcntl.flock(gate, fcntl.LOCK_SH)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(train[0].shape[0] / 100)
        return {"steps": 0}


class SgdPlan(TorchTrainingPlan):
    """Softmax regression trained by plain SGD: the steps SCAFFOLD's correction assumes."""

    def init_model(self, features=4, classes=3):
        return nn.Linear(features, classes)

    def init_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)


class PersonalPlan(TorchTrainingPlan):
    """FedPer + FedBN: ``norm`` and ``head`` stay on each node. No training: every parameter += 1,
    so each node's own layers count its rounds and the shared body is exactly global + 1."""

    local_layers = ("norm", "head")

    def init_model(self, features=4, classes=2):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = nn.Linear(features, 3)
                self.norm = nn.BatchNorm1d(3)
                self.head = nn.Linear(3, classes)

            def forward(self, x):
                return self.head(self.norm(self.body(x)))

        return Net()

    def train(self, model, train, args, device):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        return {"steps": 0}


class SGDLinearPlan(TorchTrainingPlan):
    """Logistic regression trained by plain SGD: sensitive to feature scales, as the test wants."""

    def init_model(self, features=30, classes=2):
        return nn.Linear(features, classes)

    def init_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr)
