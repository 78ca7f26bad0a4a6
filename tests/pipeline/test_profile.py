"""The profile flow: bundles are reused by their exact recipe folder, exported once otherwise."""
from __future__ import annotations

import json

from edgevit.core.bundle import MANIFEST_NAME
from edgevit.pipeline.profile import ensure_bundle


def test_a_bundle_is_exported_once_then_reused(tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    # A stray manifest beside the bundles must not pass for one of them.
    (artifacts / MANIFEST_NAME).write_text(json.dumps({"artifact": {"file": "nothing.onnx"}}))
    said = []
    first, manifest = ensure_bundle("levit_128s", "onnx", "fp32", artifacts, said.append)
    assert first == artifacts / "levit_128s-onnx-fp32" / "levit_128s.onnx" and first.is_file()
    assert said[0] == "exporting levit_128s to onnx fp32" and manifest["verification"]["passed"] is True
    said.clear()
    again, reread = ensure_bundle("levit_128s", "onnx", "fp32", artifacts, said.append)
    assert again == first and said == [f"using {first.parent}"] and reread["artifact"] == manifest["artifact"]
