"""Every parity reference: its checkpoint, written as its source publishes it, loads through
edgevit's loader and reproduces the reference implementation's output."""
import pytest
import torch

from edgevit.models import create_model, to_deploy
from tests.reference_data import (
    REFERENCE_MODELS,
    load_reference,
    max_relative_error,
    reference_expected,
    reference_input,
    require_reference_dir,
    write_as_published,
)

TOLERANCE = 1e-4  # relative to the output's largest magnitude (the bound)


def test_every_reference_file_is_covered():
    on_disk = {p.stem for p in (require_reference_dir() / "parity").glob("*.json")}
    assert on_disk == set(REFERENCE_MODELS), "map new reference files to a model in tests/reference_data.py"


@pytest.mark.parametrize("stem", sorted(REFERENCE_MODELS))
def test_reference_parity(stem, tmp_path):
    model_name = REFERENCE_MODELS[stem]
    reference = load_reference(stem)
    path = write_as_published(stem, tmp_path)
    model = create_model(model_name, pretrained=str(path))
    assert model.cfg.source_params == reference["params"]

    x, expected = reference_input(stem), reference_expected(stem)
    with torch.no_grad():
        eval_error = max_relative_error(model(x), expected)
        deploy_error = max_relative_error(to_deploy(model)(x), expected)
    assert eval_error < TOLERANCE, f"{stem}: eval model off by {eval_error:.2e}"
    assert deploy_error < TOLERANCE, f"{stem}: deploy form off by {deploy_error:.2e}"
