"""The node's dataset registry: what the operator has offered for training, and how to load it.

The operator registers a file or folder with a name, tags and a format; the registry inspects it
once (samples, shape, columns) and keeps that record in the store (table ``datasets``). Researchers
only ever see :func:`public_view` of a record: nothing in it reveals the node's file system.
"""

from __future__ import annotations

import csv
import logging
import re
import sys
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DatasetError
from ..store import AuditLog, Store

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TABLE = "datasets"
FORMATS = ("csv", "npy", "npz", "images", "torch")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
X_KEYS = ("x", "X")
Y_KEYS = ("y", "Y")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_PRIVATE = ("path",)


class DatasetRegistry:
    def __init__(self, store: Store, audit: AuditLog | None = None):
        self._table = store.table(TABLE)
        self._audit = audit

    def add(self, name: str, tags: list[str], format: str, path: str | Path,
            target: str | None = None, description: str = "") -> dict:
        """Inspect the data at `path` and register it under `name`; returns the stored record."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise DatasetError(f"a dataset name is 1-64 letters, digits, '_', '.' or '-' and "
                               f"starts with a letter or digit, not {name!r}", code="bad_name")
        if format not in FORMATS:
            raise DatasetError(f"unknown format {format!r}; use one of {', '.join(FORMATS)}",
                               code="bad_format")
        if name in self._table:
            raise DatasetError(f"a dataset named {name!r} is already registered", code="exists")
        path = Path(path).expanduser().absolute()
        if not path.exists():
            raise DatasetError(f"{path} does not exist", code="not_found")
        try:
            facts = _INSPECT[format](path, target)
        except DatasetError:
            raise
        except (OSError, ValueError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise DatasetError(f"cannot read {path} as {format}: {exc}", code="bad_format") from None
        record = {
            "name": name, "tags": normalize_tags(tags), "format": format, "path": str(path),
            "target": target, "description": description,
            "samples": None, "shape": None, "columns": None, "dtypes": None, "classes": None,
            "added": time.time(), **facts,
        }
        self._table.put(name, record)
        if self._audit is not None:
            self._audit.append("dataset.added", name=name, format=format,
                               samples=record["samples"], tags=record["tags"])
        log.info("registered dataset %s (%s, %s samples) at %s", name, format,
                 record["samples"], path)
        return record

    def list(self) -> list[dict]:
        return [record for _, record in self._table.items()]

    def get(self, name: str) -> dict:
        record = self._table.get(name)
        if record is None:
            raise DatasetError(f"no dataset named {name!r} on this node", code="unknown_dataset")
        return record

    def remove(self, name: str) -> bool:
        """Forget a dataset (its files are left alone); False when it was not registered."""
        removed = self._table.delete(name)
        if removed and self._audit is not None:
            self._audit.append("dataset.removed", name=name)
        return removed

    def search(self, tags: list[str], minimum_samples: int) -> list[dict]:
        """Public views of the datasets carrying every tag in `tags` with enough samples."""
        wanted = set(normalize_tags(tags))
        return [
            public_view(record) for record in self.list()
            if wanted <= set(record["tags"]) and (record["samples"] or 0) >= minimum_samples
        ]


def normalize_tags(tags: list[str] | str) -> list[str]:
    """Lower-case, stripped, de-duplicated tags, in order; "a,b" is accepted for ["a", "b"]."""
    if isinstance(tags, str):
        tags = tags.split(",")
    out: list[str] = []
    for tag in tags:
        tag = str(tag).strip().lower()
        if tag and tag not in out:
            out.append(tag)
    return out


def public_view(record: dict) -> dict:
    """What a researcher may see of a dataset record."""
    return {key: value for key, value in record.items() if key not in _PRIVATE}


# --- inspection at registration -------------------------------------------------------------


def _inspect_csv(path: Path, target: str | None) -> dict:
    header, columns = _read_csv(path)
    if target is not None and target not in header:
        raise DatasetError(f"target column {target!r} is not among the columns of {path}: "
                           f"{', '.join(header)}", code="bad_target")
    dtypes = {name: _column_dtype(values) for name, values in zip(header, columns)}
    features = [n for n in header if n != target and dtypes[n] != "str"]
    samples = len(columns[0]) if columns else 0
    facts = {"samples": samples, "shape": [samples, len(features)], "columns": header,
             "dtypes": dtypes}
    if target is not None and dtypes[target] == "str":
        facts["classes"] = sorted(set(columns[header.index(target)]))
    return facts


def _inspect_npy(path: Path, target: str | None) -> dict:
    if target is not None:
        raise DatasetError("a .npy file holds one array (the features); use npz or torch to "
                           "register features with a target", code="bad_target")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return _array_facts(array, None)


def _inspect_npz(path: Path, target: str | None) -> dict:
    with np.load(path, allow_pickle=False) as arrays:
        x_key, y_key = _xy_keys(list(arrays.files), target)
        return _array_facts(arrays[x_key], None if y_key is None else arrays[y_key], y_key)


def _inspect_torch(path: Path, target: str | None) -> dict:
    data = _torch_load(path)
    x_key, y_key = _xy_keys(list(data), target)
    return _array_facts(data[x_key], None if y_key is None else data[y_key], y_key)


def _inspect_images(path: Path, target: str | None) -> dict:
    if not path.is_dir():
        raise DatasetError(f"an image dataset is a folder of <class>/<image files>; "
                           f"{path} is not a folder", code="bad_format")
    files = _image_files(path)
    classes = sorted({cls for cls, _ in files})
    if not files:
        raise DatasetError(f"no image files in class folders under {path}", code="bad_format")
    facts: dict[str, Any] = {"samples": len(files), "classes": classes}
    try:
        from PIL import Image
    except ImportError:
        log.info("Pillow is not installed: the image shape of %s is unknown until it is", path)
    else:
        with Image.open(files[0][1]) as image:
            channels = 1 if image.mode in ("L", "1", "I", "F") else 3
            facts["shape"] = [len(files), channels, image.height, image.width]
    return facts


_INSPECT = {"csv": _inspect_csv, "npy": _inspect_npy, "npz": _inspect_npz,
            "torch": _inspect_torch, "images": _inspect_images}


def _array_facts(x: Any, y: Any, target: str | None = None) -> dict:
    x_shape = list(x.shape)
    if not x_shape:
        raise DatasetError("the features are a scalar, not an array of samples", code="bad_format")
    _check_numeric(x, "features")
    if y is not None:
        _check_numeric(y, "target")
        if not y.shape or y.shape[0] != x_shape[0]:
            raise DatasetError(f"the target has {list(y.shape)} entries for {x_shape[0]} samples",
                               code="bad_format")
    facts: dict[str, Any] = {"samples": x_shape[0], "shape": x_shape}
    if len(x_shape) == 2:  # a table: its columns are named by their index (analytics reads them)
        columns = [str(i) for i in range(x_shape[1])]
        dtypes = dict.fromkeys(columns, _kind(x))
        if y is not None and len(y.shape) == 1:
            columns.append(target or "y")
            dtypes[columns[-1]] = _kind(y)
        facts.update(columns=columns, dtypes=dtypes)
    return facts


def _is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (the CLI starts without it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _kind(array: Any) -> str:
    floating = array.dtype.is_floating_point if _is_tensor(array) else array.dtype.kind == "f"
    return "float" if floating else "int"


def _check_numeric(array: Any, what: str) -> None:
    if isinstance(array, np.ndarray):
        ok = array.dtype.kind in "biuf"
    else:
        ok = _is_tensor(array) and not array.is_complex()
    if not ok:
        raise DatasetError(f"the {what} are not a numeric array", code="bad_format")


def _xy_keys(keys: list[str], target: str | None) -> tuple[str, str | None]:
    x_key = next((k for k in X_KEYS if k in keys), None)
    if x_key is None:
        raise DatasetError(f"no features array named 'x' or 'X' (found: {', '.join(keys)})",
                           code="bad_format")
    if target is not None:
        if target not in keys:
            raise DatasetError(f"no array named {target!r} (found: {', '.join(keys)})",
                               code="bad_target")
        return x_key, target
    return x_key, next((k for k in Y_KEYS if k in keys), None)


def _torch_load(path: Path) -> dict:
    import torch
    # weights_only: tensors and plain containers only, never arbitrary pickled objects.
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for a bad file
        if isinstance(exc, OSError):
            raise
        raise ValueError(f"not a tensor file torch can load safely ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise DatasetError("a torch dataset is a .pt file holding a dict of tensors "
                           "such as {'x': ..., 'y': ...}", code="bad_format")
    return data


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise DatasetError(f"{path} has no header row", code="bad_format")
        header = [name.strip() for name in header]
        if len(set(header)) != len(header) or not all(header):
            raise DatasetError(f"{path}: column names must be unique and non-empty",
                               code="bad_format")
        columns: list[list[str]] = [[] for _ in header]
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(f"{path} line {line} has {len(row)} fields, "
                                   f"the header {len(header)}", code="bad_format")
            for column, value in zip(columns, row):
                column.append(value.strip())
    return header, columns


def _column_dtype(values: list[str]) -> str:
    """"int", "float" (numbers, maybe with empty cells) or "str"."""
    kind = "int"
    for value in values:
        if value == "":
            kind = "float"
            continue
        if kind == "int":
            try:
                int(value)
                continue
            except ValueError:
                kind = "float"
        try:
            float(value)
        except ValueError:
            return "str"
    return kind


def _image_files(path: Path) -> list[tuple[str, Path]]:
    return [
        (folder.name, file)
        for folder in sorted(p for p in path.iterdir() if p.is_dir())
        for file in sorted(folder.iterdir())
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES
    ]


# --- loading for training ---------------------------------------------------------------------


def load_dataset(record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X float32, y or None) for a registered dataset.

    y is int64 when the target looks like class labels (integers, or strings mapped to their
    index in the sorted classes), float32 otherwise. Error messages never contain the path: they
    may be sent to a researcher. The path is logged here instead.
    """
    name, path = record["name"], Path(record["path"])
    try:
        if not path.exists():
            raise FileNotFoundError(path)
        return _LOAD[record["format"]](path, record)
    except DatasetError:
        raise
    except OSError as exc:
        log.error("dataset %s: cannot read %s: %s", name, path, exc)
        raise DatasetError(f"dataset {name} is registered but its data is no longer readable "
                           f"on this node", code="dataset_missing",
                           details={"dataset": name}) from None
    except (ValueError, KeyError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        log.error("dataset %s: cannot load %s: %s", name, path, exc)
        raise DatasetError(f"dataset {name} no longer matches its registration on this node "
                           f"(format {record['format']})", code="bad_format",
                           details={"dataset": name}) from None


def _load_csv(path: Path, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch
    header, columns = _read_csv(path)
    target = record.get("target")
    dtypes = {name: _column_dtype(values) for name, values in zip(header, columns)}
    features = [i for i, n in enumerate(header) if n != target and dtypes[n] != "str"]
    rows = len(columns[0]) if columns else 0
    x = np.empty((rows, len(features)), dtype=np.float32)
    for j, i in enumerate(features):
        x[:, j] = [float(v) if v != "" else np.nan for v in columns[i]]
    y = None
    if target is not None:
        if target not in header:
            raise KeyError(target)
        values = columns[header.index(target)]
        kind = dtypes[target]
        if kind == "int":
            y = torch.tensor([int(v) for v in values], dtype=torch.int64)
        elif kind == "str":
            index = {c: i for i, c in enumerate(record.get("classes") or sorted(set(values)))}
            y = torch.tensor([index[v] for v in values], dtype=torch.int64)
        else:
            y = torch.tensor([float(v) if v != "" else float("nan") for v in values],
                             dtype=torch.float32)
    return torch.from_numpy(x), y


def _load_npy(path: Path, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _features(np.load(path, allow_pickle=False)), None


def _load_npz(path: Path, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    with np.load(path, allow_pickle=False) as arrays:
        x_key, y_key = _xy_keys(list(arrays.files), record.get("target"))
        return _features(arrays[x_key]), None if y_key is None else _labels(arrays[y_key])


def _load_torch(path: Path, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    data = _torch_load(path)
    x_key, y_key = _xy_keys(list(data), record.get("target"))
    return _features(data[x_key]), None if y_key is None else _labels(data[y_key])


def _load_images(path: Path, record: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    import torch
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError("image datasets need Pillow on the node: install Pillow "
                           "(pip install Pillow)", code="bad_format") from None
    files = _image_files(path)
    classes = record.get("classes") or sorted({cls for cls, _ in files})
    index = {cls: i for i, cls in enumerate(classes)}
    images, labels = [], []
    for cls, file in files:
        if cls not in index:
            continue  # a class folder added after registration is not part of the dataset
        with Image.open(file) as image:
            mode = "L" if image.mode in ("L", "1", "I", "F") else "RGB"
            array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        labels.append(index[cls])
    if not images:
        raise ValueError("no images")
    if len({a.shape for a in images}) != 1:
        raise DatasetError(f"the images of dataset {record['name']} differ in size or channels; "
                           f"resize them to one size", code="bad_format")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def feature_names(record: dict) -> list[str]:
    """The names of the columns :func:`load_dataset` puts in ``x``: a CSV's numeric columns but
    the target, in header order; an array dataset's column indices, as strings."""
    if record["format"] == "csv":
        dtypes = record.get("dtypes") or {}
        return [c for c in record.get("columns") or [] if c != record.get("target") and dtypes.get(c) != "str"]
    shape = record.get("shape") or []
    return [str(i) for i in range(shape[1])] if len(shape) == 2 else []


def load_table(record: dict):
    """The dataset as named columns (:class:`meshfl.analytics.Table`), float64 as stored: what
    analytics and preprocessing read. Tabular formats only; errors as :func:`load_dataset`'s."""
    from ..analytics import Table

    name, path = record["name"], Path(record["path"])
    try:
        if not path.exists():
            raise FileNotFoundError(path)
        if record["format"] == "csv":
            header, columns = _read_csv(path)
            table = Table(rows=len(columns[0]) if columns else 0)
            for column, values in zip(header, columns):
                if _column_dtype(values) == "str":
                    table.text[column] = np.array(values, dtype=object)
                else:
                    table.numeric[column] = np.array([float(v) if v != "" else np.nan for v in values])
            return table
        if record["format"] not in ("npy", "npz", "torch"):
            raise DatasetError(f"dataset {name} ({record['format']}) is not a table: analytics reads csv, npy, "
                               f"npz and torch datasets", code="non_numeric_column")
        if record["format"] == "npy":
            x, y, y_key = np.load(path, allow_pickle=False), None, None
        elif record["format"] == "npz":
            with np.load(path, allow_pickle=False) as arrays:
                x_key, y_key = _xy_keys(list(arrays.files), record.get("target"))
                x, y = arrays[x_key], (None if y_key is None else arrays[y_key])
        else:
            data = _torch_load(path)
            x_key, y_key = _xy_keys(list(data), record.get("target"))
            x, y = data[x_key].numpy(), (None if y_key is None else data[y_key].numpy())
        if x.ndim != 2:
            raise DatasetError(f"dataset {name} has {x.ndim}-d samples, not rows of columns",
                               code="non_numeric_column")
        table = Table(rows=x.shape[0])
        x = np.asfortranarray(x, dtype=np.float64)  # each column contiguous: statistics walk columns
        for i in range(x.shape[1]):
            table.numeric[str(i)] = x[:, i]
        if y is not None and y.ndim == 1:
            table.numeric[y_key if record.get("target") else "y"] = np.asarray(y, dtype=np.float64)
        return table
    except DatasetError:
        raise
    except OSError as exc:
        log.error("dataset %s: cannot read %s: %s", name, path, exc)
        raise DatasetError(f"dataset {name} is registered but its data is no longer readable "
                           f"on this node", code="dataset_missing", details={"dataset": name}) from None
    except (ValueError, KeyError, RuntimeError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        log.error("dataset %s: cannot load %s: %s", name, path, exc)
        raise DatasetError(f"dataset {name} no longer matches its registration on this node "
                           f"(format {record['format']})", code="bad_format", details={"dataset": name}) from None


_LOAD = {"csv": _load_csv, "npy": _load_npy, "npz": _load_npz, "torch": _load_torch,
         "images": _load_images}


def _features(x: Any) -> torch.Tensor:
    import torch
    tensor = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return tensor.to(torch.float32).contiguous()


def _labels(y: Any) -> torch.Tensor:
    import torch
    tensor = y if isinstance(y, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(y))
    if tensor.dtype == torch.bool or not tensor.is_floating_point():
        return tensor.to(torch.int64)
    return tensor.to(torch.float32)
