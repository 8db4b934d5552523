"""The chaos run's plan: logistic regression, a few steps per round."""

from torch import nn

from meshfl.plans import TorchTrainingPlan


class ChaosPlan(TorchTrainingPlan):
    def init_model(self, features=4, classes=2):
        return nn.Linear(features, classes)
