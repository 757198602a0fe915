"""An independent multiply-add counter for the tests: fvcore's conv and linear counts."""
from torch import nn

try:
    from fvcore import nn as fvcore_nn
except ImportError as e:  # the 'test' extra installs it
    raise ImportError("the tests need fvcore: pip install 'cad-spconv[test]'") from e


class _Outputs(nn.Module):
    """fvcore traces tensors / tuples, not the dicts of torchvision segmentation models."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return tuple(out.values()) if isinstance(out, dict) else out


def fvcore_conv_linear(model, x) -> int:
    analysis = fvcore_nn.FlopCountAnalysis(_Outputs(model).eval(), x)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    ops = analysis.by_operator()
    return int(sum(v for k, v in ops.items() if k in ("conv", "linear", "addmm")))
