"""Per-block outputs of Core ML bundles where Core ML cannot run (edgevit.targets.coreml.inspection):
each module's output as the bundle's pre-check computes it. The last module's output gives the
very figures the pre-check recorded in the manifest at export, and a fault planted in one block of
the checkpoint (the test's only) is where the error jumps."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="the coreml extra is not installed (pip install -e '.[coreml]')")

from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.models import get_model_cfg, to_deploy  # noqa: E402
from edgevit.pipeline.export import ExportRequest, export_model  # noqa: E402
from edgevit.pipeline.quantize import QuantizeRequest, quantize_model  # noqa: E402
from edgevit.quant.calibration import Calibration, split_held_out  # noqa: E402
from edgevit.quant.spec import QuantSpec  # noqa: E402
from edgevit.targets.coreml import FP16_PRECHECK, W8_PRECHECK, W8A8_PRECHECK  # noqa: E402
from edgevit.models.capture import module_outputs  # noqa: E402
from edgevit.targets.coreml.inspection import precheck_block_outputs  # noqa: E402
from edgevit.training import load_eval_model  # noqa: E402
from edgevit.verify import block_figures, compare_outputs, first_jump, verification_batch  # noqa: E402
from tests.reference_data import reference_state_dict, write_as_published  # noqa: E402

MODEL, STEM, FAULTY = "levit_128s", "timm__levit_128s", "stages.1"
FAULTY_WEIGHT = FAULTY + ".blocks.0.mlp.ln2.linear.weight"
LOOSE = {"min_cosine": 0.0, "max_rel_error": 1e9}  # the faulty model must be written to be inspected


def _checkpoint(folder, fault: bool):
    """The reference checkpoint; with ``fault``, one input column of a linear layer of ``FAULTY``
    scaled 300×: that layer's per-output-channel int8 scales then fit the column, and its other
    weights keep only a few levels (float16 alone keeps that block above 45 dB SQNR)."""
    state = reference_state_dict(STEM)
    if fault:
        state[FAULTY_WEIGHT] = state[FAULTY_WEIGHT].clone()
        state[FAULTY_WEIGHT][:, 0] *= 300
    directory = folder / ("faulty" if fault else "clean")
    directory.mkdir(exist_ok=True)
    return write_as_published(STEM, directory, state)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("coreml_inspect")
    clean, faulty = _checkpoint(folder, False), _checkpoint(folder, True)
    fp16 = export_model(ExportRequest(MODEL, "coreml", "fp16", weights=str(clean), out_dir=folder / "fp16")).bundle
    w8 = quantize_model(QuantizeRequest(MODEL, "coreml", "dynamic", weights=str(faulty), out_dir=folder / "w8",
                                        tolerances=LOOSE)).export.bundle
    return {"fp16": _opened(fp16, clean), "w8": _opened(w8, faulty), "clean": clean}


def _opened(bundle, weights):
    """(artifact, manifest, deploy model of the checkpoint it was exported from)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    model, _report = load_eval_model(MODEL, str(weights))
    return bundle / manifest["artifact"]["file"], manifest, to_deploy(model)


def _modules(deploy):
    """Every depth-2 module, and the head, whose output is the logits the pre-check compared."""
    return [name for name, _ in deploy.named_modules() if name.count(".") == 1] + ["head"]


def _figures(deploy, images, values, modules):
    """Each module's figures against float32 PyTorch (printed as inspect's table), and the logits."""
    with module_outputs(deploy, modules) as reference, torch.no_grad():
        logits = deploy(images).numpy()
    blocks = {name: block_figures(reference[name], values[name]) for name in modules}
    for name, f in blocks.items():
        print(f"{name:12s} cosine {f['cosine']:.6f}  SQNR {f['sqnr_db']:6.2f} dB  max rel {f['max_rel_error']:.2e}")
    return blocks, logits


def _assert_reproduces_the_precheck(manifest, logits, head):
    """The head's output gives the figures verification recorded: the same computation."""
    recorded, ours = manifest["verification"], compare_outputs(logits, head)
    for key in ("cosine", "max_rel_error", "top1_agreement"):
        assert ours[key] == pytest.approx(recorded[key], rel=1e-6, abs=1e-12), key


def test_fp16_bundle_gives_every_block_as_the_precheck_computes_it(bundles):
    artifact, manifest, deploy = bundles["fp16"]
    images, modules = verification_batch(deploy.cfg, manifest["verification"]["batch"]), _modules(deploy)
    values, note = precheck_block_outputs(artifact, manifest, deploy, images, modules, None)

    assert list(values) == modules and all(v.dtype == np.float32 and len(v) == len(images) for v in values.values())
    assert note["method"].startswith(FP16_PRECHECK) and "macOS" in note["method"]
    blocks, logits = _figures(deploy, images, values, modules)
    # float16 storage and rounding alone: well above what int8 reaches, and no jump.
    assert min(f["sqnr_db"] for f in blocks.values()) > 50
    assert first_jump([f["sqnr_db"] for f in blocks.values()]) is None
    _assert_reproduces_the_precheck(manifest, logits, values["head"])


def test_w8_bundle_reads_its_own_int8_weights_and_the_planted_fault_is_the_first_jump(bundles):
    artifact, manifest, deploy = bundles["w8"]
    images, modules = verification_batch(deploy.cfg, manifest["verification"]["batch"]), _modules(deploy)
    quant = QuantSpec.from_summary(manifest["quantization"])
    values, note = precheck_block_outputs(artifact, manifest, deploy, images, modules, quant)

    assert note["method"].startswith(W8_PRECHECK)
    stored = manifest["target_details"]["int8"]["int8_weight_tensors"]
    assert f"the {stored} int8 weights of {artifact.name}" in note["weights"]
    blocks, logits = _figures(deploy, images, values, modules)
    sqnr = [blocks[name]["sqnr_db"] for name in modules]
    assert modules[first_jump(sqnr)] == FAULTY, blocks
    before = modules[modules.index(FAULTY) - 1]
    assert blocks[before]["sqnr_db"] - blocks[FAULTY]["sqnr_db"] > 10
    _assert_reproduces_the_precheck(manifest, logits, values["head"])


def test_bad_input_is_one_line_that_says_what_to_do(bundles):
    artifact, manifest, deploy = bundles["fp16"]
    w8_artifact, w8_manifest, _ = bundles["w8"]
    images = verification_batch(deploy.cfg, 1)
    dynamic = QuantSpec.from_summary(w8_manifest["quantization"])
    cases = [
        ((artifact, manifest | {"target": "onnx"}, deploy, images, ["stem"], None), "not a Core ML one"),
        ((artifact.parent, manifest, deploy, images, ["stem"], None), "not a Core ML package"),
        ((artifact, manifest, deploy, images, ["stem"], dynamic), "pass quant=None"),
        ((w8_artifact, w8_manifest, deploy, images, ["stem"], None), "pass its spec"),
        ((w8_artifact, w8_manifest | {"quantization": {"mode": "qat"}}, deploy, images, ["stem"],
          QuantSpec(mode="qat", calibration=images)), "is QAT: pass its spec with the program made again"),
        ((artifact, manifest, deploy, images, ["stem", "stages.9"], None), "has no module 'stages.9'"),
        ((artifact, manifest, deploy, images, [], None), "name at least one module"),
        ((artifact, manifest, deploy, images[:, :, :64, :64], ["stem"], None), "images must be a float32 batch"),
    ]
    for arguments, says in cases:
        with pytest.raises(EdgevitError) as raised:
            precheck_block_outputs(*arguments)
        assert says in str(raised.value) and "\n" not in str(raised.value)


# ------------------------------------------------------------------------------------- W8A8

@pytest.mark.slow
def test_w8a8_bundle_runs_its_pt2e_program_again_and_refuses_another(bundles, tmp_path):
    from tests.quant.test_pt2e import photo_crops

    photos = photo_crops(get_model_cfg(MODEL), 8)
    request = ExportRequest(MODEL, "coreml", "int8", mode="static", weights=str(bundles["clean"]), out_dir=tmp_path,
                            calibration=Calibration(photos, {"source": "photo_crops(cfg, 8)"}), tolerances=LOOSE)
    artifact, manifest, deploy = _opened(export_model(request).bundle, bundles["clean"])
    # The spec as inspect rebuilds it from the manifest: calibrated on the same images, verified on the rest.
    calibrate_on, held_out = split_held_out(photos, manifest["recipe"]["verify"]["batch"])
    quant = QuantSpec.from_summary(manifest["quantization"], calibrate_on, held_out)
    modules = _modules(deploy)
    values, note = precheck_block_outputs(artifact, manifest, deploy, held_out, modules, quant)

    assert note["method"].startswith(W8A8_PRECHECK) and "activation scales" in note["weights"]
    blocks, logits = _figures(deploy, held_out, values, modules)
    # (these reference weights are hard on int8: no SQNR bound here, only the same computation)
    assert list(values) == modules and all(np.isfinite(v).all() for v in values.values())
    _assert_reproduces_the_precheck(manifest, logits, values["head"])

    # Calibrated on other images, the program is not the bundle's: refused, not inspected.
    other = quant.with_changes(calibration=calibrate_on.flip(-1))
    with pytest.raises(EdgevitError, match="is not levit_128s.mlpackage's"):
        precheck_block_outputs(artifact, manifest, deploy, held_out, modules, other)


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS the Core ML artifact itself gives the logits")
def test_inspect_off_macos_uses_the_precheck_and_says_so(bundles, capsys):
    from edgevit.cli import main

    artifact, _manifest, _deploy = bundles["fp16"]
    assert main(["inspect", str(artifact.parent), "--images", "2"]) == 0
    out = capsys.readouterr().out
    assert FP16_PRECHECK in out and "Core ML runs models only on macOS" in out and "stages" in out
