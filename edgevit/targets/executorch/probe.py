"""Inner tensors and per-block times of an ExecuTorch program, which XNNPACK hides.

An XNNPACK delegate runs its subgraph as one call: its inner tensors never reach the method's
outputs, and its profiling events carry no debug handles that would map them to graph nodes
(ExecuTorch 1.5.1, see :mod:`edgevit.profile.layers`). So the graph a .pte was lowered from
(:func:`lowering_input`, the one the export uses) is lowered again, with the same recipe:

- **numerics**: once, with every module boundary added as a method output
  (:func:`with_boundary_outputs`). The delegate computes each op as in the artifact and hands the
  boundary tensors out as well; the program's first output is still the logits, so the caller
  can check that the re-lowered program reproduces the artifact.
- **time**: once per boundary, the prefix of the graph that ends there (:func:`prefix`). A block's
  time is its prefix's median minus the one before (one more lowering per boundary: seconds each).

A module's boundary is the last graph node run inside it; in an int8 graph, where that value is
quantized and dequantized on its way to the next block, the dequantized value (what the next
block reads in the deployed program) is taken, so the extra output adds no float path.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from edgevit.models.layers import decompose_norms
from edgevit.quant import pt2e
from edgevit.quant.spec import QuantSpec


def lowering_input(model: nn.Module, example: torch.Tensor, precision: str, backend: str,
                   quant: QuantSpec | None = None) -> tuple[nn.Module, dict]:
    """What the executorch target lowers for ``model``: (the module or converted int8 graph, the
    quantizer's details for the manifest; empty for float)."""
    if backend == "xnnpack":
        # XNNPACK has no layer/group-norm kernels: without this the graph splits at every norm and
        # they fall back to portable kernels whose one-pass variance loses precision.
        model = decompose_norms(copy.deepcopy(model))
    if precision != "int8":
        return model, {}
    quantized = pt2e.quantize(model, example, quant)
    return quantized.graph_module, quantized.details


def as_graph(program: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """The program as a GraphModule whose nodes know their modules (``nn_module_stack``)."""
    if isinstance(program, torch.fx.GraphModule):
        return program
    return torch.export.export(program.eval(), (example[:1].contiguous(),)).module()




def with_boundary_outputs(graph: torch.fx.GraphModule, modules: list[str]) -> tuple[torch.fx.GraphModule, list[str]]:
    """A copy of ``graph`` whose outputs are its own first output, then each found module's
    boundary in graph order; and those module names."""
    copied = _copy(graph)
    found = pt2e.boundary_nodes(copied, modules)
    order = [name for name in modules if name in found]
    output = _output_node(copied)
    _set_outputs(copied, (_first_output(output), *(_output_only_copy(copied, found[name]) for name in order)))
    return copied, order


def _output_only_copy(graph: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node:
    """A dequantize that other ops read and that is also a method output fails XNNPACK's layout
    pass (``ChannelsLastTaggedReshapePass``: KeyError 'val', ExecuTorch 1.5.1); a copy of it
    that only the output reads lowers, and computes the same values."""
    if "dequantize" not in str(node.target):
        return node
    with graph.graph.inserting_after(node):
        copied = graph.graph.call_function(node.target, node.args, node.kwargs)
    copied.meta = copy.copy(node.meta)
    return copied


def prefix(graph: torch.fx.GraphModule, module: str) -> torch.fx.GraphModule:
    """A copy of ``graph`` that ends at ``module``'s boundary (its only output)."""
    copied = _copy(graph)
    _set_outputs(copied, (pt2e.boundary_nodes(copied, [module])[module],))
    return copied


def _copy(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    with warnings.catch_warnings():  # torch 2.13's pytree deprecation note, from copying the export's codegen
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(graph)


def _output_node(graph: torch.fx.GraphModule) -> torch.fx.Node:
    return next(node for node in graph.graph.nodes if node.op == "output")


def _first_output(output: torch.fx.Node) -> torch.fx.Node:
    value = output.args[0]
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value


def _set_outputs(graph: torch.fx.GraphModule, values: tuple[torch.fx.Node, ...]) -> None:
    _output_node(graph).args = (tuple(values),)
    # The export's pytree codegen fixes the output structure; a flat tuple needs the plain one.
    graph.graph._codegen = torch.fx.graph.CodeGen()
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.recompile()
