"""edgevit's tensor files: written whole or not at all, readable as the umask allows."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from edgevit.core.datafiles import current_umask, write_safetensors


def test_a_tensor_file_is_whole_and_as_readable_as_the_umask_allows(tmp_path):
    weight = torch.randn(4, 3)
    tensors = {"weight": weight, "view": weight[:, 0], "count": torch.tensor(3, dtype=torch.int64)}  # a view shares storage
    path = write_safetensors(tensors, tmp_path / "w.safetensors", {"note": "kept"})
    loaded = load_file(str(path))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # safetensors alone writes 0600
    previous = os.umask(0o077)
    try:
        assert write_safetensors(tensors, tmp_path / "private.safetensors").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    taken = tmp_path / "w.safetensors"  # a folder in the way: the final rename fails
    taken.mkdir()
    (taken / "keep").write_text("")
    with pytest.raises(OSError):
        write_safetensors({"weight": torch.randn(2)}, taken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
