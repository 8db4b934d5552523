"""What every training plan shares, whatever library its model comes from: the base class, the
default training arguments, and how a plan's source travels and is loaded on a node."""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any

import torch

from .._extras import missing_extra

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


class TrainingPlan:
    """Base of every plan: the node's data comes in as tensors ``(x, y)``, the plan may
    preprocess it, and it is split into train and test the same way for every kind of model."""

    #: "classification" (integer labels) or "regression".
    task = "classification"
    #: Module names or state-dict keys whose tensors never leave the node (personalised layers):
    #: ``("head",)`` keeps ``head.weight`` and ``head.bias`` local. See :func:`local_keys`.
    local_layers: tuple[str, ...] = ()
    #: Whether the plan's model can train on a GPU (``device`` "auto" picks CUDA when present).
    uses_cuda = True

    def init_model(self, **model_args: Any) -> torch.nn.Module:
        raise NotImplementedError("a training plan must define init_model()")

    def preprocess(self, x: torch.Tensor, y: torch.Tensor | None):
        return x, y

    def split(self, x: torch.Tensor, y: torch.Tensor | None, test_fraction: float, seed: int):
        n = x.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_test = int(round(n * test_fraction)) if n > 1 else 0
        test, train = order[:n_test], order[n_test:]
        pick = lambda idx: (x[idx], y[idx] if y is not None else None)  # noqa: E731
        return pick(train), pick(test)


def local_keys(plan: TrainingPlan | type, keys) -> set[str]:
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
    for base in plan_cls.__mro__:  # the meshfl base class, imported under its public name
        if base.__module__.startswith("meshfl.plans") and not any(base.__name__ in line for line in imports):
            if base is not TrainingPlan:
                imports.append(f"from meshfl.plans import {base.__name__}")
            break
    return "\n".join(imports) + "\n\n\n" + class_src


def load_plan_class(source: str, class_name: str, module_name: str = "meshfl_plan") -> type:
    """Execute approved plan source in a fresh module and return the named plan class."""
    import sys
    import types

    module = types.ModuleType(module_name)
    module.__dict__["__file__"] = f"<plan {module_name}>"
    sys.modules[module_name] = module  # dataclasses and pickle-free introspection expect it
    try:
        exec(compile(source, f"<plan {module_name}>", "exec"), module.__dict__)
    except ModuleNotFoundError as exc:  # a plan for an extra this side lacks: say which to install
        raise missing_extra(exc) from None
    cls = module.__dict__.get(class_name)
    if not (isinstance(cls, type) and issubclass(cls, TrainingPlan)):
        raise TypeError(f"plan source defines no training plan class named {class_name!r}")
    return cls


