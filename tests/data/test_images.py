"""Image folders, every image mode, calibration samples, and the eval transform itself."""
import io
import math
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edgevit.cli import main
from edgevit.data.images import (
    ImageFolder,
    Preprocessing,
    calibration_batch,
    open_rgb,
    preprocess,
    to_rgb,
)
from edgevit.core.errors import EdgevitError
from edgevit.models import get_model_cfg
from tests.test_cli import assert_one_line_error

CFG = Preprocessing(input_size=(3, 32, 32), crop_pct=0.9, interpolation="bicubic",
                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def photo(width=48, height=40, seed=0) -> Image.Image:
    """A smooth colour image (gradients plus noise), so resizing has something to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) + 64], -1)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def rgb_at(image, xy=(0, 0)):
    return tuple(int(v) for v in np.asarray(to_rgb(image))[xy[1], xy[0]])


def reopened(image: Image.Image, fmt: str, **save) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    buffer.seek(0)
    return Image.open(buffer)


# ----------------------------------------------------------------------------- modes


def test_sixteen_bit_png_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    image = reopened(Image.fromarray(values), "PNG")
    assert image.mode.startswith("I")  # Pillow's 16-bit mode, from a real 16-bit PNG
    grey = np.asarray(to_rgb(image))[0, :, 0]
    assert grey.tolist() == [0, 1, 128, 255]  # round(v * 255 / 65535)


def test_mode_i_and_f():
    wide = Image.fromarray(np.array([[-5, 32768, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    floats = Image.fromarray(np.array([[-3.0, 127.6, 300.0]], dtype=np.float32))
    assert floats.mode == "F"
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_greyscale_and_bilevel():
    assert rgb_at(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    bilevel = reopened(Image.new("1", (4, 4), 1), "PNG")
    assert bilevel.mode == "1"
    assert rgb_at(bilevel) == (255, 255, 255)
    assert rgb_at(reopened(Image.new("1", (4, 4), 0), "PNG")) == (0, 0, 0)


def test_cmyk_jpeg():
    image = reopened(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=100)
    assert image.mode == "CMYK"
    red, green, blue = rgb_at(image, (8, 8))
    assert red > 240 and green < 15 and blue < 15


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 1), (200, 10, 10, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black
    image = reopened(rgba, "PNG")
    assert image.mode == "RGBA"
    assert rgb_at(image, (0, 0)) == (200, 10, 10)
    assert rgb_at(image, (1, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in rgb_at(image, (2, 0)))
    grey_alpha = reopened(Image.new("LA", (2, 2), (0, 0)), "PNG")
    assert rgb_at(grey_alpha) == (255, 255, 255)


def test_palette_with_transparency():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 255] + [0, 0, 0] * 255)  # index 0 blue, index 1 black
    palette.putpixel((1, 0), 1)
    image = reopened(palette, "PNG", transparency=1)
    assert image.mode == "P" and "transparency" in image.info
    assert rgb_at(image, (0, 0)) == (0, 0, 255)
    assert rgb_at(image, (1, 0)) == (255, 255, 255)  # the transparent index, not its black
    plain = reopened(palette, "PNG")
    assert rgb_at(plain, (1, 0)) == (0, 0, 0)


# ----------------------------------------------------------------------------- the transform


def test_preprocess_matches_an_independent_computation():
    """timm's eval transform computed another way: the resize size and crop box from the
    definition, the pixels through Pillow directly, and torch's antialiased bicubic as a check
    that the resize is the right one."""
    image = photo(width=75, height=50)
    size, crop_pct = 32, 0.9
    scale = math.floor(size / crop_pct)  # 35: the shorter side
    new_width = int(scale * 75 / 50)  # 52
    resized = image.resize((new_width, scale), Image.Resampling.BICUBIC)
    top, left = round((scale - size) / 2), round((new_width - size) / 2)
    pixels = np.asarray(resized, dtype=np.float32)[top:top + size, left:left + size] / 255.0
    expected = (pixels - np.array(CFG.mean)) / np.array(CFG.std)
    got = preprocess(image, CFG)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-5)

    as_tensor = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    torch_resized = F.interpolate(as_tensor, size=(scale, new_width), mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 255).round()[0, :, top:top + size, left:left + size]
    mean = torch.tensor(CFG.mean).view(3, 1, 1)
    std = torch.tensor(CFG.std).view(3, 1, 1)
    assert ((torch_resized / 255 - mean) / std - got).abs().mean() < 0.02


def test_preprocess_uses_the_config_and_non_square_inputs():
    cfg = get_model_cfg("mobilevitv2_050")  # mean 0, std 1: plain [0, 1] pixels
    image = photo(60, 60)
    got = preprocess(image, cfg)
    assert got.shape == tuple(cfg.input_size)
    assert 0.0 <= float(got.min()) and float(got.max()) <= 1.0
    wide = Preprocessing((3, 16, 24), 1.0, "bilinear", (0.5,) * 3, (0.5,) * 3)
    assert preprocess(photo(50, 20), wide).shape == (3, 16, 24)
    with pytest.raises(EdgevitError, match="unknown interpolation"):
        preprocess(image, Preprocessing((3, 8, 8), 0.9, "sinc", (0,) * 3, (1,) * 3))


# ----------------------------------------------------------------------------- folders


def save_odd_images(folder):
    """One file of each awkward kind; returns (readable names, unreadable names)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo(seed=1).save(folder / "rgb.jpg")
    photo(seed=2).convert("L").save(folder / "grey.png")
    Image.new("CMYK", (30, 30), (10, 200, 30, 5)).save(folder / "cmyk.jpg")
    photo(seed=3).convert("RGBA").save(folder / "rgba.png")
    palette = photo(seed=4).convert("P")
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray((np.arange(900, dtype=np.uint16).reshape(30, 30) * 70)).save(folder / "deep.png")
    photo(seed=5).convert("1").save(folder / "bilevel.png")
    whole = io.BytesIO()
    photo(200, 200, seed=6).save(whole, format="JPEG")
    (folder / "truncated.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 3])
    (folder / "notes.jpg").write_text("this is not an image\n")
    (folder / "README.txt").write_text("ignored: not an image suffix\n")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden")
    readable = ["bilevel.png", "cmyk.jpg", "deep.png", "grey.png", "palette.png", "rgb.jpg", "rgba.png"]
    return readable, ["notes.jpg", "truncated.jpg"]


def test_calibration_reads_every_mode_and_skips_broken_files(tmp_path):
    readable, broken = save_odd_images(tmp_path / "calib")
    seen = []
    sample = calibration_batch(tmp_path / "calib", CFG, count=20, progress=lambda done, total: seen.append(done))
    assert sorted(sample.files) == readable
    assert sorted(name for name, _ in sample.skipped) == broken
    assert sample.tensor.shape == (len(readable), 3, 32, 32) and torch.isfinite(sample.tensor).all()
    assert seen and seen[-1] == len(readable)
    summary = sample.summary()
    assert summary["images"] == len(readable) and summary["requested"] == 20
    assert summary["skipped"]["count"] == 2 and any("truncated.jpg" in f for f in summary["skipped"]["files"])
    assert summary["preprocessing"]["crop_pct"] == 0.9 and summary["seed"] == 0 and len(summary["sha256"]) == 64
    assert sample.warnings == [f"asked for 20 images, {tmp_path / 'calib'} has only 7 readable (2 skipped); using 7"]
    for name in readable:
        assert open_rgb(tmp_path / "calib" / name).mode == "RGB"


def test_skipped_images_are_replaced_by_others(tmp_path):
    save_odd_images(tmp_path / "calib")
    sample = calibration_batch(tmp_path / "calib", CFG, count=7, seed=1)
    assert len(sample.files) == 7 and len(sample.skipped) == 2 and sample.warnings == []


def test_fewer_images_than_asked(tmp_path):
    for i in range(3):
        photo(seed=i).save(tmp_path / f"{i}.png")
    sample = calibration_batch(tmp_path, CFG, count=10)
    assert len(sample.files) == 3 and sample.tensor.shape[0] == 3
    assert sample.warnings == [f"asked for 10 images, {tmp_path} has only 3; using 3"]


def make_folder(root, names, reverse=False):
    root.mkdir(parents=True)
    for name in (reversed(names) if reverse else names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        photo(20, 20, seed=len(name)).save(root / name)


def test_fixed_seed_sample_is_deterministic_and_independent_of_listing_order(tmp_path):
    names = [f"img{i:02d}.png" for i in range(30)]
    shuffled = names[:]
    random.Random(7).shuffle(shuffled)
    make_folder(tmp_path / "a", names)
    make_folder(tmp_path / "b", shuffled, reverse=True)
    first = ImageFolder(tmp_path / "a", CFG).sample(8, seed=3).files
    assert ImageFolder(tmp_path / "a", CFG).sample(8, seed=3).files == first
    assert ImageFolder(tmp_path / "b", CFG).sample(8, seed=3).files == first
    assert ImageFolder(tmp_path / "a", CFG).sample(8, seed=4).files != first
    a = calibration_batch(tmp_path / "a", CFG, 8, seed=3)
    b = calibration_batch(tmp_path / "b", CFG, 8, seed=3)
    assert a.files == first == b.files and torch.equal(a.tensor, b.tensor)
    assert a.summary()["sha256"] == b.summary()["sha256"]
    photo(20, 20, seed=99).save(tmp_path / "b" / first[0])  # same names, other bytes
    assert calibration_batch(tmp_path / "b", CFG, 8, seed=3).summary()["sha256"] != a.summary()["sha256"]


def test_flat_and_class_layouts(tmp_path):
    make_folder(tmp_path / "flat", ["x.png", "y.jpg"])
    flat = ImageFolder(tmp_path / "flat", CFG)
    assert flat.files == ["x.png", "y.jpg"] and flat.labels is None and flat.classes == []
    loaded = flat.load()
    assert loaded.tensor.shape == (2, 3, 32, 32) and loaded.labels is None

    make_folder(tmp_path / "classes", ["zebra/1.png", "ant/2.png", "ant/deeper/3.png", "loose.png", ".git/4.png"])
    folder = ImageFolder(tmp_path / "classes", CFG)
    assert folder.classes == ["ant", "zebra"]
    assert folder.files == ["ant/2.png", "ant/deeper/3.png", "zebra/1.png"] and folder.labels == [0, 0, 1]
    assert folder.notes and "no class folder" in folder.notes[0]
    loaded = folder.load()
    assert loaded.labels.tolist() == [0, 0, 1]
    batches = list(folder.batches(2))
    assert [len(b.files) for b in batches] == [2, 1]


@pytest.mark.parametrize("make, message", [
    (lambda root: None, "image folder not found"),
    (lambda root: root.mkdir(), "no image files"),
    (lambda root: (root.mkdir(), (root / "a.txt").write_text("x")), "no image files"),
    (lambda root: (root.mkdir(), (root / "a.png").write_text("x"), (root / "b.jpg").write_bytes(b"\xff\xd8")),
     "no readable images"),
])
def test_folder_errors(tmp_path, make, message):
    root = tmp_path / "calib"
    make(root)
    with pytest.raises(EdgevitError, match=message):
        calibration_batch(root, CFG, 4)


def test_a_file_is_not_a_folder(tmp_path):
    photo().save(tmp_path / "one.png")
    with pytest.raises(EdgevitError, match="is not a folder"):
        ImageFolder(tmp_path / "one.png", CFG)
    with pytest.raises(EdgevitError, match="at least 1"):
        calibration_batch(tmp_path, CFG, 0)


def test_cli_reports_bad_folders_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken" / "cls"
    broken.mkdir(parents=True)
    (broken / "a.jpg").write_text("not a jpeg")
    cases = [
        (["eval", "levit_128s", "--data", str(tmp_path / "missing")], "image folder not found"),
        (["eval", "levit_128s", "--data", str(tmp_path / "empty")], "no image files"),
        (["eval", "levit_128s", "--data", str(tmp_path / "broken")], "no readable images"),
        (["train", "levit_128s", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "w.safetensors")],
         "no image files"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        out, err = capsys.readouterr()
        assert_one_line_error(code, out, err, fragment)
        assert code == 2, (argv, err)
    shutil.rmtree(tmp_path / "broken")
