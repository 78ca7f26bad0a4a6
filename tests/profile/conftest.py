"""Shared fixtures: one real ONNX export through the pipeline, a tiny real .pte, the CLI."""
import pytest
import torch

from edgevit.cli import app, main
from edgevit.pipeline.export import ExportRequest, export_model
from edgevit.cli.profile import profile_group

# Few runs keep the folder fast; the protocol itself (>= 50 runs) is the CLI's default.
FAST = ["--runs", "10", "--max-warmup", "10"]


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory):
    """levit_128s exported to ONNX by the real pipeline (the fastest of the four families)."""
    out = tmp_path_factory.mktemp("artifacts")
    export_model(ExportRequest("levit_128s", "onnx", out_dir=out))
    return out


@pytest.fixture(scope="session")
def tiny_pte(tmp_path_factory):
    """A small conv net lowered to XNNPACK: a real ExecuTorch program in seconds."""
    pytest.importorskip("executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    path.write_bytes(to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    return path


@pytest.fixture
def cli(capsys):
    """``edgevit …`` through the real entry point, with the profile group registered as cli.py will."""
    if "profile" not in app.commands:
        app.add_command(profile_group)

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
