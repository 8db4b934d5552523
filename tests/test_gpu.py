"""Nodes train on CUDA where they have it (device "auto"): the model and the data move to the GPU
once, results come back as CPU tensors. The CUDA tests are skipped, with the reason, elsewhere."""

from __future__ import annotations

import pytest
import torch

from helpers.data import register_blobs, write_blobs_csv
from helpers.plans import SgdPlan, TinyPlan
from meshfl.node import _worker
from meshfl.node._datasets import DatasetRegistry
from meshfl.node._plans import plan_hash
from meshfl.plans import plan_source
from meshfl.researcher import Experiment
from meshfl.store import Store
from meshfl.store.blobs import read_pack, write_pack
from meshfl.testing import FederatedMesh

pytestmark = pytest.mark.timeout(180)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here (torch.cuda.is_available() is False)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_worker_moves_model_and_data_to_the_device_once_and_returns_cpu_tensors(tmp_path, device):
    store = Store(tmp_path / "store")
    try:
        record = DatasetRegistry(store).add("blobs", ["blobs"], "csv", write_blobs_csv(tmp_path / "b.csv", n=64),
                                            target="target")
    finally:
        store.close()
    source = plan_source(SgdPlan)
    model = SgdPlan().init_model(classes=2)
    job = {"task_id": "t", "plan_source": source, "plan_class": "SgdPlan", "plan_hash": plan_hash(source),
           "model_args": {"classes": 2}, "training_args": {"device": device, "epochs": 3, "lr": 0.1},
           "dataset": record, "pack": str(tmp_path / "t.pack"), "state": None, "state_out": str(tmp_path / "t.state")}
    results = {}
    for rnd in (1, 2):
        write_pack(job["pack"], model.state_dict())
        result = _worker.run_job({**job, "training_args": {**job["training_args"], "seed": rnd}})
        assert result["ok"] and result["device"] == device
        (x, y), = _worker._data.values()  # the dataset, kept on the device between rounds
        assert x.device.type == device and y.device.type == device
        (cached,) = _worker._models.values()
        assert next(cached.parameters()).device.type == device
        results[rnd] = read_pack(job["pack"])
        assert all(t.device.type == "cpu" for t in results[rnd].values())  # what goes on the wire
    assert not torch.equal(results[1]["weight"], model.state_dict()["weight"])  # it trained


@needs_cuda
def test_a_mesh_trains_on_cuda_and_matches_the_cpu_run():
    with FederatedMesh(2) as mesh:
        register_blobs(mesh, n=60, plan=TinyPlan)
        models = {}
        for device in ("cpu", "auto"):
            torch.manual_seed(0)
            exp = Experiment(mesh.researcher, TinyPlan, ["blobs"], 3, min_nodes=2, round_timeout=60, progress=False,
                             training_args={"epochs": 3, "lr": 0.05, "device": device})
            history = exp.run()
            assert {info["device"] for info in history[-1]["nodes"].values()} == {"cpu" if device == "cpu" else "cuda"}
            models[device] = exp.global_state
        for name, value in models["cpu"].items():
            assert torch.allclose(models["auto"][name], value, atol=1e-4), name
