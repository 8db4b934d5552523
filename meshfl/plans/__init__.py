"""Training plans: the researcher's PyTorch code that runs on the nodes.

A plan is a :class:`TorchTrainingPlan` subclass. Its source (the class plus the module-level
imports it needs) travels as text; a node runs it only if its operator approved that exact text
by SHA-256, unless the node is in development mode. Nothing is pickled.

The researcher overrides what differs from a plain supervised loop:

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
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import torch
from torch import nn

DEFAULT_TRAINING_ARGS: dict[str, Any] = {
    "epochs": 1,
    "steps": None,  # if set, overrides epochs: exactly this many optimizer steps
    "batch_size": 32,
    "lr": 1e-3,
    "device": "auto",  # "auto" (CUDA when the node has it and allows it), "cpu" or "cuda"
    "seed": 0,
    "test_fraction": 0.2,
    "fedprox_mu": 0.0,
}


class TorchTrainingPlan:
    """Base class of PyTorch training plans (see the module docstring)."""

    #: "classification" (integer labels, cross-entropy, accuracy) or "regression" (MSE).
    task = "classification"
    #: Module names or state-dict keys whose tensors never leave the node (personalised layers):
    #: ``("head",)`` keeps ``head.weight`` and ``head.bias`` local. See :func:`local_keys`.
    local_layers: tuple[str, ...] = ()

    def init_model(self, **model_args: Any) -> nn.Module:
        raise NotImplementedError("a training plan must define init_model()")

    def init_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=lr)

    def preprocess(self, x: torch.Tensor, y: torch.Tensor | None):
        return x, y

    def split(self, x: torch.Tensor, y: torch.Tensor | None, test_fraction: float, seed: int):
        n = x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = int(round(n * test_fraction)) if n > 1 else 0
        test, train = order[:n_test], order[n_test:]
        pick = lambda idx: (x[idx], y[idx] if y is not None else None)  # noqa: E731
        return pick(train), pick(test)

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


def local_keys(plan: TorchTrainingPlan | type, keys) -> set[str]:
    """The state-dict ``keys`` the plan's ``local_layers`` keep on the node: a key is local if it
    is one of them or lies inside one (``head`` covers ``head.weight``, ``head.0.bias``, ...).
    An entry that covers no key is a mistake in the plan: ValueError naming it."""
    keys = list(keys)
    entries = plan.local_layers
    out: set[str] = set()
    for entry in (entries,) if isinstance(entries, str) else entries:
        found = {k for k in keys if k == entry or k.startswith(entry + ".")}
        if not found:
            raise ValueError(f"local_layers entry {entry!r} names no tensor of the model")
        out |= found
    return out


def plan_source(plan_cls: type) -> str:
    """The text that travels for ``plan_cls``: its module's top-level imports plus the class.

    Only imports and the class itself are taken, so a researcher's script can define its plan
    next to the code that runs the experiment.
    """
    module = inspect.getmodule(plan_cls)
    class_src = textwrap.dedent(inspect.getsource(plan_cls))
    imports: list[str] = []
    if module is not None:
        try:
            module_src = inspect.getsource(module)
        except (OSError, TypeError):
            module_src = ""
        for node in ast.parse(module_src).body if module_src else []:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                line = ast.get_source_segment(module_src, node)
                if line and line not in imports:
                    imports.append(line)
    if not any("TorchTrainingPlan" in line for line in imports):
        imports.append("from meshfl.plans import TorchTrainingPlan")
    return "\n".join(imports) + "\n\n\n" + class_src


def load_plan_class(source: str, class_name: str, module_name: str = "meshfl_plan") -> type:
    """Execute approved plan source in a fresh module and return the named plan class."""
    import sys
    import types

    module = types.ModuleType(module_name)
    module.__dict__["__file__"] = f"<plan {module_name}>"
    sys.modules[module_name] = module  # dataclasses and pickle-free introspection expect it
    exec(compile(source, f"<plan {module_name}>", "exec"), module.__dict__)
    cls = module.__dict__.get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, TorchTrainingPlan)):
        raise TypeError(f"plan source defines no TorchTrainingPlan subclass named {class_name!r}")
    return cls


__all__ = ["DEFAULT_TRAINING_ARGS", "TorchTrainingPlan", "load_plan_class", "local_keys", "plan_source"]
