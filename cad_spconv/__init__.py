"""cad_spconv: content-adaptive downsampling (Hesse, Schaub-Meyer, Roth, CVPRW 2023) on spconv.

Multi-resolution feature maps live on the finest grid as sparse tensors; convs after an adaptive
downsampling run with dilation-scaled submanifold rules and parent-patch fill (``SEMANTICS.md``).
"""
from .plan import LevelPlan, StepGeometry, make_plan, reduce_to_grid
from .rulebook import Rulebook, RulebookCache, conv_rulebook, pool2_rulebook
from .tensor import CADTensor
from .engines import ENGINES, sparse_conv, sparse_max
from .backend import spconv_status, SpconvUnavailable, warn_if_cpu_only_wheel
from .macs import count_macs, MacCounter
from . import functional, masks, nn

__version__ = "0.1.0"

warn_if_cpu_only_wheel()

__all__ = ["LevelPlan", "StepGeometry", "make_plan", "reduce_to_grid", "Rulebook",
           "RulebookCache", "conv_rulebook", "pool2_rulebook", "CADTensor", "ENGINES",
           "sparse_conv", "sparse_max", "spconv_status", "SpconvUnavailable", "count_macs", "MacCounter",
           "functional", "masks", "nn",
           "__version__"]
