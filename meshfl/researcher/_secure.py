"""The researcher's side of one secure-aggregation round: set-up beside training, unmasking after.

:class:`SecureRound` talks to the nodes (request/reply through the Researcher) and keeps what the
researcher may know: the round keys, who took part at each step, the masked sum. The
cryptography is in :mod:`meshfl.secagg`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import as_completed
from typing import Mapping

import numpy as np
import torch

from ..crypto import DEFAULT_PRG
from ..errors import MeshflError
from ..overlay import OverlayRejected, bundle, unbundle
from ..secagg import (
    DEFAULT_CLIP,
    Encoding,
    MaskedSum,
    SecAggError,
    check_threshold,
    decode_sum,
    enough_shares,
    frac_bits_for,
    unmask,
)
from ..wire import Message

log = logging.getLogger("meshfl.researcher")

SETUP_TIMEOUT_S = 30.0


def secagg_options(value: bool | Mapping) -> dict | None:
    """``Experiment(secagg=...)``: False, True (defaults) or ``{"threshold": t, "clip": c}``.

    ``threshold``: shares needed to rebuild a node's secret (default: a majority of the selected
    nodes); ``clip``: the largest parameter change a node may send per round (default 8).
    """
    if value is False or value is None:
        return None
    options = {"threshold": None, "clip": DEFAULT_CLIP}
    if value is not True:
        if not isinstance(value, Mapping) or set(value) - set(options):
            raise MeshflError(f"secagg is True, False or a dict of {sorted(options)}", code="bad_argument")
        options.update(value)
    clip = options["clip"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < 2**20:
        raise MeshflError("secagg clip must be a number in (0, 2**20)", code="bad_argument")
    return options


class SecureRound:
    """One round of secure aggregation among ``nodes`` (peer ids), summing vectors of ``encoding``
    (anything with ``nbytes`` and ``boundary``: a model update's :class:`~meshfl.secagg.Encoding`,
    or analytics' statistics), driven by an experiment or an analysis."""

    def __init__(self, researcher, session: str, nodes: list[str], encoding, options: dict) -> None:
        self.researcher = researcher
        self.session = session
        self.nodes = sorted(nodes)
        self.threshold = options.get("threshold") or len(self.nodes) // 2 + 1
        self.encoding = encoding
        self.prg = DEFAULT_PRG
        self.keys: dict[str, bytes] = {}
        self.public_keys: dict[str, str] = {}  # as the nodes sent them (hex), passed on in secagg.keys
        self.members: list[str] = []
        self.sum = MaskedSum(self.encoding)
        self.seconds: dict[str, float] = {}  # time spent in set-up and unmasking, for the history
        self._setup: dict = {}  # node -> future of its set-up answer
        self._started = 0.0

    @staticmethod
    def _answers(futures: dict, failed: dict) -> dict[str, Message]:
        replies = {}
        for node, fut in futures.items():
            try:
                replies[node] = fut.result()
            except MeshflError as exc:
                failed[node] = exc.to_wire()
        return replies

    def start(self) -> None:
        """Ask every node to open the round: make its round secrets, seal their shares to the other
        participants and answer with its round key and those shares. Does not wait: the
        train requests go out next, and :meth:`exchange_keys` collects the answers."""
        self._started = time.monotonic()
        try:
            check_threshold(self.threshold, len(self.nodes))
        except SecAggError as exc:
            raise SecAggError(f"secure aggregation over {len(self.nodes)} nodes: {exc.message}", code=exc.code) from None
        fields = {"session": self.session, "participants": self.nodes, "threshold": self.threshold, "prg": self.prg}
        self._setup = {n: self.researcher.request(n, Message("secagg.setup", fields), SETUP_TIMEOUT_S)
                       for n in self.nodes}

    def exchange_keys(self, failed: dict) -> list[str]:
        """Wait for the set-up answers; the nodes that answered are the round's members, and every
        participant gets their round keys (an empty list if too few answered: the round is off)
        with the members' shares sealed to it, which we pass on unread."""
        shares: dict[str, list[Message]] = {n: [] for n in self.nodes}  # recipient -> sealed shares
        for node, reply in self._answers(self._setup, failed).items():
            try:
                key = bytes.fromhex(reply.fields["public"])
                sealed = unbundle(reply.fields.get("shares", []), reply.tensors, "share")
            except (ValueError, OverlayRejected):
                key, sealed = b"", []
            if len(key) != 32 or any(m.fields["src"] != node or m.fields["dst"] not in shares for m in sealed):
                failed[node] = {"code": "secagg_protocol", "message": "a set-up answer needs a 32-byte round key "
                                "and shares from its sender to participants"}
                continue
            self.keys[node] = key
            self.public_keys[node] = reply.fields["public"]
            for m in sealed:
                shares[m.fields["dst"]].append(m)
        enough = len(self.keys) >= self.threshold
        for node in self.nodes:
            headers, tensors = bundle(shares[node] if enough else [], "share")
            fields = {"session": self.session, "keys": self.public_keys if enough else {}, "shares": headers}
            try:
                self.researcher.send(node, Message("secagg.keys", fields, tensors))
            except MeshflError as exc:
                failed.setdefault(node, exc.to_wire())
        self._need(len(self.keys), "completed the key exchange")
        self.members = sorted(self.keys)
        self.seconds["setup"] = round(time.monotonic() - self._started, 4)
        return self.members

    def finish(self, survivors: list[str], failed: dict, acks: Mapping[str, str]) -> np.ndarray:
        """Unmask the sum of the survivors' vectors (its bytes). Each request also acknowledges
        the node's result (``acks``: survivor -> task id)."""
        started = time.monotonic()
        survivors = sorted(survivors)
        dropped = [n for n in self.members if n not in survivors]
        self._need(len(survivors), "sent masked updates", unmasked=False)
        fields = {"session": self.session, "survivors": survivors, "dropped": dropped}
        futures = {self.researcher.request(n, Message("secagg.unmask", {**fields, "ack": acks[n]}),
                                           SETUP_TIMEOUT_S): n
                   for n in survivors}
        reveals: list[dict] = []
        for fut in as_completed(futures):  # t shares of each secret suffice: the slowest need not answer
            try:
                reply = fut.result()
            except MeshflError as exc:
                failed[futures[fut]] = exc.to_wire()
                continue
            reveals.append({"b": reply.fields["b"], "s": reply.fields["s"]})
            if enough_shares(reveals, survivors, dropped, self.threshold):
                break
        self._need(len(reveals), "answered the unmasking request", unmasked=False)
        unmask(self.sum.total, self.encoding.boundary, self.session, self.keys, survivors, dropped,
               reveals, self.threshold, self.prg)
        if dropped:
            log.info("secure round %s: recovered the masks of %d dropped node(s)", self.session, len(dropped))
        self.seconds["unmask"] = round(time.monotonic() - started, 4)
        return self.sum.total

    def _need(self, count: int, what: str, unmasked: bool = True) -> None:
        if count < self.threshold:
            note = "" if unmasked else "; nothing was unmasked"
            raise SecAggError(
                f"secure aggregation needs {self.threshold} nodes, only {count} {what}{note}",
                code="secagg_not_enough",
            )


class SecureTrainingRound(SecureRound):
    """A secure round of training: the members' sample-weighted model change, in fixed point."""

    def __init__(self, researcher, session: str, nodes: list[str], global_state: Mapping[str, torch.Tensor],
                 parameters: list[str], weight_scale: int, options: dict) -> None:
        self.parameters = sorted(parameters)
        self.weight_scale = int(weight_scale)
        clip = float(options["clip"])
        encoding = Encoding.for_state(global_state, self.parameters, frac_bits_for(len(nodes), clip), clip)
        super().__init__(researcher, session, nodes, encoding, options)

    def train_fields(self) -> dict:
        """The ``secagg`` field of this round's ``train`` requests (the keys follow separately)."""
        return {"session": self.session, "parameters": self.parameters, "weight_scale": self.weight_scale,
                "clip": self.encoding.clip, "frac_bits": self.encoding.frac_bits}

    def finish(self, survivors: list[str], failed: dict,
               acks: Mapping[str, str]) -> tuple[dict[str, np.ndarray], int, np.ndarray]:
        """(mean delta per tensor, samples, mean metric slots) of the survivors."""
        return decode_sum(super().finish(survivors, failed, acks), self.encoding, self.weight_scale)
