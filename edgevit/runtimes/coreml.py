"""Core ML: ``coremltools.models.MLModel.predict`` (macOS only). The metadata keys and output
names read here are the ones ``edgevit.targets.coreml`` writes."""
from __future__ import annotations

import json
import platform

from .base import ArtifactError, LoadRequest, RuntimeUnavailable, Session, captured_stderr, example_input, run_in_chunks

METADATA_PREFIX = "edgevit."
OUTPUT_NAME = "logits"
CLASS_LABEL_NAME = "classLabel"


def class_labels(spec) -> list[str] | None:
    """The labels of a classifier ML program, in class order (None for a plain logits model)."""
    function = spec.mlProgram.functions["main"]
    for op in operations(function.block_specializations[function.opset]):
        if op.type == "classify":
            classes = op.inputs["classes"].arguments[0].value.immediateValue.list.values
            return [value.immediateValue.tensor.strings.values[0] for value in classes]
    return None


def operations(block):
    """Every operation of an ML program block, nested blocks included."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from operations(inner)


def load(request: LoadRequest) -> Session:
    if platform.system() != "Darwin":
        raise RuntimeUnavailable(f"Core ML runs only on macOS/iOS, not on {platform.system()}")
    import coremltools as ct
    import numpy as np

    path = str(request.artifact)
    spec = ct.utils.load_spec(path)
    metadata = dict(spec.description.metadata.userDefined)
    # fp32 programs run on the CPU, for verification and timing alike: on the GPU or the Neural
    # Engine they would compute in float16, which is not the artifact; fp16 ones on every unit,
    # as they would in an app.
    units = ct.ComputeUnit.CPU_ONLY if metadata.get(METADATA_PREFIX + "precision") == "fp32" else ct.ComputeUnit.ALL
    with captured_stderr():
        model = ct.models.MLModel(path, compute_units=units)
    feature = spec.description.input[0]
    is_image = feature.type.WhichOneof("Type") == "imageType"
    mean = np.array(json.loads(metadata[METADATA_PREFIX + "mean"]), dtype=np.float32).reshape(-1, 1, 1)
    std = np.array(json.loads(metadata[METADATA_PREFIX + "std"]), dtype=np.float32).reshape(-1, 1, 1)
    labels = class_labels(spec)
    if is_image:
        try:
            from PIL import Image  # coremltools takes image inputs as PIL images
        except ImportError:
            raise ArtifactError("running a Core ML model with an image input needs Pillow: pip install pillow") from None

    def feed_of(sample):
        if is_image:
            # Back to the 0-255 pixels the normalised sample came from, rounded to 8 bits.
            pixels = np.clip(np.rint((sample * std + mean) * 255.0), 0, 255).astype(np.uint8)
            return {feature.name: Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))}
        return {feature.name: sample[None]}

    def run_one(chunk):  # the program has a fixed batch of 1
        prediction = model.predict(feed_of(chunk[0].astype(np.float32)))
        if labels:
            scores = prediction[f"{CLASS_LABEL_NAME}_probs"]
            return np.array([[scores[label] for label in labels]], dtype=np.float32)
        return np.asarray(prediction[OUTPUT_NAME], dtype=np.float32).reshape(1, -1)

    shape = ([1, 3, feature.type.imageType.height, feature.type.imageType.width] if is_image
             else list(feature.type.multiArrayType.shape))
    fixed = feed_of(example_input(shape)[0])
    return Session(lambda batch: run_in_chunks(run_one, batch, 1), lambda: model.predict(fixed), shape, None,
                   {"compute_units": str(units)})
