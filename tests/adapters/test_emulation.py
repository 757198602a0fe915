"""The emulator itself: its extremes are the dense torchvision networks."""
import numpy as np
import torch
from torch import nn

from tests.support.emulation import resnet_classifier, resnet_trunk


def test_emulated_resnet_extremes_are_the_dense_networks():
    """All kept / none kept in the emulator reproduce torchvision's dense networks."""
    from torchvision.models import resnet50
    torch.manual_seed(0)
    std = resnet50(num_classes=7).double().eval()
    dil = resnet50(num_classes=7, replace_stride_with_dilation=[False, True, True]).double().eval()
    dil.load_state_dict(std.state_dict())
    img = torch.randn(2, 3, 35, 49, dtype=torch.float64)
    grid = (5, 7)
    with torch.no_grad():
        zero = np.zeros((2,) + grid, dtype=np.int64)
        torch.testing.assert_close(resnet_classifier(std, img, zero, 8, 16), dil(img),
                                   rtol=1e-9, atol=1e-9)
        top, _ = resnet_trunk(dict(std.named_children()), img, zero + 2, 8, 32)
        trunk = nn.Sequential(*list(std.children())[:-2])
        torch.testing.assert_close(top.dense()[:, :, ::4, ::4], trunk(img), rtol=1e-9, atol=1e-9)
