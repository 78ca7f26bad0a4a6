"""PyTorch eager: the registered model's deploy form, no artifact (the profiler's baseline)."""
from __future__ import annotations

from .base import LoadRequest, RuntimeUnavailable, Session, example_input


def load(request: LoadRequest) -> Session:
    """``options``: ``device`` ("cpu" or "cuda")."""
    import torch

    device = request.options.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailable(f"torch {torch.__version__} sees no CUDA device here")
    if not request.model:
        raise RuntimeUnavailable("the torch runtime needs --model (it runs the deploy form, not an artifact)")
    from edgevit.models import create_model, to_deploy

    if request.threads:
        torch.set_num_threads(request.threads)
    deploy = to_deploy(create_model(request.model)).eval().to(device)
    shape = [request.batch, *deploy.cfg.input_size]
    fixed = torch.from_numpy(example_input(shape)).to(device)

    def bench():
        with torch.inference_mode():
            return deploy(fixed)

    def run(batch):
        with torch.inference_mode():
            return deploy(torch.from_numpy(batch).to(device)).float().cpu().numpy()

    return Session(run, bench, shape, torch.get_num_threads())
