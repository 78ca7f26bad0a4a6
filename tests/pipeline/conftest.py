"""Fixtures shared by the pipeline tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 8 photo-like PNGs at LeViT's input size (crops of the test photos)."""
    from PIL import Image

    from edgevit.models import get_model_cfg
    from tests.quant.test_pt2e import photo_crops

    folder = tmp_path_factory.mktemp("photos")
    cfg = get_model_cfg("levit_128s")
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for i, crop in enumerate(photo_crops(cfg, 8)):
        pixels = ((crop * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder
