"""Training plans: the researcher's code that runs on the nodes.

A plan is a :class:`TorchTrainingPlan` or :class:`SKLearnTrainingPlan` subclass. Its source (the
class plus the module-level imports it needs) travels as text; a node runs it only if its
operator approved that exact text by SHA-256, unless the node is in development mode. Nothing is
pickled.

A torch plan overrides what differs from a plain supervised loop:

* ``init_model(**model_args)`` — required: the ``torch.nn.Module``;
* ``init_optimizer(model, lr)`` — default Adam;
* ``training_step(model, batch)`` — default cross-entropy (classification) or MSE;
* ``split(x, y, test_fraction, seed)`` — default random train/test split of the node's data;
* ``preprocess(x, y)`` — default identity; runs on the node before the split;
* ``evaluate(model, batch)`` — default loss (+ accuracy for classification);
* ``train(model, train_data, args, device) -> metrics`` — optional: replaces the whole default
  loop (epochs or ``steps`` of mini-batches, with the FedProx term when ``fedprox_mu`` > 0).

``local_layers`` names modules (or state-dict keys) that stay on each node: personalised layers
(FedPer's head, FedBN's normalisation layers), kept per experiment in the node's store, loaded
back each round, never sent nor aggregated.

A scikit-learn plan defines ``init_estimator(**model_args)`` and its ``classes``; see
:mod:`meshfl.plans._sklearn`.
"""

from ._base import DEFAULT_TRAINING_ARGS, TrainingPlan, load_plan_class, local_keys, plan_source
from ._sklearn import SKLearnModel, SKLearnTrainingPlan
from ._torch import TorchTrainingPlan

__all__ = ["DEFAULT_TRAINING_ARGS", "SKLearnModel", "SKLearnTrainingPlan", "TorchTrainingPlan", "TrainingPlan",
           "load_plan_class", "local_keys", "plan_source"]
