"""cad_spconv: content-adaptive downsampling (Hesse, Schaub-Meyer, Roth, CVPRW 2023) on spconv.

Multi-resolution feature maps live on the finest grid as spconv ``SparseConvTensor``s; convs
after an adaptive downsampling run with dilation-scaled submanifold rules and parent-patch fill
(``docs/SEMANTICS.md``). The layers, each importing only those before it:

    plan (masks -> quadtree) -> rulebook -> engines -> tensor / functional / nn -> macs

``adapters`` (converting torchvision models) builds on this package, the applications
(``cad_apps``: eval, train, keypoints, bench, demo, CLI) on both.
"""
from .backend import SpconvUnavailable, spconv_status, warn_if_cpu_only_wheel
from .plan import LevelPlan, StepGeometry, make_plan, num_adaptive_steps, reduce_to_grid
from .rulebook import (ConvKey, ConvRulebook, GatherRulebook, Pool2Key, Rulebook, RulebookCache,
                       conv_rulebook, pool2_rulebook)
from .engines import ENGINES, clear_caches, sparse_conv, sparse_max
from .tensor import CADTensor
from .macs import MacCounter, count_macs
from . import functional, images, masks, nn

__version__ = "0.1.0"

warn_if_cpu_only_wheel()

__all__ = ["LevelPlan", "StepGeometry", "make_plan", "num_adaptive_steps", "reduce_to_grid",
           "Rulebook", "ConvRulebook", "GatherRulebook", "ConvKey", "Pool2Key", "RulebookCache",
           "conv_rulebook", "pool2_rulebook", "CADTensor", "ENGINES", "sparse_conv", "sparse_max",
           "clear_caches",
           "spconv_status", "SpconvUnavailable", "count_macs", "MacCounter", "functional",
           "images", "masks", "nn", "__version__"]
