"""Tests that need something of the system (root, Debian packages): skipped where it is missing,
failed in CI (``.ci/run`` sets MESHFL_CI=1 and installs what they need)."""

import os

import pytest


def require(missing: str | None) -> None:
    """``missing``: why the test cannot run here, or None when it can."""
    if missing is None:
        return
    if os.environ.get("MESHFL_CI"):
        pytest.fail(f"{missing}; CI must provide it (see .ci/run)", pytrace=False)
    pytest.skip(f"{missing} (CI runs this test: MESHFL_CI=1)")
