"""Small generated datasets for the integration tests."""

import numpy as np


def write_blobs_csv(path, n=60, features=4, seed=0):
    """Two separable Gaussian blobs as a CSV with a `target` column."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, features)) + (y[:, None] * 2.0)
    header = ",".join([f"x{i}" for i in range(features)] + ["target"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    return path
