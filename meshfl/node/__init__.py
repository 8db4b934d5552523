"""The node daemon and what a data site's operator manages: datasets, approved plans.

``Node`` loads on first use, so the light modules here (the sandbox, which the training worker
imports before anything else) do not pull in the whole daemon.
"""


def __getattr__(name: str):
    if name == "Node":
        from ._node import Node

        return Node
    raise AttributeError(f"module 'meshfl.node' has no attribute {name!r}")


__all__ = ["Node"]
