"""The Core ML target: ML programs converted from torch.export, with the precision, deployment
target, image input and labels asked for; verified by MLModel.predict on macOS and by the
float16/float32 numerics pre-check elsewhere, which flags float16 overflow."""
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ct = pytest.importorskip("coremltools", reason="the coreml extra is not installed (pip install -e '.[coreml]')")

from edgevit.core.errors import EdgevitError  # noqa: E402
from edgevit.targets import TARGETS  # noqa: E402
from edgevit.runtimes import RuntimeUnavailable  # noqa: E402
from edgevit import runtimes  # noqa: E402
from edgevit.runtimes.coreml import class_labels  # noqa: E402
from edgevit.targets.coreml import export, precheck  # noqa: E402
from edgevit.core.bundle import MANIFEST_NAME  # noqa: E402
from edgevit.pipeline.export import ExportRequest, export_model  # noqa: E402
from edgevit.verify import compare_outputs, verification_batch  # noqa: E402
from edgevit.targets.recipes import resolve_recipe  # noqa: E402
from edgevit.models import get_model_cfg  # noqa: E402
from tests.reference_data import write_as_published  # noqa: E402

ON_MACOS = platform.system() == "Darwin"
OFF_MACOS_REASON = "Core ML runs models only on macOS; elsewhere the numerics pre-check stands in (tested here)"

# The smallest size of each family, with the shared reference checkpoint it loads (so norms,
# layer scales and attention biases are not at their initial values, where float16 underflows).
SMALLEST = [
    ("mobilevitv2_050", "timm__mobilevitv2_050"),
    ("efficientformer_l1", "timm__efficientformer_l1"),
    ("levit_128s", "timm__levit_128s"),
    ("edgevit_xxs", "saic__edgevit_xxs"),
]


def _options(precision="fp16", **changes):
    return {**resolve_recipe(None, "coreml", precision).options, **changes}


class _TinyNet(nn.Module):
    """conv → GELU → pool → linear: a real model small enough to convert in a second."""

    def __init__(self, cfg_of="efficientformer_l1", num_classes=5):
        super().__init__()
        self.cfg = get_model_cfg(cfg_of).replace(name="tiny", input_size=(3, 32, 32), num_classes=num_classes)
        self.conv, self.head = nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(nn.functional.gelu(self.conv(x)).mean((2, 3)))


def _spec(path):
    return ct.utils.load_spec(str(path))


# ------------------------------------------------------------------------- every family, fp16

@pytest.mark.parametrize("model,stem", SMALLEST)
def test_smallest_sizes_export_as_float16_ml_programs_that_pass_the_precheck(model, stem, tmp_path):
    weights = write_as_published(stem, tmp_path)
    outcome = export_model(ExportRequest(model, "coreml", "fp16", weights=str(weights), out_dir=tmp_path / "out"))
    v = outcome.verification
    if ON_MACOS:
        assert v["check"] == TARGETS["coreml"].runtime
    else:
        assert v["check"].startswith("fp16 numerics pre-check") and "Core ML runs only on macOS" in v["check"]
        assert any(n.startswith("no intermediate beyond the float16 range") for n in v["notes"])
        top = next(n for n in v["notes"] if n.startswith("largest op-local float16 relative error"))
        assert top.count(";") == 4  # five modules named
    assert v["passed"] and v["finite"] and v["cosine"] >= 0.9999 and v["top1_agreement"] == 1.0

    # A real package: a folder with its manifest, weights and the saved spec.
    assert outcome.artifact.suffix == ".mlpackage" and outcome.artifact.is_dir()
    assert (outcome.artifact / "Manifest.json").is_file() and (outcome.bundle / MANIFEST_NAME).is_file()
    assert list(outcome.artifact.rglob("weight.bin"))
    cfg = get_model_cfg(model)
    details = outcome.manifest["target_details"]
    assert details["inputs"] == [{"name": "input", "type": "multiArrayType", "shape": [1, *cfg.input_size], "dtype": "float32"}]
    assert details["outputs"] == [{"name": "logits", "type": "multiArrayType", "shape": [1, 1000], "dtype": "float32"}]
    assert details["deployment_target"] == "iOS17" and details["opset"] == "CoreML7"
    # Everything computes in float16 except the one cast of the output back to float32.
    assert details["compute_dtypes"]["float32"] == 1 and details["float32_compute_ops"] == {}
    assert details["compute_dtypes"]["float16"] == details["ops"] - 1
    assert set(details["weight_dtypes"]) == {"float16"}
    assert details["labels"]["embedded"] is False and "not bundled" in details["labels"]["note"]
    spec = _spec(outcome.artifact)
    assert spec.WhichOneof("Type") == "mlProgram" and class_labels(spec) is None
    assert spec.description.metadata.userDefined["edgevit.model"] == model


# --------------------------------------------------------------- fp32, image input, targets

def test_float32_image_input_export_checks_the_converted_program(tmp_path):
    outcome = export_model(ExportRequest("levit_128s", "coreml", "fp32", out_dir=tmp_path, options={"image_input": True, "deployment_target": "iOS16"}))
    v = outcome.verification
    if not ON_MACOS:
        assert v["check"].startswith("fp32 pre-check: converted torch.export program")
    assert v["passed"] and v["max_rel_error"] < 1e-4
    details = outcome.manifest["target_details"]
    assert details["inputs"] == [{"name": "image", "type": "imageType", "shape": [224, 224], "color_space": "RGB"}]
    assert details["opset"] == "CoreML6" and details["specification_version"] == 7
    assert set(details["compute_dtypes"]) == {"float32"} and set(details["weight_dtypes"]) == {"float32"}
    _check_image_preprocessing(outcome.artifact, get_model_cfg("levit_128s"), "fp32")


def _photo(height, width):
    from PIL import Image

    import sklearn

    path = Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg"
    return np.asarray(Image.open(path).convert("RGB").resize((width, height)), dtype=np.float64)


def _const(op):
    tensor = op.attributes["val"].immediateValue.tensor
    if tensor.HasField("bytes"):  # float16 constants are stored as raw bytes
        return np.frombuffer(tensor.bytes.values, dtype=np.float16)
    return np.array(tensor.floats.values, dtype=np.float32)


def _preprocess_like_the_artifact(spec, pixels):
    """Run the program's ops from the image input up to the first op that is not an elementwise
    mul/add/cast: the ImageType's scale and bias, then the in-model 1/std multiply."""
    from coremltools.proto import MIL_pb2

    function = spec.mlProgram.functions["main"]
    values = {spec.description.input[0].name: pixels.astype(np.float32)}
    result = None
    for op in function.block_specializations[function.opset].operations:
        out = op.outputs[0]
        dtype = MIL_pb2.DataType.Name(out.type.tensorType.dataType)
        if op.type == "const":
            if dtype in ("FLOAT32", "FLOAT16") and op.attributes["val"].HasField("immediateValue"):  # not weights
                shape = [d.constant.size for d in out.type.tensorType.dimensions]
                values[out.name] = _const(op).reshape(shape)
            continue
        if op.type not in ("mul", "add", "cast"):
            break
        x = values[op.inputs["x"].arguments[0].name]
        if op.type == "cast":
            result = x
        else:
            y = values[op.inputs["y"].arguments[0].name]
            result = x * y if op.type == "mul" else x + y
        values[out.name] = result = result.astype(np.float16 if dtype == "FLOAT16" else np.float32)
    return result


def _check_image_preprocessing(artifact, cfg, precision):
    spec = _spec(artifact)
    assert spec.description.input[0].type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    _, height, width = cfg.input_size
    pixels = _photo(height, width).transpose(2, 0, 1)[None]  # RGB 0-255, NCHW
    expected = (pixels / 255.0 - np.array(cfg.mean).reshape(1, 3, 1, 1)) / np.array(cfg.std).reshape(1, 3, 1, 1)
    got = _preprocess_like_the_artifact(spec, pixels).astype(np.float64)
    # float16 holds about 3 decimal digits: 2^-11 of values up to ~2.6.
    tolerance = 3e-3 if precision == "fp16" else 1e-5
    np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    assert got.std() > 0.1  # a photo, not a constant


@pytest.mark.parametrize("cfg_of,precision", [("efficientformer_l1", "fp16"), ("efficientformer_l1", "fp32"),
                                              ("mobilevitv2_050", "fp16")])
def test_image_input_folds_the_models_normalisation(cfg_of, precision, tmp_path):
    model = _TinyNet(cfg_of).eval()
    example = verification_batch(model.cfg, 1)
    result = export(model, example, precision, _options(precision, image_input=True), tmp_path)
    folded = result.details["image_preprocessing"]
    assert folded["pixels"] == "RGB, 0-255" and folded["scale"] == pytest.approx(1 / 255)
    assert folded["bias"] == [-m for m in model.cfg.mean]
    if cfg_of == "mobilevitv2_050":  # mean 0, std 1: nothing left for the model to do
        assert folded["in_model_multiply"] is None
    else:
        assert folded["in_model_multiply"] == pytest.approx([1 / s for s in model.cfg.std])
    _check_image_preprocessing(result.path, model.cfg, precision)


def test_every_deployment_target_in_the_table_sets_the_program_version(tmp_path):
    expected = {"iOS16": "CoreML6", "macOS13": "CoreML6", "iOS17": "CoreML7", "macOS14": "CoreML7",
                "iOS18": "CoreML8", "macOS15": "CoreML8"}
    choices = TARGETS["coreml"].option("deployment_target").choices
    assert set(choices) == set(expected)
    model = _TinyNet().eval()
    for target in choices:
        out = tmp_path / target
        out.mkdir()
        result = export(model, verification_batch(model.cfg, 1), "fp32", _options("fp32", deployment_target=target), out)
        assert result.details["deployment_target"] == target and result.details["opset"] == expected[target]


# ---------------------------------------------------------------------------------- labels

def test_labels_file_makes_a_classifier_and_bad_files_are_refused(tmp_path):
    model = _TinyNet().eval()
    example = verification_batch(model.cfg, 1)
    labels = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead"]
    good = tmp_path / "labels.txt"
    good.write_text("\n".join(labels) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    result = export(model, example, "fp16", _options(labels_file=str(good)), out)
    spec = _spec(result.path)
    assert spec.description.predictedFeatureName == "classLabel"
    assert class_labels(spec) == labels
    assert result.details["labels"] == {"embedded": True, "count": 5, "source": "labels.txt",
                                        "note": "classLabel_probs holds the logits (no softmax)"}

    short = tmp_path / "short.txt"
    short.write_text("\n".join(labels[:4]))
    with pytest.raises(EdgevitError, match="has 4 lines .* 5 classes"):
        export(model, example, "fp16", _options(labels_file=str(short)), out)
    with pytest.raises(EdgevitError, match="cannot read labels file"):
        export(model, example, "fp16", _options(labels_file=str(tmp_path / "missing.txt")), out)


# ----------------------------------------------------------------------- float16 overflow

class _HotAttention(nn.Module):
    """Attention whose QKᵀ reaches ~1e6 inside forward (no module outputs it); the softmax
    brings it back, so float32 is fine and float16 gives inf - inf = NaN."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(3, 16), nn.Linear(3, 16)
        self.head = nn.Linear(3, 10)
        with torch.no_grad():
            self.q.weight.mul_(300.0)
            self.k.weight.mul_(300.0)

    def forward(self, x):
        tokens = x.flatten(2).transpose(1, 2)  # (B, 64, 3)
        attn = (self.q(tokens) @ self.k(tokens).transpose(1, 2)).softmax(-1)
        return self.head((attn @ tokens).mean(1))


class _LoudNorm(nn.Module):
    """Activations of a few hundred (fine in float16) whose mean square is not."""

    def __init__(self):
        super().__init__()
        self.norm, self.head = nn.LayerNorm(64), nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.norm(400.0 * x.flatten(2)).mean(1))


def test_precheck_flags_float16_overflow_inside_a_module():
    model = _HotAttention().eval()
    example = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    result = precheck(None, model, example, "fp16")
    overflow = next(n for n in result.notes if n.startswith("OVERFLOW:"))
    assert "_HotAttention" in overflow and "aten.bmm" in overflow
    assert np.isfinite(result.reference).all() and not np.isfinite(result.candidate).all()
    assert compare_outputs(result.reference, result.candidate)["finite"] is False  # fails verification
    assert any(n.startswith("NaN/Inf first appears in float16 at") for n in result.notes)
    assert result.failures and "overflow float16" in result.failures[0]


def test_precheck_flags_normalisation_statistics_beyond_float16():
    model = _LoudNorm().eval()
    result = precheck(None, model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), "fp16")
    assert not any(n.startswith("OVERFLOW:") for n in result.notes)  # every value fits …
    risk = next(n for n in result.notes if n.startswith("OVERFLOW RISK"))  # … its mean square does not
    assert "norm (LayerNorm)" in risk and "aten.native_layer_norm" in risk
    assert result.failures == []  # a risk is reported, not failed: Core ML's internal precision is unknown


class _SpikyGroupNorm(nn.Module):
    """MobileViT v2's GroupNorm(1) with one channel near 400: every value fits float16, but
    square(x − mean), which coremltools computes as its own float16 tensor, does not."""

    def __init__(self):
        super().__init__()
        self.norm, self.head = nn.GroupNorm(1, 4), nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.norm(torch.cat([x, 400.0 + x[:, :1]], 1)).mean((2, 3)))


def test_precheck_flags_group_norm_overflow_as_core_ml_computes_it():
    model = _SpikyGroupNorm().eval()
    result = precheck(None, model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), "fp16")
    overflow = next(n for n in result.notes if n.startswith("OVERFLOW:"))
    assert "norm (GroupNorm) (square(x - mean) of GroupNorm in Core ML)" in overflow
    # Emulated like the lowered graph, the norm collapses (x / inf): verification fails.
    assert compare_outputs(result.reference, result.candidate)["cosine"] < 0.9999


# ------------------------------------------------------------------------------ runtime

@pytest.mark.skipif(ON_MACOS, reason="on macOS the runner is real (tested below)")
def test_runner_off_macos_says_core_ml_is_unavailable(tmp_path):
    with pytest.raises(RuntimeUnavailable, match="Core ML runs only on macOS"):
        runtimes.load("coreml", tmp_path / "tiny.mlpackage", options=_options())


@pytest.mark.skipif(not ON_MACOS, reason=OFF_MACOS_REASON)
@pytest.mark.parametrize("precision,image_input", [("fp16", False), ("fp32", False), ("fp16", True)])
def test_predictions_on_macos_agree_with_pytorch(precision, image_input, tmp_path):
    from edgevit.models import create_model, to_deploy

    outcome = export_model(ExportRequest("levit_128s", "coreml", precision, out_dir=tmp_path, verify=False, options={"image_input": image_input}))
    model = to_deploy(create_model("levit_128s"))
    cfg = model.cfg
    # Whole 8-bit pixels, so that an image input sees exactly the batch PyTorch sees.
    pixels = torch.randint(0, 256, (3, *cfg.input_size), generator=torch.Generator().manual_seed(0)) / 255.0
    batch = (pixels - torch.tensor(cfg.mean).view(1, 3, 1, 1)) / torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        reference = model(batch).numpy()
    figures = compare_outputs(reference, runtimes.load("coreml", outcome.artifact).run(batch.numpy()))
    if precision == "fp32" and not image_input:
        assert figures["max_rel_error"] < 1e-4
    assert figures["cosine"] >= 0.9999 and figures["top1_agreement"] == 1.0
