"""Tests of edgevit.data; helpers shared by the data, evaluation and training tests."""
import os

import pytest

from edgevit.data.fashion_mnist import SPLITS, data_dir


def require_fashion_mnist() -> None:
    """Fashion-MNIST comes from Debian's dataset-fashion-mnist; in CI its absence is an error
    (.ci/run installs it), elsewhere a skip with the reason."""
    missing = [f"{prefix}-{kind}" for prefix in SPLITS.values() for kind in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz")
               if not (data_dir() / f"{prefix}-{kind}").is_file()]
    if missing:
        reason = f"Fashion-MNIST not in {data_dir()} (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
