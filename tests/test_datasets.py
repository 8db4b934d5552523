"""meshfl.node._datasets: registering, inspecting, searching and loading datasets."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from helpers.data import write_png
from meshfl.errors import DatasetError
from meshfl.node._datasets import DatasetRegistry, load_dataset, public_view
from meshfl.store import AuditLog, Store


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "store") as store:
        yield store


@pytest.fixture
def registry(store):
    return DatasetRegistry(store, AuditLog(store))


def write_csv(path, rows=12):
    lines = ["age,weight,city,label,score"]
    for i in range(rows):
        lines.append(f"{20 + i},{60.5 + i},c{i % 3},{i % 2},{i / 4}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_records_columns_and_loads(registry, tmp_path):
    path = write_csv(tmp_path / "d.csv")
    record = registry.add("patients", ["Clinic", " adult "], "csv", path, target="label")
    assert record["samples"] == 12
    assert record["columns"] == ["age", "weight", "city", "label", "score"]
    assert record["dtypes"] == {"age": "int", "weight": "float", "city": "str", "label": "int",
                                "score": "float"}
    assert record["shape"] == [12, 3]  # numeric features: age, weight, score
    assert record["tags"] == ["clinic", "adult"]
    assert record["path"] == str(path)
    x, y = load_dataset(registry.get("patients"))
    assert x.dtype == torch.float32 and x.shape == (12, 3)
    assert y.dtype == torch.int64 and y.tolist() == [i % 2 for i in range(12)]
    assert x[1].tolist() == pytest.approx([21, 61.5, 0.25])


def test_csv_string_and_float_targets(registry, tmp_path):
    path = write_csv(tmp_path / "d.csv")
    record = registry.add("by-city", ["a"], "csv", path, target="city")
    assert record["classes"] == ["c0", "c1", "c2"]
    _, y = load_dataset(record)
    assert y.dtype == torch.int64 and y[:4].tolist() == [0, 1, 2, 0]
    _, y = load_dataset(registry.add("by-score", ["a"], "csv", path, target="score"))
    assert y.dtype == torch.float32
    with pytest.raises(DatasetError) as err:
        registry.add("bad", ["a"], "csv", path, target="nope")
    assert err.value.code == "bad_target"


def test_array_formats(registry, tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float64)
    y = np.arange(20) % 3
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", X=x, labels=y)
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y.astype(np.float32))},
               tmp_path / "xy.pt")

    npy = registry.add("npy", ["t"], "npy", tmp_path / "x.npy")
    assert (npy["samples"], npy["shape"]) == (20, [20, 4])
    xs, ys = load_dataset(npy)
    assert xs.dtype == torch.float32 and ys is None

    npz = registry.add("npz", ["t"], "npz", tmp_path / "xy.npz", target="labels")
    assert (npz["samples"], npz["shape"]) == (20, [20, 4])
    xs, ys = load_dataset(npz)
    assert xs.shape == (20, 4) and ys.dtype == torch.int64 and ys.tolist() == y.tolist()

    pt = registry.add("pt", ["t"], "torch", tmp_path / "xy.pt")
    assert pt["samples"] == 20
    xs, ys = load_dataset(pt)
    assert xs.dtype == torch.float32 and ys.dtype == torch.float32


def test_torch_files_are_never_unpickled(registry, tmp_path):
    torch.save({"x": torch.zeros(3, 2), "y": torch.zeros(3)}, tmp_path / "ok.pt")
    torch.save({"x": torch.zeros(3, 2), "evil": logging.getLogger("x")}, tmp_path / "evil.pt")
    with pytest.raises(DatasetError) as err:
        registry.add("evil", ["t"], "torch", tmp_path / "evil.pt")
    assert err.value.code == "bad_format"
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(DatasetError):
        registry.add("list", ["t"], "torch", tmp_path / "list.pt")


@pytest.mark.parametrize("name, fmt, target, code", [
    ("missing", "csv", None, "not_found"),
    ("d", "parquet", None, "bad_format"),
    ("with space", "csv", None, "bad_name"),
    ("npy-target", "npy", "y", "bad_target"),
])
def test_add_errors(registry, tmp_path, name, fmt, target, code):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    path = tmp_path / ("nothing.csv" if code == "not_found" else "x.npy")
    with pytest.raises(DatasetError) as err:
        registry.add(name, [], fmt, path, target=target)
    assert err.value.code == code


def test_duplicate_and_garbage(registry, tmp_path):
    write_csv(tmp_path / "d.csv")
    registry.add("d", [], "csv", tmp_path / "d.csv")
    with pytest.raises(DatasetError) as err:
        registry.add("d", [], "csv", tmp_path / "d.csv")
    assert err.value.code == "exists"
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DatasetError) as err:
        registry.add("junk", [], "npz", tmp_path / "junk.npz")
    assert err.value.code == "bad_format"


def test_vanished_data_does_not_leak_its_path(registry, tmp_path, caplog):
    path = write_csv(tmp_path / "secret-location.csv")
    registry.add("d", [], "csv", path, target="label")
    path.unlink()
    with caplog.at_level(logging.ERROR), pytest.raises(DatasetError) as err:
        load_dataset(registry.get("d"))
    assert err.value.code == "dataset_missing"
    assert err.value.message == "dataset d is registered but its data is no longer readable on this node"
    assert "secret-location" not in str(err.value.to_wire())
    assert "secret-location" in caplog.text  # the operator still learns where it looked


def test_search_filters_and_hides_paths(registry, tmp_path):
    write_csv(tmp_path / "big.csv", rows=50)
    write_csv(tmp_path / "small.csv", rows=3)
    registry.add("big", ["mnist", "train"], "csv", tmp_path / "big.csv")
    registry.add("small", ["mnist", "train"], "csv", tmp_path / "small.csv")
    registry.add("other", ["cifar"], "csv", tmp_path / "big.csv")
    found = registry.search(["MNIST"], minimum_samples=10)
    assert [r["name"] for r in found] == ["big"]
    assert [r["name"] for r in registry.search(["mnist", "train"], minimum_samples=1)] == [
        "big", "small"]
    assert registry.search(["mnist", "cifar"], minimum_samples=1) == []
    assert len(registry.search([], minimum_samples=10)) == 2
    for record in registry.search([], minimum_samples=0):
        assert "path" not in record and str(tmp_path) not in repr(record)
    assert "path" not in public_view(registry.get("big"))


def test_get_remove_and_audit(registry, store, tmp_path):
    write_csv(tmp_path / "d.csv")
    registry.add("d", ["x"], "csv", tmp_path / "d.csv")
    assert [r["name"] for r in registry.list()] == ["d"]
    assert registry.remove("d") is True and registry.remove("d") is False
    with pytest.raises(DatasetError) as err:
        registry.get("d")
    assert err.value.code == "unknown_dataset"
    assert [r.event for r in AuditLog(store).records()] == ["dataset.added", "dataset.removed"]


def test_image_folder(registry, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for i in range(3):
            write_png(tmp_path / "img" / cls / f"{i}.png", gray=60 if cls == "cat" else 200)
    (tmp_path / "img" / "notes.txt").write_text("ignored")
    record = registry.add("pets", ["img"], "images", tmp_path / "img")
    assert record["samples"] == 6 and record["classes"] == ["cat", "dog"]
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(DatasetError, match="Pillow") as err:
            load_dataset(record)
        assert err.value.code == "bad_format"
    else:  # with Pillow: the shape is known at registration and the pixels load scaled to [0, 1]
        assert record["shape"] == [6, 1, 2, 3]
        x, y = load_dataset(record)
        assert x.shape == (6, 1, 2, 3) and y.tolist() == [0, 0, 0, 1, 1, 1]
        assert torch.allclose(x[0], torch.full((1, 2, 3), 60 / 255)) and torch.allclose(x[5], torch.full((1, 2, 3), 200 / 255))
