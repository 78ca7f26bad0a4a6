"""Fine-tuning for real on Fashion-MNIST, then the same weights evaluated in PyTorch and through
an exported ONNX artifact; DDP under torchrun; the trained-weights metadata round trip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import edgevit
from edgevit.cli import main
from edgevit.data.fashion_mnist import write_image_folder
from edgevit.core.errors import EdgevitError
from edgevit.pipeline.evaluate import evaluate, map_labels
from edgevit.models import load_checkpoint
from edgevit.training import fine_tune, save_trained, trained_metadata, trained_overrides
from tests.data import require_fashion_mnist
from tests.test_cli import assert_one_line_error

REPO_ROOT = Path(__file__).resolve().parents[2]
# LeViT-128S is the fastest family to train here; at 32×32 its stem leaves 2×2 tokens, enough
# for Fashion-MNIST. One epoch over 1280 images reaches ~70 % test top-1 (chance: 10 %).
MODEL, SIZE = "levit_128s", 32
TRAIN = ["--input-size", str(SIZE), "--steps", "40", "--batch-size", "32", "--lr", "2e-3", "--limit", "1280",
         "--eval-limit", "1000"]


@pytest.fixture(scope="module")
def one_thread():
    # One thread: on a busy 2-core machine, two OpenMP threads per process spin against other
    # work and a 10-second run can take minutes; alone, the difference is small.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """(weights, figures) of a real short fine-tuning run through `edgevit train`."""
    require_fashion_mnist()
    out = tmp_path_factory.mktemp("trained")
    weights, figures = out / "levit.safetensors", out / "figures.json"
    assert main(["train", MODEL, "--data", "fashion-mnist", *TRAIN, "--out", str(weights), "--json", str(figures)]) == 0
    return weights, json.loads(figures.read_text())


def test_short_training_run_learns(trained, capsys):
    weights, figures = trained
    assert figures["world_size"] == 1 and figures["steps"] == 40 and figures["train_images"] == 1280
    assert figures["final_loss"] < figures["first_loss"] - 0.8
    assert figures["eval_images"] == 1000 and figures["eval_top1"] > 40, figures
    assert trained_overrides(weights) == {"num_classes": 10, "input_size": (3, SIZE, SIZE), "labels": "fashion-mnist"}
    assert trained_metadata(weights)["class_names"][0] == "T-shirt/top"


def test_pytorch_and_onnx_artifact_agree(trained, tmp_path, capsys):
    weights, figures = trained
    # The same 1000 test images as the training run's evaluation: the same top-1.
    same = evaluate(MODEL, "fashion-mnist", weights=str(weights), limit=1000)
    assert abs(same["top1"] - figures["eval_top1"]) <= 0.2 and same["images"] == 1000

    folder = tmp_path / "fashion"
    write_image_folder("test", folder, per_class=20)  # sorted folder names ≠ data set order
    torch_result = evaluate(MODEL, folder, weights=str(weights))
    assert torch_result["labels_matched"] == "by name" and torch_result["images"] == 200
    assert torch_result["top1"] > 40 and torch_result["top5"] >= torch_result["top1"]

    assert main(["export", MODEL, "--weights", str(weights), "--target", "onnx", "--out", str(tmp_path / "art")]) == 0
    capsys.readouterr()
    bundle = next((tmp_path / "art").iterdir())
    report = tmp_path / "eval.json"
    assert main(["eval", str(bundle), "--data", str(folder), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "by name" in out
    onnx_result = json.loads(report.read_text())
    assert onnx_result["kind"] == "artifact" and onnx_result["target"] == "onnx" and onnx_result["images"] == 200
    assert abs(onnx_result["top1"] - torch_result["top1"]) <= 1.0, (onnx_result["top1"], torch_result["top1"])
    # the artifact file itself names the same bundle
    assert evaluate(bundle / f"{MODEL}.onnx", "fashion-mnist", limit=100)["images"] == 100


def test_eval_errors_are_one_line(trained, tmp_path, capsys):
    weights, _ = trained
    flat = tmp_path / "flat"
    write_image_folder("test", flat, per_class=1)
    for image in flat.rglob("*.png"):
        image.rename(flat / image.name)
    cases = [
        (["eval", MODEL, "--data", str(flat), "--weights", str(weights)], "no class subfolders"),
        (["eval", str(tmp_path / "nothing.onnx"), "--data", "fashion-mnist"], "not found"),
        (["eval", str(flat), "--data", "fashion-mnist"], "no manifest.json"),
        (["eval", "levit_999", "--data", "fashion-mnist"], "unknown model"),
        (["train", MODEL, "--data", "fashion-mnist", "--out", str(tmp_path / "w.pt")], ".safetensors"),
        (["train", MODEL, "--data", "fashion-mnist", "--steps", "2", "--epochs", "1", "--out", str(tmp_path / "w.safetensors")],
         "not both"),
    ]
    for argv, fragment in cases:
        code = main(argv)
        captured = capsys.readouterr()
        assert_one_line_error(code, captured.out, captured.err, fragment)
        assert code == 2


def test_label_matching():
    assert map_labels(["b", "a"], 3, ["a", "b", "c"]) == ([1, 0], "by name")
    assert map_labels(["T-shirt_top", "ankle BOOT"], 10, ["T-shirt/top", "x", "Ankle boot"])[0] == [0, 2]
    assert map_labels(["x", "y"], 3, ["a", "b", "c"]) == ([0, 1], "by index")
    assert map_labels(["x", "y"], 2, None) == ([0, 1], "by index")
    with pytest.raises(EdgevitError, match="3 classes but the model only 2"):
        map_labels(["x", "y", "z"], 2, None)


def test_ddp_under_torchrun(tmp_path):
    """Two gloo processes on the CPU: sharded data, one saved file that loads."""
    require_fashion_mnist()
    weights, figures = tmp_path / "ddp.safetensors", tmp_path / "ddp.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "edgevit", "train", MODEL, "--data", "fashion-mnist", "--input-size", str(SIZE),
               "--steps", "4", "--batch-size", "16", "--limit", "256", "--eval-limit", "64",
               "--out", str(weights), "--json", str(figures)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(figures.read_text())
    assert result["world_size"] == 2 and result["steps"] == 4 and result["threads"] >= 1
    assert result["eval_images"] == 64  # each process scored half, the counts were summed
    assert done.stdout.count("fine-tuned") == 1  # only rank 0 prints
    model = edgevit.create_model(MODEL, **trained_overrides(weights))
    load_checkpoint(model, weights)
    assert model.cfg.num_classes == 10 and model(torch.randn(1, 3, SIZE, SIZE)).shape == (1, 10)


def test_save_trained_round_trip(tmp_path):
    model = edgevit.create_model(MODEL, num_classes=3, input_size=(3, 48, 48), labels="toys", mean=(0.5, 0.5, 0.5))
    path = save_trained(model, tmp_path / "toys.safetensors", class_names=["ball", "car", "doll"], figures={"steps": 1})
    overrides = trained_overrides(path)
    assert overrides == {"num_classes": 3, "input_size": (3, 48, 48), "labels": "toys", "mean": (0.5, 0.5, 0.5)}
    assert trained_metadata(path)["model"] == MODEL and trained_metadata(path)["class_names"] == ["ball", "car", "doll"]
    rebuilt = edgevit.create_model(MODEL, **overrides)
    load_checkpoint(rebuilt, path)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    # Files without the record: {} (plain safetensors, a torch file, a missing path).
    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    for other in ("plain.safetensors", "plain.pth", "missing.safetensors"):
        assert trained_overrides(tmp_path / other) == {}
    with pytest.raises(EdgevitError, match="2 class names"):
        save_trained(model, tmp_path / "bad.safetensors", class_names=["a", "b"])
    assert not list(tmp_path.glob(".*partial*"))


def test_fine_tune_drives_a_pt2e_qat_graph(one_thread):
    """A PT2E graph switches modes through its own functions, which fine_tune takes as hooks."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 2))
    example = torch.randn(16, 3, 8, 8)  # exported with a static batch: train and score in 16s
    graph = torch.export.export(net, (example,)).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(graph, quantizer)
    images = torch.randn(64, 3, 8, 8)
    labels = (images[:, 0].mean((1, 2)) > 0).long()  # learnable: the sign of channel 0
    switches = []
    figures = fine_tune(prepared, (images, labels), steps=30, batch_size=16, lr=1e-2, progress=False,
                        train_mode=lambda m: (switches.append("train"), move_exported_model_to_train(m)),
                        eval_mode=lambda m: (switches.append("eval"), move_exported_model_to_eval(m)),
                        eval_data=(images, labels))
    assert switches == ["train", "eval"]
    assert figures["final_loss"] < figures["first_loss"] and figures["eval_top1"] > 60


def test_what_training_fits_evaluates_as_fitted(tmp_path, one_thread, capsys):
    """MobileViT v2 (BatchNorm throughout) fitted to 12 images of 3 classes scores on those same
    images in `edgevit eval` what it scored while training: the running statistics are recomputed
    for the final weights (before, 33 % after a 30-step run whose training batches it fitted)."""
    require_fashion_mnist()
    every = tmp_path / "all"
    write_image_folder("train", every, per_class=4)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for folder in sorted(every.iterdir())[:3]:
        folder.rename(tiny / folder.name)
    weights, figures, scores = tmp_path / "fit.safetensors", tmp_path / "fit.json", tmp_path / "eval.json"
    assert main(["train", "mobilevitv2_050", "--data", str(tiny), "--input-size", "64", "--steps", "30",
                 "--batch-size", "4", "--out", str(weights), "--json", str(figures)]) == 0
    trained = json.loads(figures.read_text())
    assert trained["final_loss"] < 0.35 and trained["batchnorm_statistics_images"] == 12
    assert main(["eval", "mobilevitv2_050", "--weights", str(weights), "--data", str(tiny), "--json", str(scores)]) == 0
    result = json.loads(scores.read_text())
    assert result["images"] == 12 and result["labels_matched"] == "by name" and result["top1"] >= 90, result
