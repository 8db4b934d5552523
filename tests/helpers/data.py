"""Small generated datasets for the integration tests."""

import struct
import zlib

import numpy as np


def write_blobs_csv(path, n=60, features=4, seed=0):
    """Two separable Gaussian blobs as a CSV with a `target` column."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, features)) + (y[:, None] * 2.0)
    header = ",".join([f"x{i}" for i in range(features)] + ["target"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    return path


def write_png(path, width=3, height=2, gray=128):
    """A valid grayscale PNG made without Pillow (the image tests run with and without it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes([gray]) * width for _ in range(height))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def class_centres(classes=3, features=4, seed=99):
    return np.random.default_rng(seed).normal(size=(classes, features)) * 2.0


def write_one_class_csv(path, label, n=60, classes=3, features=4, seed=0):
    """Strongly non-IID: a node that holds only class ``label`` (Gaussian around its centre)."""
    x, y = one_class_samples(label, n, classes, features, seed)
    header = ",".join([f"x{i}" for i in range(features)] + ["target"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    return path


def one_class_samples(label, n, classes=3, features=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)) + class_centres(classes, features)[label]
    return x, np.full(n, label)


def register_blobs(mesh, n=40, plan=None):
    """Give each node of a FederatedMesh a blobs dataset (tag ``blobs``, seeded by its index) and
    approve ``plan`` on them all."""
    for i, node in enumerate(mesh.nodes):
        path = write_blobs_csv(node.home.path / "blobs.csv", n=n, seed=i)
        node.datasets.add("blobs", ["blobs"], "csv", path, target="target")
    if plan is not None:
        mesh.approve(plan)
    return mesh
