"""A batch of 0 images gives empty outputs, as torchvision does (issue 11 item 6): through
converted ResNet / DeepLabV3 / VGG models, every engine, every keep form."""
import pytest
import torch
import torchvision.models as tvm
from torchvision.models.segmentation import deeplabv3_resnet50

from adapters import convert
from adapters.resnet import convert_resnet
from cad_spconv import LevelPlan
from cad_spconv.backend import spconv_status
from tests.support import emulation as emu

SPCONV = spconv_status()[0]
ENGINES = ["auto", "lattice", "torch", "tuned"] + [pytest.param("spconv", marks=pytest.mark.skipif(
    not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}"))]
SIZE = (41, 57)


def empty(size=SIZE, dtype=torch.float64):
    return torch.zeros(0, 3, *size, dtype=dtype)


def keeps(grid, num_levels):
    """Every keep form, for 0 images."""
    mask = torch.zeros(0, 1, *SIZE, dtype=torch.bool)
    return {"image": mask, "grid": torch.zeros(0, *grid, dtype=torch.bool),
            "list": [mask] * num_levels,
            "plan": LevelPlan.from_level_map(torch.zeros(0, *grid, dtype=torch.int64), num_levels),
            "callable": lambda feats: feats[:, 0] > 0}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return emu.prepare(tvm.resnet18(num_classes=7))


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return emu.prepare(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5))


@pytest.mark.parametrize("engine", ENGINES)
def test_resnet(resnet, engine):
    x = empty()
    with torch.no_grad():
        want = resnet(x)
        cad = convert(resnet, 8, 32, engine=engine)
        for name, keep in keeps((6, 8), 2).items():
            out = cad(x, keep)
            assert out.shape == want.shape == (0, 7) and out.dtype == want.dtype, name
        assert cad.last_plan.batch_size == 0 and cad.last_plan.level_fractions().shape == (0, 3)
        feats = convert_resnet(resnet, 8, 32, engine=engine,
                               return_layers={"layer2": "l2", "layer4": "out"})(x, keeps((6, 8), 2)["image"])
        assert feats["l2"].shape == (0, 128, 6, 8) and feats["out"].shape == (0, 512, 6, 8)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sparse_head", [False, True])
def test_deeplabv3(deeplab, engine, sparse_head):
    x = empty()
    with torch.no_grad():
        want = deeplab(x)
        cad = convert(deeplab, 8, 16, sparse_head=sparse_head, engine=engine)
        for name, keep in keeps((6, 8), 1).items():
            out = cad(x, keep)
            assert list(out) == list(want)
            for key in want:
                assert out[key].shape == want[key].shape == (0, 5, *SIZE), (name, key)


@pytest.mark.parametrize("engine", ENGINES)
def test_vgg(engine):
    torch.manual_seed(0)
    stack = emu.prepare(tvm.vgg16_bn().features[:33])
    cad = convert(stack, 2, 8, engine=engine)
    with torch.no_grad():
        for name, keep in keeps((20, 28), 2).items():  # floor-mode pool: 41x57 -> 20x28
            out = cad(empty(), keep)
            assert out.shape == (0, 512, 20, 28) and out.dtype == torch.float64, name


def test_gradients_of_an_empty_batch(resnet):
    """As torchvision: the graph exists, gradients are zero (not missing)."""
    cad = convert(resnet, 8, 32)
    out = cad(empty(), torch.zeros(0, 1, *SIZE, dtype=torch.bool))
    out.sum().backward()
    w = resnet.layer4[1].conv2.weight
    assert w.grad is not None and not w.grad.any()
    resnet.zero_grad(set_to_none=True)
