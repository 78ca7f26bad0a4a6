"""The deploy form: the same function as the eval model, in fewer, export-friendly operations.

Each family says how its own modules simplify by giving them a ``deploy()`` method that returns
the module to use in their place (a fused conv, a merged head, ``self`` with frozen attention
biases …). :func:`to_deploy` applies those bottom-up to a copy, so a parent's ``deploy()`` sees
its children already in deploy form. The model's outputs must not change beyond float rounding.
"""
from __future__ import annotations

import copy

from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def to_deploy(model: nn.Module) -> nn.Module:
    """A deploy-form copy of ``model`` (eval mode, no gradients); the original is untouched."""
    deployed = _deploy(copy.deepcopy(model).eval())
    leftover = [name for name, m in deployed.named_modules() if isinstance(m, _BatchNorm)]
    if leftover:
        # A family forgot a fusion: fail here rather than ship a slower graph silently.
        raise RuntimeError(f"BatchNorm left unfused in the deploy form: {', '.join(leftover[:5])}")
    deployed.cfg = model.cfg
    deployed.is_deploy = True
    deployed.requires_grad_(False)
    return deployed.eval()


def is_deploy(model: nn.Module) -> bool:
    return bool(getattr(model, "is_deploy", False))


def _deploy(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        replacement = _deploy(child)
        if replacement is not child:
            setattr(module, name, replacement)
    hook = getattr(module, "deploy", None)
    return hook() if callable(hook) else module
