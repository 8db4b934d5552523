"""The node daemon and what a data site's operator manages: datasets, approved plans."""

from ._node import Node

__all__ = ["Node"]
