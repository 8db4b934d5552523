"""Plans of tools/bench_hosted.py (own module: only these imports travel with them)."""

from torch import nn

from meshfl.plans import TorchTrainingPlan


class WidePlan(TorchTrainingPlan):
    """One linear layer of inputs x outputs (+ outputs) parameters: the model whose bytes move."""

    def init_model(self, inputs=1000, outputs=100):
        return nn.Linear(inputs, outputs)


class BlobPlan(TorchTrainingPlan):
    """Logistic regression on Gaussian blobs: the model the convergence race trains."""

    def init_model(self, features=8, classes=4):
        return nn.Linear(features, classes)
