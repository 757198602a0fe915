"""A converted model in its inference form: batch norms folded, dense stages compiled.

    fast = adapters.optimize_for_inference(cad, compile_dense=True)
    with torch.inference_mode():
        out = fast(images, keep)

:func:`optimize_for_inference` folds every batch norm into the conv before it
(:func:`adapters.fold_batchnorm`), so that a ResNet block's ReLUs and residual add run in its
convs' epilogues (oneDNN post-ops on CPU, :mod:`cad_spconv.engines.epilogue`). With
``compile_dense`` it also hands the dense stages before the first adaptive step (the ResNet
stem and the stages up to the finest stride) to ``torch.compile`` as one graph, the way
PyTorch recommends for CPU inference (:func:`compiled_for_inference`), and a segmentation
model's dense heads (on the densified map) each as one graph too: the dense network a user
compares CAD with can be compiled too, and CAD's dense prefix and dense heads are the same
network. The adaptive stages stay eager: their site counts change with every mask, and their
rulebook caches and data-dependent ops break graphs (BENCHMARKS.md, issue 14).
"""
from __future__ import annotations

import functools
import types
import warnings

import torch
from torch import nn
from torch._dynamo.exc import FailOnRecompileLimitHit

from .fold import fold_batchnorm

__all__ = ["optimize_for_inference", "compiled_for_inference", "kept_compiled"]


def compiled_for_inference(fn):
    """``torch.compile(fn)`` as PyTorch recommends it for CPU inference: inductor with the
    weights frozen into constants (batch norm folded into the convs, their weights prepacked
    for oneDNN, activations and residual adds fused into them), the whole function as one
    graph. It compiles on the first call, and again for a new input shape or dtype (static
    shapes; past dynamo's recompile limit it runs eagerly, with a warning); the frozen
    weights are copies, so changing the module's weights afterwards does not reach it.
    Freezing applies without autograd (``torch.inference_mode()`` or ``torch.no_grad()``)."""
    import torch._inductor.config as inductor_config

    # fullgraph: a dense network traces whole; a graph break is an error instead of a
    # silently slower network (past dynamo's limit of graphs per code object: eager, with a
    # warning, below). dynamic=False: every input shape gets a graph of its own. Dynamo's
    # automatic dynamic shapes would compile the second shape a code object meets with
    # symbolic sizes, and there freezing prepacks no conv weight: a converted model's dense
    # head, compiled as nn.Sequential.forward like its dense stages before it, reordered each
    # weight on every call (a whole DeepLabV3-ResNet101 in bfloat16: BENCHMARKS.md)
    compiled = torch.compile(_own_code(fn), fullgraph=True, dynamic=False)
    eager = []  # set once dynamo's recompile limit is hit

    @functools.wraps(fn)
    def run(*args):
        if eager:
            return fn(*args)
        # inductor reads the setting when it compiles (the first call, and any recompile);
        # torch.compile(options={"freezing": True}) did not reach it (1.7x the time, measured)
        try:
            with inductor_config.patch(freezing=True):
                return compiled(*args)
        except FailOnRecompileLimitHit:
            # one static graph per input shape, each with its own prepacked weights: past
            # dynamo's limit of graphs per code object (nn.Sequential.forward is shared by
            # every compiled stage and head), eager from here on, said once
            warnings.warn(f"compiled_for_inference: {type(fn).__name__} met more input shapes "
                          "than dynamo compiles graphs for (torch._dynamo.config."
                          "recompile_limit); it runs eagerly from now on", RuntimeWarning,
                          stacklevel=2)
            eager.append(True)
            return fn(*args)
    return run


def _own_code(fn):
    """``fn`` called through a function with a code object of its own. Dynamo keys its
    graphs, its recompile limit and its automatic dynamic shapes by code object: compiled
    directly, every ``nn.Sequential`` (a converted model's dense stages and heads, any
    other in the process) would share ``Sequential.forward``'s, and so its limit and the
    shapes the others met."""
    def call(*args):
        return fn(*args)

    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__,
                              call.__defaults__, call.__closure__)


def kept_compiled(owner: nn.Module, key: str, make, source=None):
    """``compiled_for_inference(make())``, made on first use and kept in ``owner`` under
    ``key`` (a deep copy of ``owner`` makes its own: the kept one runs the original's
    modules), and made anew where ``source`` (the module it compiles) is no longer the one
    it was made from (a replaced head)."""
    kept = owner.__dict__.get(key)
    # an id: a deep copy would map owner to itself
    if kept is None or kept[0] != id(owner) or kept[1] is not source:
        kept = owner.__dict__[key] = (id(owner), source, compiled_for_inference(make()))
    return kept[2]


def optimize_for_inference(model: nn.Module, compile_dense: bool = False,
                           inplace: bool = False) -> nn.Module:
    """``model`` (a converted model in eval mode, or any model :func:`fold_batchnorm` takes)
    with its batch norms folded and, with ``compile_dense``, the dense stages of its ResNet
    trunks and a segmentation model's dense heads compiled (:func:`compiled_for_inference`,
    each head one graph; the first forward compiles, minutes on
    a 2-core CPU, and so does the first at a new image size or dtype). Call it after
    ``model.to(device, dtype, memory_format)``: the compiled stages keep the weights they were
    compiled with. A forward that returns a dense stage's own output (``return_layers``) runs
    those stages eagerly, and so does one where a layer of them is hooked (a MAC count: a
    compiled graph calls no hooks). ``inplace=False`` (default) works on a deep copy."""
    if not isinstance(compile_dense, bool):
        raise TypeError(f"compile_dense must be a bool, got {compile_dense!r}")
    model = fold_batchnorm(model, inplace=inplace)
    if compile_dense:
        from .resnet import _ResNetTrunk
        from .segmentation import CADSegmentation

        trunks = [m for m in model.modules() if isinstance(m, (_ResNetTrunk, CADSegmentation))]
        if not trunks:
            raise ValueError(f"compile_dense: {type(model).__name__} has no converted ResNet "
                             "trunk whose dense stages could be compiled; use "
                             "compiled_for_inference on a dense model")
        for trunk in trunks:
            trunk.compile_dense = True
    return model
