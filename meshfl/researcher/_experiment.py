"""Experiment: rounds of federated training, aggregated as results stream in.

Per round: pick nodes (all online nodes holding a dataset with the tags, optionally a random
fraction), send each the global model and the plan, and take results as they arrive. A small
result comes inline and goes straight into the aggregator; a large one is pulled in chunks, a
window at a time, into one reusable receive buffer, so the researcher holds about the global
model, the accumulator and ``max_streams`` receive buffers whatever the number of nodes. The
round ends when every node answered or ``round_timeout`` passed; it counts if at least
``min_nodes`` contributed, and the history names the nodes that failed or dropped.

After each round the global model, the aggregator's state and the history are checkpointed in
the researcher's home (pack files + LMDB), so :meth:`Experiment.resume` continues after a crash.
Each round's history entry is its own LMDB record (table ``rounds``), written once, so what a
checkpoint writes does not grow with the rounds.

A round sends the model but for the plan's ``local_layers`` (personalised layers: each node keeps
its own), plus what the aggregator sends beside it (SCAFFOLD's control variate); updates bring
the same names back.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..aggregate import Aggregator, FedAvg, make_aggregator
from ..errors import ConfigError, MeshflError
from ..plans import DEFAULT_TRAINING_ARGS, SKLearnTrainingPlan, TrainingPlan, load_plan_class, local_keys, plan_source
from ..privacy import DPSpec
from ..protocol import WINDOW, chunk_plan
from ..secagg import add_mean, secure_metrics
from ..store import Store, Table
from ..store._codec import seq_key
from ..store.blobs import BlobStore
from ..wire import DTYPES, Message
from .._progress import Progress
from ._history import History, TensorBoardLog
from ._researcher import Researcher
from ._secure import SecureTrainingRound, secagg_options

log = logging.getLogger("meshfl.researcher")

STALL_S = 5.0  # a stream silent this long is asked again for what is missing
EXPERIMENTS_TABLE = "experiments"  # one record per experiment: its settings and last checkpoint
ROUNDS_TABLE = "rounds"  # one history entry per (experiment, round)


class RoundFailed(MeshflError):
    code = "round_failed"


class PrivacyBudgetExhausted(RoundFailed):
    """A round could not go on because nodes' datasets have no privacy budget left for it;
    ``details["datasets"]`` names them, by node."""

    code = "privacy_budget_exhausted"


@dataclass
class _Stream:
    """One node's large result, pulled chunk by chunk into a receive buffer."""

    task_id: str
    node: str
    samples: int
    fields: dict
    chunks: list
    buffer: dict[str, torch.Tensor]
    received: set = field(default_factory=set)
    requested: int = 0
    last_activity: float = field(default_factory=time.monotonic)

    def complete(self) -> bool:
        return len(self.received) == len(self.chunks)


def _check_sklearn_options(exp: "Experiment") -> None:
    """What a scikit-learn plan cannot do: its estimators compute no per-sample gradients
    (DP-SGD) and no gradients at all (SCAFFOLD's corrections). Client-level DP works: the node
    clips and noises the update, whatever trained it."""
    if exp.dp is not None and exp.dp["mode"] == "sample":
        raise ConfigError("DP-SGD needs a torch plan; a scikit-learn plan can use client-level DP "
                          "(dp=ClientDP(...))", code="dp_incompatible")
    if type(exp.aggregator).round_tensors is not Aggregator.round_tensors:
        raise ConfigError(f"{type(exp.aggregator).__name__} corrects gradients, which a scikit-learn "
                          f"estimator does not expose: use FedAvg or the FedOpt family",
                          code="bad_plan")


class Experiment:
    """Federated training of ``plan`` over the nodes whose datasets carry ``tags``."""

    def __init__(
        self,
        researcher: Researcher,
        plan: type[TrainingPlan] | str,
        tags: list[str],
        rounds: int,
        model_args: dict | None = None,
        training_args: dict | None = None,
        aggregator: Aggregator | None = None,
        min_nodes: int = 1,
        round_timeout: float = 600.0,
        *,
        plan_class: str | None = None,
        fraction: float = 1.0,
        nodes: list[str] | None = None,
        max_streams: int = 1,
        evaluate: Callable[[torch.nn.Module], dict] | None = None,
        experiment_id: str | None = None,
        progress: bool | None = None,
        on_round: Callable[[dict], None] | None = None,
        secagg: bool | dict = False,
        dp=None,
        tensorboard: str | os.PathLike | None = None,
        preprocess: list | None = None,
    ) -> None:
        self.researcher = researcher
        if isinstance(plan, str):
            if not plan_class:
                raise MeshflError("give plan_class= with a plan given as source text", code="bad_argument")
            self.plan_source, self.plan_class = plan, plan_class
        else:
            self.plan_source, self.plan_class = plan_source(plan), plan.__name__
        self.tags, self.rounds = list(tags), int(rounds)
        self.model_args = dict(model_args or {})
        self.training_args = {**DEFAULT_TRAINING_ARGS, **(training_args or {})}
        self.aggregator = aggregator or FedAvg()
        self.secagg = secagg_options(secagg)
        self.dp = DPSpec.from_wire(dp).to_wire() if dp is not None else None
        # Federated preprocessing: steps to fit before round 1, or their fitted records (a resume).
        steps = list(preprocess or [])
        self.preprocess = steps if all(isinstance(p, dict) for p in steps) else None
        self._preprocess_steps = None if self.preprocess is not None else steps
        if self.dp is not None and type(self.aggregator).round_tensors is not Aggregator.round_tensors:
            raise ConfigError(f"{type(self.aggregator).__name__} sends the nodes tensors of its own (SCAFFOLD's "
                              f"control variates), which differential privacy does not cover: use FedAvg, FedProx "
                              f"or the FedOpt family with dp=", code="dp_incompatible")
        if self.secagg and not self.aggregator.streaming:
            raise ConfigError(f"{type(self.aggregator).__name__} needs every node's own update, and secure "
                              f"aggregation shows the researcher only their sum: use a streaming aggregator "
                              f"(FedAvg, FedProx, the FedOpt family, Scaffold) or secagg=False",
                              code="secagg_incompatible")
        self.min_nodes, self.round_timeout = int(min_nodes), float(round_timeout)
        self.fraction, self.node_filter = float(fraction), list(nodes) if nodes else None
        self.max_streams = max(1, int(max_streams))
        self.evaluate = evaluate
        self.progress = progress
        self.on_round = on_round
        self.id = experiment_id or f"exp-{os.urandom(4).hex()}"
        # In this run's task and round ids: two researchers who chose one experiment id (or one
        # researcher running it again) never meet the same task id on a node they share.
        self._run_tag = os.urandom(3).hex()
        self.history = History(experiment=self.id)
        if tensorboard is not None:
            TensorBoardLog.check()  # a missing extra fails now, not after the first round
        self._tensorboard = None if tensorboard is None else TensorBoardLog(os.path.join(tensorboard, self.id))
        self.round = 0  # rounds completed
        self.attempt = 0  # bumped on every resume: task ids never repeat across attempts
        self._saved: dict = {}  # where the last checkpoint is: kept in every record written after it
        self._created = time.time()
        home = researcher.home
        self._store = home.store
        self._table: Table = home.store.table(EXPERIMENTS_TABLE)
        self._blobs = BlobStore(home.path / "blobs")
        self._audit = home.audit
        cls = load_plan_class(self.plan_source, self.plan_class, f"meshfl_plan_local_{self.id}")
        if issubclass(cls, SKLearnTrainingPlan):
            _check_sklearn_options(self)
        self.model: torch.nn.Module = cls().init_model(**self.model_args)
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        try:  # personalised layers: they stay on the nodes, so never travel nor aggregate
            self.local_layers = local_keys(cls, self.global_state)
        except ValueError as exc:
            raise ConfigError(f"plan {self.plan_class}: {exc}", code="bad_plan") from None
        self._buffers: list[dict[str, torch.Tensor]] = []
        self._holders: dict[str, int] = {}  # node id -> samples of its largest dataset with our tags (searched once)

    # ------------------------------------------------------------------ persistence
    def _record(self) -> dict:
        return {
            "id": self.id,
            "plan_source": self.plan_source,
            "plan_class": self.plan_class,
            "tags": self.tags,
            "rounds": self.rounds,
            "model_args": self.model_args,
            "training_args": self.training_args,
            "aggregator": self.aggregator.config(),
            "min_nodes": self.min_nodes,
            "round_timeout": self.round_timeout,
            "fraction": self.fraction,
            "nodes": self.node_filter,
            "max_streams": self.max_streams,
            "secagg": self.secagg,
            "dp": self.dp,
            "preprocess": self.preprocess,
            "round": self.round,
            "attempt": self.attempt,
            "created": self._created,
            "updated": time.time(),
            **self._saved,
        }

    def _checkpoint(self) -> None:
        """Model and aggregator state first (new names), then the LMDB record that points at them."""
        name = f"{self.id}.r{self.round}"
        self._blobs.write(f"{name}.model", self.global_state)
        agg = self.aggregator.state_dict()
        self._blobs.write(f"{name}.agg", agg.get("tensors", {}))
        self._saved = {"checkpoint": name, "aggregator_meta": agg.get("meta", {})}
        record = self._record()

        def commit(tx) -> None:  # the round's history entry and the record that counts it: one commit
            tx.put(ROUNDS_TABLE, _round_key(self.id, self.round), self.history[-1])
            tx.put(EXPERIMENTS_TABLE, self.id, record)

        self._store.atomic(commit)
        previous = f"{self.id}.r{self.round - 1}"
        self._blobs.delete(f"{previous}.model")
        self._blobs.delete(f"{previous}.agg")

    @classmethod
    def resume(
        cls, researcher: Researcher, experiment_id: str, *, evaluate=None, progress: bool | None = None, on_round=None,
        tensorboard: str | os.PathLike | None = None, rounds: int | None = None,
    ) -> "Experiment":
        """Rebuild an experiment from its last checkpoint; :meth:`run` then finishes it, or runs up
        to ``rounds`` in all (to train longer). The callbacks and the TensorBoard folder are not
        stored: give them again."""
        record = researcher.home.store.table(EXPERIMENTS_TABLE).get(experiment_id)
        if record is None:
            raise MeshflError(f"no experiment {experiment_id!r} in {researcher.home.path}", code="unknown_experiment")
        exp = cls(
            researcher,
            record["plan_source"],
            record["tags"],
            rounds or record["rounds"],
            record["model_args"],
            record["training_args"],
            make_aggregator(record["aggregator"]),
            record["min_nodes"],
            record["round_timeout"],
            plan_class=record["plan_class"],
            fraction=record["fraction"],
            nodes=record["nodes"],
            max_streams=record["max_streams"],
            evaluate=evaluate,
            experiment_id=experiment_id,
            progress=progress,
            on_round=on_round,
            secagg=record.get("secagg") or False,
            dp=record.get("dp"),
            preprocess=record.get("preprocess"),
            tensorboard=tensorboard,
        )
        exp.round, exp.attempt = record["round"], record["attempt"] + 1
        exp._created = record.get("created", exp._created)
        exp.history = cls.saved_history(researcher.home.store, experiment_id)
        if "history" in record:  # a record written before the rounds table: move its history there
            def move(tx) -> None:
                for rnd, entry in enumerate(exp.history, 1):
                    tx.put(ROUNDS_TABLE, _round_key(experiment_id, rnd), entry)

            exp._store.atomic(move)
        if record.get("checkpoint"):
            exp._saved = {"checkpoint": record["checkpoint"], "aggregator_meta": record.get("aggregator_meta", {})}
            state = exp._blobs.read(f"{record['checkpoint']}.model")
            exp.global_state = {k: v.clone() for k, v in state.items()}
            exp.model.load_state_dict(exp.global_state)
            agg_tensors = exp._blobs.read(f"{record['checkpoint']}.agg")
            exp.aggregator.load_state_dict({"meta": record.get("aggregator_meta", {}), "tensors": dict(agg_tensors)})
        log.info("resuming %s after round %d of %d", experiment_id, exp.round, exp.rounds)
        return exp

    @staticmethod
    def saved_history(store: Store, experiment_id: str) -> History:
        """The history of an experiment's last checkpoint in a researcher home's ``store`` (empty
        if it has none): what :meth:`resume` starts from, read without resuming."""
        def read(tx) -> list[dict]:
            record = tx.get(EXPERIMENTS_TABLE, experiment_id) or {"round": 0}
            if "history" in record:  # written before the rounds table: resume moves it there
                return record["history"]
            return [tx.get(ROUNDS_TABLE, _round_key(experiment_id, r)) for r in range(1, record["round"] + 1)]

        return History(store.read(read), experiment_id)

    # ------------------------------------------------------------------ running
    def run(self) -> History:
        """Run the remaining rounds; returns the history (a list, one dict per round)."""
        if self.preprocess is None:
            self.preprocess = self.fit_preprocessing()
        self._table.put(self.id, self._record())
        self._audit.append("experiment.started", experiment=self.id, rounds=self.rounds, attempt=self.attempt)
        bar = Progress(self.rounds, f"{self.id}", enabled=self.progress)
        bar.update(self.round)
        try:
            while self.round < self.rounds:
                entry = self._run_round(self.round + 1)
                self.round += 1
                self.history.append(entry)
                self._checkpoint()
                note = " ".join(f"{k}={v:.4f}" for k, v in entry.get("global", {}).items() if isinstance(v, float))
                if self._tensorboard is not None:
                    self._tensorboard.write(entry)
                if self.on_round is not None:
                    self.on_round(entry)
                bar.update(1, note)
        except MeshflError as exc:  # audited, so a reader of this home can tell failed from running
            self._audit.append("experiment.failed", experiment=self.id, round=self.round + 1, error=exc.code,
                               message=exc.message[:2000])
            raise
        finally:
            bar.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        self._audit.append("experiment.finished", experiment=self.id, rounds=self.round)
        return self.history

    def fit_preprocessing(self) -> list[dict]:
        """Fit the experiment's preprocessing steps by federated analytics over its nodes (under
        secure aggregation if the experiment uses it): their global statistics, which every node
        applies to its data. Runs once, before round 1; the checkpoint keeps the result."""
        if not self._preprocess_steps:
            return []
        from ..analytics import Analytics, preprocess

        secagg = {"threshold": self.secagg["threshold"]} if self.secagg else False
        analytics = Analytics(self.researcher, self.tags, secagg=secagg, nodes=self.node_filter,
                              min_nodes=self.min_nodes, timeout=self.round_timeout, purpose="preprocessing")
        fitted = preprocess.fit(self._preprocess_steps, analytics)
        self._audit.append("experiment.preprocessing", experiment=self.id, steps=[s["step"] for s in fitted])
        return fitted

    def cancel(self) -> dict[str, int]:
        """Ask every online node to drop this experiment's queued and running tasks."""
        out = {}
        for node in self.researcher.nodes():
            try:
                reply = self.researcher.peer.call(node, Message("task.cancel", {"experiment": self.id}), 10)
                out[node] = reply.fields["count"]
            except MeshflError as exc:
                if exc.code == "unknown_experiment":  # it never had a task of this experiment
                    out[node] = 0
                    continue
                log.warning("cancel on %s failed: %s", self.researcher.node_name(node), exc)
        self._audit.append("experiment.cancelled", experiment=self.id)
        return out

    def _select_nodes(self) -> list[str]:
        """Online nodes holding data with the tags; only nodes not seen before are searched."""
        online = self.researcher.nodes()
        unknown = [n for n in online if n not in self._holders]
        if unknown:
            found = self.researcher.search(self.tags, nodes=unknown)
            self._holders.update({n: max((int(d.get("samples") or 0) for d in datasets), default=0)
                                  for n, datasets in found.items()})
        nodes = sorted(n for n in online if self._holders.get(n))
        if self.node_filter is not None:
            nodes = [n for n in nodes if n in self.node_filter]
        if self.fraction < 1.0 and nodes:
            rng = random.Random(f"{self.id}:{self.round}")
            nodes = sorted(rng.sample(nodes, min(len(nodes), max(self.min_nodes, round(len(nodes) * self.fraction)))))
        return nodes

    def _run_round(self, rnd: int) -> dict:
        with _one_torch_thread():
            entry, metrics = self._train_round(rnd)
        entry["global"] = self.evaluate(self.model) if self.evaluate else metrics
        return entry

    def _train_round(self, rnd: int) -> tuple[dict, dict]:
        """One round up to the new global model: its history entry and the nodes' mean metrics."""
        started = time.monotonic()
        nodes = self._select_nodes()
        if len(nodes) < self.min_nodes:
            raise RoundFailed(f"round {rnd}: {len(nodes)} nodes hold data tagged {self.tags}, need {self.min_nodes}")
        # A fresh seed each round (shuffles, dropout), one split for the whole experiment: a node's
        # test samples are never trained on in another round.
        base = int(self.training_args.get("seed") or 0)
        args = {**self.training_args, "seed": base + rnd, "split_seed": base}
        args.update(self.aggregator.training_args())
        failed: dict[str, dict] = {}
        secure = None
        sent = self._begin_aggregation()  # the model's shared tensors and the aggregator's own
        round_id = f"{self.id}.{self._run_tag}.r{rnd}.a{self.attempt}"
        if self.secagg:
            try:  # the aggregator's tensors (SCAFFOLD's c) are no parameters: the wide 64-bit ring,
                # as their changes are not bounded by a parameter's clip
                secure = SecureTrainingRound(self.researcher, round_id, nodes, sent,
                                             self._parameters(), max(self._holders[n] for n in nodes), self.secagg)
                secure.start()
            except MeshflError as exc:
                raise RoundFailed(f"round {rnd}: {exc.message}", details=self._failure_details(failed, [])) from None
        tasks = {f"{round_id}.{n}": n for n in nodes}
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.researcher._route(tasks, inbox)
        if secure is None:
            sink, layout = self.aggregator, {k: (list(v.shape), v.dtype) for k, v in sent.items()}
        else:
            sink, layout = secure.sum, secure.sum.layout
        deadline = started + self.round_timeout
        deferred: dict[str, str] = {}  # secure results: acknowledged with the unmasking request
        try:
            fields = self._train_fields(rnd, args, secure.train_fields() if secure else None)
            send = lambda tid: self._send_task(tid, tasks[tid], fields, sent, inbox, deadline)  # noqa: E731
            for tid in tasks:
                send(tid)
            if secure is not None:  # the key exchange ran while the model travelled
                try:
                    secure.exchange_keys(failed)
                except MeshflError as exc:
                    raise RoundFailed(f"round {rnd}: {exc.message}", details=self._failure_details(failed, [])) from None
            contributed = self._collect(tasks, inbox, failed, deadline, sink, layout, send,
                                        deferred if secure else None)
        finally:
            self.researcher._route(tasks, None)
        name = self.researcher.node_name
        selected = secure.nodes if secure else nodes
        dropped = [name(n) for n in selected if n not in contributed and n not in failed]
        needed = max(self.min_nodes, secure.threshold if secure else 0)
        if len(contributed) < needed:
            for node, tid in deferred.items():  # nothing will be unmasked: acknowledge them now
                self.researcher.send(node, Message("result.ack", {"task_id": tid}))
            note = " (secure aggregation threshold; nothing was unmasked)" if secure else ""
            spent = {name(n): e for n, e in failed.items() if e.get("code") == "privacy_budget_exhausted"}
            if spent:
                raise PrivacyBudgetExhausted(
                    f"round {rnd}: the privacy budget is spent on {len(spent)} node(s): "
                    + "; ".join(f"{n}: {e.get('message')}" for n, e in spent.items())
                    + f" ({len(contributed)} of {len(selected)} nodes contributed, {needed} needed)",
                    details={**self._failure_details(failed, dropped),
                             "datasets": {n: (e.get("details") or {}).get("dataset") for n, e in spent.items()}},
                )
            raise RoundFailed(
                f"round {rnd}: {len(contributed)} of {len(selected)} nodes contributed, {needed} needed{note}; "
                f"failed: [{_failures(failed, name)}]; dropped: {dropped}",
                details=self._failure_details(failed, dropped),
            )
        updates = sink.count  # one per contributing node, or something was added twice
        try:
            if secure is None:
                new_state = self.aggregator.finish()
                samples = sum(info["samples"] for info in contributed.values())
                metrics = _weighted_metrics(contributed)
            else:
                new_state, samples, metrics = self._unmask(secure, sent, contributed, failed, deferred)
        except MeshflError as exc:  # e.g. Krum with too few updates, a secure round short of shares
            details = {**self._failure_details(failed, dropped), "cause": exc.code}
            raise RoundFailed(f"round {rnd}: {exc.message}", details=details) from None
        # the personalised layers stay as they were: only their owners, the nodes, train them
        self.global_state = {k: new_state.get(k, v) for k, v in self.global_state.items()}
        self.model.load_state_dict(self.global_state)
        entry: dict[str, Any] = {
            "round": rnd,
            "nodes": {name(n): info for n, info in contributed.items()},
            "failed": {name(n): e for n, e in failed.items()},
            "dropped": dropped,
            "samples": samples,
            "updates": updates,
            "seconds": round(time.monotonic() - started, 4),
        }
        if secure is not None:
            entry["secagg"] = {"threshold": secure.threshold, "members": [name(n) for n in secure.members],
                               "seconds": secure.seconds}
        if self.aggregator.summary():
            entry["aggregator"] = self.aggregator.summary()
        for n, e in failed.items():
            log.warning("round %d: %s failed: [%s] %s", rnd, name(n), e.get("code"), e.get("message"))
        return entry, metrics

    def _failure_details(self, failed: dict, dropped: list) -> dict:
        return {"failed": {self.researcher.node_name(n): e for n, e in failed.items()}, "dropped": dropped}

    def _parameters(self) -> list[str]:
        """The model's trainable tensors that travel (a server optimizer steps only these)."""
        return [n for n, _ in self.model.named_parameters() if n not in self.local_layers]

    def _begin_aggregation(self) -> dict[str, torch.Tensor]:
        """Start the aggregator's round on the model's shared tensors; returns what each node
        gets: those, and the aggregator's own round tensors (SCAFFOLD's control variate)."""
        shared = {k: v for k, v in self.global_state.items() if k not in self.local_layers}
        holders = [n for n, samples in self._holders.items() if samples
                   and (self.node_filter is None or n in self.node_filter)]
        self.aggregator.begin(shared, self._parameters(), population=len(holders) or None)
        return {**shared, **self.aggregator.round_tensors()}

    def _unmask(self, secure: SecureTrainingRound, sent: dict, contributed: dict, failed: dict,
                acks: dict) -> tuple[dict, int, dict]:
        """The survivors' sum, unmasked, as the next model: FedAvg of their updates, then the server step."""
        deltas, samples, slots = secure.finish(sorted(contributed), failed, acks)
        mean = add_mean(sent, deltas)
        # The mean is one update holding every sample and standing for every survivor: FedAvg
        # returns it, server optimizers step on it, SCAFFOLD counts the survivors.
        self._begin_aggregation()
        self.aggregator.add(mean, float(samples), "secure-sum", count=len(contributed))
        names = {n: info["metric_names"] for n, info in contributed.items()}
        return self.aggregator.finish(), samples, secure_metrics(names, slots)

    def _train_fields(self, rnd: int, args: dict, secagg: dict | None) -> dict:
        fields = {
            "experiment": self.id,
            "round": rnd,
            "plan_source": self.plan_source,
            "plan_class": self.plan_class,
            "dataset_tags": self.tags,
            "training_args": args,
            "model_args": self.model_args,
        }
        if secagg is not None:
            fields["secagg"] = secagg
        if self.dp is not None:
            fields["dp"] = self.dp
        if self.preprocess:
            fields["preprocess"] = self.preprocess
        return fields

    def _send_task(self, tid: str, node: str, fields: dict, sent: dict, inbox, deadline: float) -> None:
        """Send a node its task with ``sent`` (the tensors of the round); again after a reconnect:
        a node answers a repeated task id without running it twice. The answer (``train.accepted``
        or an error) lands in the round's inbox as ``("answer", task id, future)``, so no slow node
        holds up the others."""
        timeout = max(1.0, deadline - time.monotonic())
        fut = self.researcher.request(node, Message("train", {**fields, "task_id": tid}, sent), timeout)
        fut.add_done_callback(lambda f: inbox.put(("answer", tid, f)))

    def _collect(self, tasks: dict[str, str], inbox, failed: dict, deadline: float, sink, layout: dict,
                 send: Callable[[str], None], deferred: dict | None = None) -> dict[str, dict]:
        """Take results as they arrive into ``sink`` (the aggregator, or the masked sum); a large
        one must match ``layout`` ({name: (shape, dtype)}) and is pulled chunk by chunk. Each is
        acknowledged once taken, except into ``deferred`` ({node: task id}, secure rounds): those
        ride on the unmasking request, one message and one node commit less per node and round.
        A node that reconnects before its task was accepted gets it again (``send``): the request
        may have been lost with its old connection."""
        waiting = dict(tasks)  # task id -> node, until its train.done
        accepted: set[str] = set()
        queued: list[_Stream] = []
        active: dict[str, _Stream] = {}
        contributed: dict[str, dict] = {}
        done_ids: set[str] = set()
        while waiting or queued or active:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = inbox.get(timeout=min(left, 1.0))
            except queue.Empty:
                msg = None
            if isinstance(msg, tuple) and msg[0] == "link":  # a node (re)connected
                for tid, node in list(waiting.items()):
                    if node == msg[1] and tid not in accepted:
                        log.info("%s reconnected before accepting its task: sending it again",
                                 self.researcher.node_name(node))
                        send(tid)
            elif isinstance(msg, tuple):  # a node's answer to its train request
                _, tid, fut = msg
                error = fut.exception()
                if error is None:
                    accepted.add(tid)
                elif tid in waiting and tid not in accepted:  # refused or unreachable: no result will come
                    failed.setdefault(waiting.pop(tid), error.to_wire() if isinstance(error, MeshflError) else {
                        "code": "internal", "message": str(error)})
            elif msg is not None and msg.type == "train.done":
                tid = msg.fields["task_id"]
                node = waiting.pop(tid, None)
                if node is None:  # a re-sent result we already have: acknowledge again, never re-add
                    if tid in done_ids:
                        self.researcher.send(msg.sender, Message("result.ack", {"task_id": tid}))
                    continue
                f = msg.fields
                if not f["ok"]:  # (a node that failed the secure set-up keeps that first error)
                    failed.setdefault(node, f.get("error", {"code": "failed", "message": "no detail"}))
                    self._ack(node, tid, done_ids)
                elif f.get("inline"):
                    self._take(sink, msg.tensors, f, node, contributed, failed)
                    self._ack(node, tid, done_ids, deferred if node in contributed else None)
                elif not self._matches(f, layout):
                    failed[node] = {"code": "bad_update", "message": "the result has another layout than the model"}
                    self._ack(node, tid, done_ids)
                else:
                    queued.append(self._new_stream(tid, node, f))
            elif msg is not None and msg.type == "result.chunk":
                stream = active.get(msg.fields["task_id"])
                if stream is not None:
                    self._store_chunk(stream, msg)
                    if stream.complete():
                        del active[stream.task_id]
                        self._take(sink, stream.buffer, stream.fields, stream.node, contributed, failed)
                        self._buffers.append(stream.buffer)
                        self._ack(stream.node, stream.task_id, done_ids,
                                  deferred if stream.node in contributed else None)
            while queued and len(active) < self.max_streams:
                stream = queued.pop(0)
                stream.buffer = self._buffer_for(stream.fields["layout"])
                active[stream.task_id] = stream
                self._pull(stream)
            now = time.monotonic()
            for stream in active.values():
                if now - stream.last_activity > STALL_S:
                    self._pull(stream, again=True)
            self._forget_offline(waiting, queued, active)
        for stream in active.values():
            self._buffers.append(stream.buffer)
        return contributed

    def _take(self, sink, tensors, fields: dict, node: str, contributed: dict, failed: dict) -> None:
        """Fold one result into the sink; a result the sink rejects fails its node, not the round."""
        try:
            sink.add(tensors, float(fields.get("samples", 0)), node)
        except MeshflError as exc:
            failed[node] = exc.to_wire()
            return
        contributed[node] = _info(fields)

    def _forget_offline(self, waiting: dict, queued: list, active: dict) -> None:
        """Stop waiting for nodes whose link is gone (silent for ``dead_after``): they dropped out."""
        online = set(self.researcher.nodes())
        for tid, node in list(waiting.items()):
            if node not in online:
                log.warning("%s went offline during the round", self.researcher.node_name(node))
                del waiting[tid]
        queued[:] = [s for s in queued if s.node in online]
        for tid, stream in list(active.items()):
            if stream.node not in online:
                del active[tid]
                self._buffers.append(stream.buffer)

    # ------------------------------------------------------------------ streams
    def _ack(self, node: str, task_id: str, done_ids: set, deferred: dict | None = None) -> None:
        """A result is taken: acknowledge it now, or leave it in ``deferred`` for the unmasking."""
        done_ids.add(task_id)
        if deferred is not None:
            deferred[node] = task_id
        else:
            self.researcher.send(node, Message("result.ack", {"task_id": task_id}))

    @staticmethod
    def _matches(fields: dict, expected: dict) -> bool:
        layout = fields.get("layout") or []
        return {name: (shape, DTYPES.get(dtype)) for name, dtype, shape, _ in layout} == expected

    def _new_stream(self, tid: str, node: str, fields: dict) -> _Stream:
        chunks = chunk_plan(fields["layout"], int(fields["chunk_bytes"]))
        return _Stream(tid, node, int(fields.get("samples", 0)), fields, chunks, {})

    def _buffer_for(self, layout: list) -> dict[str, torch.Tensor]:
        """A receive buffer shaped like the model, reused across streams and rounds (no new pages)."""
        while self._buffers:
            buf = self._buffers.pop()
            if all(name in buf and list(buf[name].shape) == shape for name, _, shape, _ in layout):
                return buf
        return {name: torch.empty(shape, dtype=DTYPES[dtype]) for name, dtype, shape, _ in layout}

    def _pull(self, stream: _Stream, again: bool = False) -> None:
        """Keep WINDOW chunks in flight; after a stall, ask again for everything missing in it."""
        stream.last_activity = time.monotonic()
        if again:
            missing = [i for i in range(stream.requested) if i not in stream.received]
            for i in missing:
                self.researcher.send(stream.node, Message("result.pull", {"task_id": stream.task_id, "first": i, "count": 1}))
            if missing:
                return
        in_flight = stream.requested - len(stream.received)
        if in_flight > WINDOW // 2 or stream.requested >= len(stream.chunks):
            return
        count = min(WINDOW - in_flight, len(stream.chunks) - stream.requested)
        fields = {"task_id": stream.task_id, "first": stream.requested, "count": count}
        self.researcher.send(stream.node, Message("result.pull", fields))
        stream.requested += count

    def _store_chunk(self, stream: _Stream, msg: Message) -> None:
        index = msg.fields["index"]
        if not 0 <= index < len(stream.chunks) or index in stream.received:
            return
        name, start, count = stream.chunks[index]
        data = msg.tensors.get("data")
        target = stream.buffer[name].view(-1)
        if data is None or data.numel() != count or data.dtype != target.dtype:
            log.warning("bad chunk %d from %s: ignored", index, self.researcher.node_name(stream.node))
            return
        target[start : start + count].copy_(data)
        stream.received.add(index)
        self._pull(stream)


@contextmanager
def _one_torch_thread():
    """Run the round's tensor work (chunk copies, accumulation) on this thread alone.

    It runs beside the I/O thread's CURVE decryption and, on a small machine, beside the nodes:
    torch's intra-op threads would only wait for a core at every operation's barrier, and spin
    while they wait (measured: a P = 1e5, K = 8 round on 2 cores went from 31 to 13 ms of
    researcher CPU). The setting is process-wide, so it is restored as soon as the results are in.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _round_key(experiment_id: str, rnd: int) -> str:
    return f"{experiment_id}/{seq_key(rnd)}"


def _failures(failed: dict[str, dict], name: Callable[[str], str]) -> str:
    """Each distinct error once, with the nodes that gave it: "a, b: [code] message; c: ...". The
    message is what tells a user what to do (a refused plan's names its hash and the operator's
    commands), so it is kept whole."""
    groups: dict[tuple, list[str]] = {}
    for node, error in failed.items():
        groups.setdefault((error.get("code"), error.get("message")), []).append(name(node))
    return "; ".join(f"{', '.join(sorted(nodes))}: [{code}] {message}" for (code, message), nodes in groups.items())


def _info(fields: dict) -> dict:
    """What the history keeps of one node's result (under secure aggregation: no samples, no metrics)."""
    info = {
        "task": fields["task_id"],
        "samples": int(fields["samples"]) if "samples" in fields else None,
        "metrics": fields.get("metrics", {}),
        "duration": fields.get("duration"),
        "device": fields.get("device"),
    }
    if "metric_names" in fields:
        info["metric_names"] = list(fields["metric_names"])
    if "privacy" in fields:
        info["privacy"] = fields["privacy"]
    return info


def _weighted_metrics(contributed: dict[str, dict]) -> dict[str, float]:
    """Sample-weighted mean of the metrics nodes reported (test_loss, test_accuracy, ...)."""
    total = sum(info["samples"] for info in contributed.values()) or 1
    keys = set().union(*(info["metrics"] for info in contributed.values())) if contributed else set()
    return {
        k: sum(info["metrics"].get(k, 0.0) * info["samples"] for info in contributed.values()) / total for k in sorted(keys)
    }
