"""The node's warm worker process: runs one training task at a time, on request.

Started once (Python and torch imported once) and reused for task after task; the node kills and
replaces it when a plan hangs past its time limit, crashes it, or runs it out of memory, so a bad
plan fails its task and never the node. Jobs and results are orjson lines on stdin / a private
copy of stdout (the plan's own prints go to stderr); the model goes through the task's pack file:
the worker maps it to load the model, trains, and writes the result back over it (``pwrite``, see
:mod:`meshfl.store.blobs`) — never through the pipe, never pickled. With ``delta`` set (secure
aggregation) it writes trained minus received instead, which the node then encodes and masks.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import traceback

import orjson
import torch

from ..aggregate._scaffold import SLOT
from ..errors import MeshflError
from ..plans import DEFAULT_TRAINING_ARGS, TorchTrainingPlan, load_plan_class, local_keys
from ..store.blobs import read_pack, update_pack, write_pack
from ._datasets import load_dataset

log = logging.getLogger("meshfl.worker")
_plans: dict[str, type] = {}
_data: dict[tuple, tuple] = {}
_models: dict[tuple, torch.nn.Module] = {}
_deltas: dict[str, torch.Tensor] = {}  # the cached model's delta buffers (secure rounds), by tensor name


def _device(args: dict, allow_cuda: bool) -> torch.device:
    wanted = args.get("device", "auto")
    cuda = allow_cuda and torch.cuda.is_available()
    if wanted == "cuda" and not cuda:
        raise RuntimeError("the plan asks for CUDA but this node has none (or does not allow it)")
    return torch.device("cuda" if cuda and wanted in ("auto", "cuda") else "cpu")


def _seed(seed: int, device: torch.device) -> None:
    """Seed the generators the task uses. ``torch.manual_seed`` also queues seeds for every
    accelerator backend not yet started, recording a stack trace for each: on CPU that cost more
    than a small plan's whole step."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _batches(data, batch_size: int, generator: torch.Generator):
    """Shuffled mini-batches of ``data``, on the device the data is on (it moved there once)."""
    x, y = data
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)  # one copy per epoch
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) == 1 < len(order):
            continue  # a last batch of one sample breaks BatchNorm and adds only noise
        yield x[idx], (y[idx] if y is not None else None)


def default_train(plan: TorchTrainingPlan, model, train, args: dict, device: torch.device) -> dict:
    """The plain supervised loop: epochs (or exact steps) of mini-batches, optional FedProx term.
    ``train`` is already on ``device``."""
    optimizer = plan.init_optimizer(model, args["lr"])
    generator = torch.Generator().manual_seed(int(args["seed"]))
    mu = float(args.get("fedprox_mu") or 0.0)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else None
    max_steps = int(args["steps"]) if args.get("steps") else None
    epochs = 10**9 if max_steps else int(args["epochs"])
    steps, total = 0, 0.0
    model.train()
    for _ in range(epochs):
        if train[0].shape[0] == 0 or (max_steps and steps >= max_steps):
            break
        for batch in _batches(train, int(args["batch_size"]), generator):
            optimizer.zero_grad()
            loss = plan.training_step(model, batch)
            if anchor is not None:
                loss = loss + mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            optimizer.step()
            steps += 1
            total += float(loss.detach())
            if max_steps and steps >= max_steps:
                break
    return {"train_loss": total / max(steps, 1), "steps": steps}


def _model(plan: TorchTrainingPlan, job: dict, device: torch.device):
    """The plan's model, built once per (plan, model args, device) and reused by later rounds:
    every task overwrites all of its state, and building a big model costs fresh memory."""
    key = (job["plan_hash"], orjson.dumps(job["model_args"], option=orjson.OPT_SORT_KEYS), device.type)
    if key not in _models:
        _models.clear()
        _deltas.clear()
        _models[key] = plan.init_model(**job["model_args"]).to(device)
    return _models[key]


def _delta_buffer(name: str, like: torch.Tensor) -> torch.Tensor:
    """A buffer for tensor ``name``'s delta, reused from round to round: a fresh one cost a page
    fault per 4 KiB. Not the model's own memory: tied weights share it."""
    buf = _deltas.get(name)
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        buf = _deltas[name] = torch.empty(like.shape, dtype=like.dtype)
    return buf


def _on_device(data: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device) if t is not None else None for t in data)


class _Scaffold:
    """The node's side of SCAFFOLD (see :mod:`meshfl.aggregate._scaffold`): every gradient gets
    ``c - c_i`` added by a hook, so a plan's own ``train`` loop is corrected too; the hooks count
    the backward passes ``K``, and after training ``(x - y) / (K lr)`` goes back in the slots and
    ``c_i+ = c_i - c + (x - y) / (K lr)`` into the node's state."""

    def __init__(self, model, received: dict, kept: dict, device: torch.device) -> None:
        params = dict(model.named_parameters())
        self.c = {k[len(SLOT):]: v for k, v in received.items() if k.startswith(SLOT)}
        unknown = sorted(set(self.c) - set(params))
        if unknown:
            raise MeshflError(f"a control variate came for {unknown[0]!r}, which is no trainable "
                              f"parameter of the plan's model", code="bad_request")
        self.params = {n: params[n] for n in self.c if params[n].requires_grad}  # frozen ones keep c_i
        self.ci = {n: kept.get(f"scaffold.ci/{n}", torch.zeros_like(c)) for n, c in self.c.items()}
        self.steps = 0
        self._hooks = []
        for i, (n, p) in enumerate(self.params.items()):
            correction = (self.c[n] - self.ci[n]).to(device=device, dtype=p.dtype)
            self._hooks.append(p.register_hook(lambda g, c=correction, first=i == 0: self._correct(g, c, first)))

    def _correct(self, grad: torch.Tensor, correction: torch.Tensor, first: bool) -> torch.Tensor:
        if first:
            self.steps += 1
        return grad + correction

    def finish(self, start: dict, lr: float) -> tuple[dict, dict]:
        """The slots to send back and the new ``c_i`` to keep (both on the CPU)."""
        for hook in self._hooks:
            hook.remove()  # the model is cached for the next task
        slots, kept = {}, {}
        for n in self.c:
            p = self.params.get(n)
            if p is None or self.steps == 0:  # nothing trained: c_i stays, the slot sends c back
                slots[SLOT + n], kept[f"scaffold.ci/{n}"] = self.c[n], self.ci[n]
                continue
            drift = (start[n] - p.detach().cpu()).div_(self.steps * lr)
            slots[SLOT + n] = drift
            kept[f"scaffold.ci/{n}"] = self.ci[n] - self.c[n] + drift
        return slots, kept


def _local_start(plan: TorchTrainingPlan, job: dict, local: set[str], kept: dict, seed: int) -> dict:
    """The personalised layers this task starts from: the node's own from earlier rounds, else
    fresh from ``init_model`` under the task's seed (the cached model may hold another experiment's)."""
    if all(f"local/{k}" in kept for k in local):
        return {k: kept[f"local/{k}"] for k in local}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        fresh = plan.init_model(**job["model_args"]).state_dict()
    return {k: kept.get(f"local/{k}", fresh[k]) for k in local}


def run_job(job: dict) -> dict:
    started = time.monotonic()
    key = job["plan_hash"]
    if key not in _plans:
        _plans[key] = load_plan_class(job["plan_source"], job["plan_class"], f"meshfl_plan_{key[:16]}")
    plan = _plans[key]()
    args = {**DEFAULT_TRAINING_ARGS, **job["training_args"]}
    device = _device(args, job.get("allow_cuda", True))
    _seed(int(args["seed"]), device)

    record = job["dataset"]
    data_key = (key, record["name"], record["path"], record.get("added"), device.type)  # preprocess() is the plan's
    if data_key not in _data:
        x, y = load_dataset(record)
        _data.clear()  # keep one dataset in memory at a time
        _data[data_key] = _on_device(plan.preprocess(x, y), device)  # moved once, kept there
    x, y = _data[data_key]
    train, test = plan.split(x, y, float(args["test_fraction"]), int(args["seed"]))

    model = _model(plan, job, device)
    pack = read_pack(job["pack"])  # the received model; the result goes back over it
    kept = read_pack(job["state"]) if job.get("state") else {}  # this experiment's state on this node
    local = local_keys(plan, model.state_dict())
    sent = sorted(local & set(pack))
    if sent:
        raise MeshflError(f"the request carries {sent[0]!r}, which the plan keeps on the node", code="bad_request")
    start = {k: v for k, v in pack.items() if not k.startswith(SLOT)}
    model.load_state_dict({**start, **_local_start(plan, job, local, kept, int(args["seed"]))})
    scaffold = _Scaffold(model, pack, kept, device) if args.get("scaffold") else None
    if hasattr(plan, "train"):
        metrics = plan.train(model, train, args, device) or {}
    else:
        metrics = default_train(plan, model, train, args, device)
    if test[0].shape[0]:
        model.eval()
        metrics.update({f"test_{k}": v for k, v in plan.evaluate(model, test).items()})
    state = {k: v for k, v in model.state_dict().items() if k not in local}
    keep = {f"local/{k}": v.detach().cpu().clone() for k, v in model.state_dict().items() if k in local}
    if scaffold is not None:
        slots, ci = scaffold.finish(start, float(args["lr"]))
        state.update(slots)
        keep.update(ci)
    if {k: (v.shape, v.dtype) for k, v in state.items()} != {k: (v.shape, v.dtype) for k, v in pack.items()}:
        raise ValueError("the plan changed the model's tensor names, shapes or dtypes during training")
    result = {}
    for name in pack:
        tensor = state[name].detach().cpu()  # results travel as CPU tensors, whatever the device
        if job.get("delta") and tensor.dtype != torch.bool:  # secure aggregation masks the change
            tensor = torch.sub(tensor, pack[name], out=_delta_buffer(name, tensor))
        result[name] = tensor
    update_pack(job["pack"], result)
    if keep:
        write_pack(job["state_out"], keep)
    return {
        "ok": True,
        "samples": int(train[0].shape[0]),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "device": device.type,
        "duration": time.monotonic() - started,
        "state": bool(keep),
    }


def _safe_message(exc: BaseException, job: dict) -> str:
    """Exception text for the researcher, without this node's file paths."""
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    path = (job.get("dataset") or {}).get("path")
    return text.replace(path, "<dataset>") if path else text


def main() -> None:
    # Ctrl-C in a terminal signals the whole process group: the node shuts down and stops this
    # worker itself, so the worker ignores SIGINT rather than die in a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # the plan's print() goes to stderr, never into our result channel
    torch.set_num_threads(max(1, int(os.environ.get("MESHFL_WORKER_THREADS", "1"))))
    out.write(b'{"ready":true}\n')
    for line in sys.stdin.buffer:
        job = orjson.loads(line)
        try:
            result = run_job(job)
        except MeshflError as exc:
            log.error("task %s refused: %s", job.get("task_id"), exc)
            result = {"ok": False, "error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.error("task %s failed:\n%s", job.get("task_id"), traceback.format_exc())
            result = {"ok": False, "error": {"code": "plan_failed", "message": _safe_message(exc, job)}}
        try:
            out.write(orjson.dumps(result) + b"\n")
        except BrokenPipeError:
            return  # the node is gone: nobody to answer


if __name__ == "__main__":
    main()
