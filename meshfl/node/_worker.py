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
import sys
import time
import tempfile
import traceback
import warnings

import numpy as np
import orjson
import torch

from .._extras import require
from .._gc import freeze_startup_objects
from ..aggregate._scaffold import SLOT
from ..errors import MeshflError
from ..plans import DEFAULT_TRAINING_ARGS, TorchTrainingPlan, TrainingPlan, load_plan_class, local_keys
from ..store.blobs import read_pack, update_pack, write_pack
from . import _sandbox
from ._datasets import feature_names, load_dataset, load_table

log = logging.getLogger("meshfl.worker")


class DPRefused(MeshflError):
    code = "dp_incompatible"

_plans: dict[str, type] = {}
_data: dict[tuple, tuple] = {}
_models: dict[tuple, torch.nn.Module] = {}
_deltas: dict[str, torch.Tensor] = {}  # the cached model's delta buffers (secure rounds), by tensor name


def pick_device(args: dict, allow_cuda: bool) -> torch.device:
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


def local_training(plan: TrainingPlan, model, train, args: dict, device: torch.device) -> dict:
    """One round of local training: the plan's own ``train`` if it defines one, else the default
    loop. A node's worker and a hosted model's light client both train through here."""
    if hasattr(plan, "train"):
        return plan.train(model, train, args, device) or {}
    return default_train(plan, model, train, args, device)


def _model(plan: TrainingPlan, job: dict, device: torch.device):
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


def _local_start(plan: TrainingPlan, job: dict, local: set[str], kept: dict, seed: int) -> dict:
    """The personalised layers this task starts from: the node's own from earlier rounds, else
    fresh from ``init_model`` under the task's seed (the cached model may hold another experiment's)."""
    if all(f"local/{k}" in kept for k in local):
        return {k: kept[f"local/{k}"] for k in local}
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        fresh = plan.init_model(**job["model_args"]).state_dict()
    return {k: kept.get(f"local/{k}", fresh[k]) for k in local}


def _prepare(job: dict):
    """What every job starts from: the plan (loaded once per hash), the training arguments, the
    device, and the node's dataset (loaded once, preprocessed by the plan, split)."""
    key = job["plan_hash"]
    if key not in _plans:
        _plans[key] = load_plan_class(job["plan_source"], job["plan_class"], f"meshfl_plan_{key[:16]}")
    plan = _plans[key]()
    args = {**DEFAULT_TRAINING_ARGS, **job["training_args"]}
    device = pick_device(args, job.get("allow_cuda", True) and plan.uses_cuda)
    _seed(int(args["seed"]), device)
    record = job["dataset"]
    steps = job.get("preprocess") or []
    data_key = (key, record["name"], record["path"], record.get("added"), device.type,  # preprocess() is the plan's
                orjson.dumps(steps))
    if data_key not in _data:
        x, y = load_dataset(record)
        if steps:  # the experiment's federated preprocessing, before the plan sees the data
            x = _preprocessed(x, record, steps)
        _data.clear()  # keep one dataset in memory at a time
        _data[data_key] = _on_device(plan.preprocess(x, y), device)  # moved once, kept there
    x, y = _data[data_key]
    train, test = plan.split(x, y, float(args["test_fraction"]), int(args.get("split_seed", args["seed"])))
    return plan, args, device, train, test


def _preprocessed(x: torch.Tensor, record: dict, steps: list) -> torch.Tensor:
    """The node's features with the experiment's fitted preprocessing applied (one-hot columns
    read from the dataset's text columns)."""
    from ..analytics import preprocess

    text = load_table(record).text if any(step["step"] == "onehot" for step in steps) else None
    out = preprocess.apply(x.numpy(), feature_names(record), preprocess.check(steps), text)
    return torch.from_numpy(out.astype(np.float32))


def train_job(job: dict) -> dict:
    """One round of training: the received model in the task's pack, the trained one (or its
    change, ``delta``) written back over it."""
    started = time.monotonic()
    plan, args, device, train, test = _prepare(job)
    dp = job.get("dp")
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
    if dp and dp["mode"] == "sample":
        metrics = dp_sgd_train(plan, model, train, args, device, dp, job["mechanism"])
    else:
        metrics = local_training(plan, model, train, args, device)
    if test[0].shape[0] and not dp:  # under DP only the noised model leaves: no data-dependent metric
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
    norm = _update_norm(state, pack) if job.get("update_norm") else None
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
        "update_norm": norm,
        "state": bool(keep),
    }


def stats_job(job: dict) -> dict:
    """A statistics query (meshfl/analytics) over the dataset, read as float64 columns. No plan
    code runs; the answer is small (kilobytes) and goes back in the result line."""
    started = time.monotonic()
    from ..analytics import compute, parse

    record = job["dataset"]
    key = ("table", record["name"], record["path"], record.get("added"))
    if key not in _data:
        _data.clear()  # one dataset in memory at a time, tables and tensors alike
        _data[key] = load_table(record)
    table = _data[key]
    values, extras = compute(parse(job["query"], max_bins=1 << 30), table, bool(job.get("secure")))
    return {"ok": True, "values": values, "extras": extras, "rows": table.rows,
            "duration": time.monotonic() - started}


#: The jobs a worker runs, by ``job["kind"]``: they share loading, the sandbox and the limits.
JOBS = {"train": train_job, "stats": stats_job}


def run_job(job: dict) -> dict:
    return JOBS[job.get("kind", "train")](job)


def dp_sgd_train(plan: TorchTrainingPlan, model, train, args: dict, device: torch.device, dp: dict,
                 mechanism: list) -> dict:
    """DP-SGD with Opacus: exactly the node's mechanism ``(sigma, q, steps)`` - Poisson batches of
    rate ``q``, per-sample gradients clipped to ``dp["clip"]``, noise ``sigma`` times that - so
    the cost the node debits is the cost of what ran. Plan code runs only in ``training_step``."""
    if hasattr(plan, "train"):
        raise DPRefused("a plan that replaces train() cannot run with DP-SGD: the node runs its own "
                        "loop so that it can vouch for the privacy cost", code="dp_custom_loop")
    with _sandbox.lifted():  # the worker's own import, not the plan's
        require("opacus", "dp")
        from opacus import GradSampleModule
        from opacus.accountants import RDPAccountant
        from opacus.data_loader import DPDataLoader
        from opacus.optimizers import DPOptimizer
        from opacus.validators import ModuleValidator

    model.train()  # the cached model may come back from the last task's evaluation
    problems = ModuleValidator.validate(model, strict=False)
    if problems or any(b.is_floating_point() for b in model.buffers()):
        what = "; ".join(str(p) for p in problems[:3]) or "the model has floating buffers DP does not cover"
        raise DPRefused(f"this model cannot train with DP-SGD: {what}", code="dp_incompatible")
    sigma, q, steps = float(mechanism[0]), float(mechanism[1]), int(mechanism[2])
    x, y = train
    dataset = torch.utils.data.TensorDataset(*((x,) if y is None else (x, y)))
    seed = int(args["seed"])
    loader = DPDataLoader(dataset, sample_rate=q, generator=torch.Generator().manual_seed(seed))
    noise = torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(plan.init_optimizer(model, args["lr"]), noise_multiplier=sigma,
                            max_grad_norm=float(dp["clip"]), expected_batch_size=max(1, round(q * len(dataset))),
                            generator=noise)
    accountant = RDPAccountant()  # Opacus' own count of what ran, reported beside the node's
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
    wrapped.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus on a first layer
    done, batches = 0, iter(loader)
    try:
        while done < steps:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            done += 1
            if batch[0].shape[0] == 0:
                continue  # an empty Poisson batch: no step is taken (the cost counted it anyway)
            optimizer.zero_grad()
            loss = plan.training_step(wrapped, tuple(t.to(device) for t in batch) if y is not None
                                      else (batch[0].to(device), None))
            loss.backward()
            optimizer.step()
    finally:
        wrapped._close()  # the warm worker reuses the model: take Opacus' hooks off it
    return {"steps": done, "dp_steps_taken": sum(n for _, _, n in accountant.history)}


def _update_norm(trained: dict, received: dict) -> float:
    """L2 norm of trained minus received over the floating tensors (for the operator's review)."""
    total = 0.0
    for name, tensor in trained.items():
        if tensor.is_floating_point():
            total += float(torch.sub(tensor.detach().cpu(), received[name]).double().square().sum())
    return total ** 0.5


def _safe_message(exc: BaseException, job: dict) -> str:
    """Exception text for the researcher, without this node's file paths."""
    text = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    path = (job.get("dataset") or {}).get("path")
    return text.replace(path, "<dataset>") if path else text


def main(settings: dict | None = None, protections: dict | None = None) -> None:
    """Serve jobs from stdin until it closes. ``settings``: the sandbox's (see ``_sandbox``), with
    ``protections`` what :func:`~meshfl.node._sandbox.isolate` achieved before torch loaded."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # the plan's print() goes to stderr, never into our result channel
    torch.set_num_threads(max(1, int(os.environ.get("MESHFL_WORKER_THREADS", "1"))))
    jail = None
    if settings and settings.get("audit_hook", True):
        jail = _sandbox.Jail(_sandbox.python_roots(), settings.get("read_paths") or [])
        _sandbox.install(jail)
    freeze_startup_objects()
    out.write(orjson.dumps({"ready": True, "protections": protections}) + b"\n")
    for line in sys.stdin.buffer:
        job = orjson.loads(line)
        result, tainted = _serve(job, jail, settings or {})
        try:
            out.write(orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
        except BrokenPipeError:
            return  # the node is gone: nobody to answer
        if tainted:  # the plan broke a rule: no later task shares this interpreter
            os._exit(0)


def _serve(job: dict, jail, settings: dict) -> tuple[dict, bool]:
    """Run one job inside the jail; (its result, whether the worker must not be reused)."""
    scratch = job.get("scratch")
    if scratch:
        os.chdir(scratch)
        if os.environ.get("TMPDIR") != scratch:  # the same folder task after task
            os.environ["TMPDIR"] = scratch
        tempfile.tempdir = scratch
    if jail is not None:
        dataset = (job.get("dataset") or {}).get("path")
        state_out = job.get("state_out")  # this experiment's state on this node, written anew
        jail.begin(reads=[p for p in (dataset, job.get("pack"), job.get("state")) if p],
                   writes=[p for p in (scratch, job.get("pack"), state_out, state_out and state_out + ".tmp") if p],
                   cpu_seconds=job.get("cpu_seconds"))
    violation = None
    try:
        result = run_job(job)
    except MeshflError as exc:  # a refusal with its own code (DP, a missing extra, ...)
        path = (job.get("dataset") or {}).get("path")
        message = exc.message.replace(path, "<dataset>") if path else exc.message
        result = {"ok": False, "error": {"code": exc.code, "message": message[:300]}}
    except Exception as exc:
        if settings.get("memory_mb") and _out_of_memory(exc):
            violation = f"the plan went over the memory cap of {settings['memory_mb']} MiB"
        log.error("task %s failed:\n%s", job.get("task_id"), traceback.format_exc())
        result = {"ok": False, "error": {"code": "plan_failed", "message": _safe_message(exc, job)}}
    finally:
        caught = jail.end() if jail is not None else []
        if scratch:
            os.chdir("/")
    if caught:
        violation = "; ".join(dict.fromkeys(caught))
    if violation is None:
        return result, False
    log.error("task %s broke the sandbox: %s", job.get("task_id"), violation)
    return {"ok": False, "error": {"code": "plan_violation", "message": violation[:300]}}, True


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "Cannot allocate memory" in text

