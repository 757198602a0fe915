"""Bad input gets a clear error that names the problem and the fix."""
import pytest
import torch
from torch import nn

from cad_spconv import CADTensor, LevelPlan, functional as CF, make_plan
from cad_spconv.nn import CADConv2d, CADMaxPool2d


def x_and_keep(B=2, H=9, W=7):
    return torch.randn(B, 4, H, W), torch.rand(B, H, W) < 0.2


def test_keep_mask_wrong_shape():
    x, _ = x_and_keep()
    with pytest.raises(ValueError, match="does not map onto the finest grid 9x7"):
        CADTensor.from_dense(x, torch.zeros(2, 10, 10, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match=r"\[B, 1, h, w\] or \[B, h, w\]"):
        CADTensor.from_dense(x, torch.zeros(2, 3, 9, 7, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match=r"\[B, 1, h, w\] or \[B, h, w\]"):
        CADTensor.from_dense(x, torch.zeros(9, 7, dtype=torch.bool), 1)


def test_keep_mask_wrong_batch_size():
    x, _ = x_and_keep()
    with pytest.raises(ValueError, match="batch size 3, the input has 2: give one mask per image"):
        CADTensor.from_dense(x, torch.zeros(3, 9, 7, dtype=torch.bool), 1)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32])
def test_keep_mask_not_bool(dtype):
    """An integer keep mask used to be read as a level map (1 = downsample, the opposite of
    keep): refused now, whatever its dtype, with the conversions and the level-map entry named."""
    x, keep = x_and_keep()
    fixes = r"mask\.bool\(\).*mask > 0\.5.*LevelPlan\.from_level_map"
    with pytest.raises(TypeError, match=rf"keep must be a bool mask .*got a {dtype}.*{fixes}"):
        CADTensor.from_dense(x, keep.to(dtype), 1)
    with pytest.raises(TypeError, match=rf"keep must be a bool mask .*{fixes}"):
        make_plan(keep.to(dtype), (9, 7), 2)
    with pytest.raises(TypeError, match=rf"level mask 1 must be a bool tensor.*{fixes}"):
        LevelPlan.from_level_masks([keep, keep.to(dtype)], (9, 7), 2)
    with pytest.raises(TypeError, match=fixes):
        make_plan([keep, keep.to(dtype)], (9, 7), 2)


def test_level_map_only_through_its_named_entry():
    levels = torch.zeros(2, 9, 7, dtype=torch.int64)
    levels[1] = 1
    plan = make_plan(LevelPlan.from_level_map(levels, 1), (9, 7), 1)
    assert plan.level_fractions()[:, 1].tolist() == [0.0, 1.0]
    with pytest.raises(TypeError, match="LevelPlan.from_level_map"):
        make_plan(levels, (9, 7), 1)


def test_level_map_inconsistent_or_out_of_range():
    levels = torch.zeros(1, 4, 4, dtype=torch.int64)
    levels[0, 0, 0] = 1
    with pytest.raises(ValueError, match="not block-consistent: image 0, block at \\(0, 0\\) of size 2"):
        LevelPlan.from_level_map(levels, 2)
    top = torch.zeros(2, 4, 4, dtype=torch.int64)  # image 1: one 2x2 of the top level's 4x4
    top[1, :2, :2] = 2
    with pytest.raises(ValueError, match="not block-consistent: image 1, block at \\(0, 0\\) of size 4"):
        LevelPlan.from_level_map(top, 2)
    with pytest.raises(ValueError, match="must lie in 0..2, got 3..3"):
        LevelPlan.from_level_map(torch.full((1, 4, 4), 3), 2)
    with pytest.raises(TypeError, match="integer tensor"):
        LevelPlan.from_level_map(torch.zeros(1, 4, 4), 2)


def test_too_many_level_masks_and_bad_num_levels():
    _, keep = x_and_keep()
    with pytest.raises(ValueError, match="expected 1..1 per-level masks"):
        LevelPlan.from_level_masks([keep, keep], (9, 7), 1)
    for bad in (0, True, 1.0):  # True is an int in Python: refused, not read as 1
        with pytest.raises(ValueError, match=f"num_levels .* must be an int >= 1, got {bad!r}"):
            LevelPlan.from_keep(keep, (9, 7), bad)


def test_even_kernel_and_bad_padding():
    with pytest.raises(ValueError, match="odd kernel size"):
        CADConv2d(4, 4, 2, padding=0)
    with pytest.raises(ValueError, match="same padding"):
        CADConv2d(4, 4, 3, padding=0)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        CADConv2d(4, 4, 3, stride=4, padding=1)
    # torch's own spelling of same padding (stride 1) is the conv rule's padding
    assert CADConv2d(4, 4, 3, padding="same", dilation=2).padding == "same"
    x, keep = x_and_keep()
    t = CADTensor.from_dense(x, keep, 1)
    with pytest.raises(ValueError, match="kernel size must be odd"):
        CF.conv2d(t, torch.randn(4, 4, 2, 2))
    with pytest.raises(ValueError, match="unsupported max pool"):
        CADMaxPool2d(2, 1)(t)
    # an odd window in ceil mode has a row / column more than the step's grid on even sizes
    with pytest.raises(ValueError, match="ceil_mode=True would add a row"):
        CADMaxPool2d.from_module(torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert CADMaxPool2d(2, 2, ceil_mode=True)(t).step == 1  # 2x2 blocks are clipped: ceil mode
    with pytest.raises(TypeError, match="max_pool2d needs floating-point features, got torch.int64"):
        CADMaxPool2d(2, 2)(t.replace_feature(t.features.long()))


def test_device_mismatch():
    x, keep = x_and_keep()
    with pytest.raises(ValueError, match=r"keep is on cpu, the input on meta: move the mask"):
        make_plan(keep, (9, 7), 1, device="meta")


def test_stride_beyond_levels_and_mixed_sites():
    x, keep = x_and_keep()
    t = CADTensor.from_dense(x, keep, 1)
    w = torch.randn(4, 4, 3, 3)
    y = CF.conv2d(t, w, stride=2)
    with pytest.raises(ValueError, match="only 1 adaptive steps"):
        CF.conv2d(y, w, stride=2)
    with pytest.raises(ValueError, match="same sites"):
        _ = t + y
    with pytest.raises(ValueError, match="same sites"):
        t += y


def test_modules_refuse_dense_input_and_unknown_engine():
    with pytest.raises(TypeError, match="expects a CADTensor.*from_dense"):
        CADConv2d(4, 4, 3, padding=1)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="unknown engine"):
        CADConv2d(4, 4, 3, padding=1, engine="cudnn")


def test_from_module_shares_parameters():
    conv = nn.Conv2d(4, 6, 3, 2, 1)
    cad = CADConv2d.from_module(conv)
    assert cad.weight is conv.weight and cad.bias is conv.bias
    assert cad.macs_per_site == 3 * 3 * 4 * 6
    cad.load_state_dict(conv.state_dict())
    # overrides (what the adapters pass) and the train/eval mode carry over
    conv.eval()
    step = CADConv2d.from_module(conv, dilation=2, stride=1)
    assert (step.stride, step.dilation, step.padding) == ((1, 1), (2, 2), (2, 2))
    assert not step.training and step.weight is conv.weight
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        CADConv2d.from_module(conv, stride=4)
    # a conv without same padding is refused, not given same padding silently
    for bad in (nn.Conv2d(4, 4, 3, padding=0), nn.Conv2d(4, 4, 3, 2, padding=0),
                nn.Conv2d(4, 4, 3, padding=1, dilation=2), nn.Conv2d(4, 4, 3, padding="valid")):
        with pytest.raises(ValueError, match="needs a conv with same padding"):
            CADConv2d.from_module(bad)
    same = CADConv2d.from_module(nn.Conv2d(4, 4, 3, padding="same", dilation=3))
    assert same.padding == (3, 3)
    with pytest.raises(TypeError, match="wraps an nn.Conv2d, got Linear"):
        CADConv2d.from_module(nn.Linear(3, 3))


def test_bad_layer_arguments_name_the_problem():
    """Errors that came from deep inside torch (or not at all) before."""
    from cad_spconv.nn import CADAdaptiveAvgPool2d, CADBatchNorm2d
    x, keep = x_and_keep()
    t = CADTensor.from_dense(x, keep, 1)
    w = torch.randn(4, 4, 3, 3)
    for bad in (0, -1, (1, 0)):
        with pytest.raises(ValueError, match="dilation must be >= 1"):
            CF.conv2d(t, w, dilation=bad)
    with pytest.raises(ValueError, match="CADConv2d dilation must be >= 1"):
        CADConv2d(4, 4, 3, padding=0, dilation=0)
    with pytest.raises(ValueError, match=r"weight must be a conv weight .*shape \(4, 4, 3, 3, 1\)"):
        CF.conv2d(t, w[..., None])
    for inplace in (False, True):
        bn = CADBatchNorm2d(5).eval()
        bn.inplace = inplace
        with pytest.raises(ValueError, match=r"CADBatchNorm2d\(5\) got a tensor with 4 channels"):
            bn(t)
    as_int = t.replace_feature(t.features.round().long())
    with pytest.raises(TypeError, match="floating-point features, got torch.int64"):
        CADAdaptiveAvgPool2d()(as_int)


def test_level_plan_built_directly_checks_its_levels():
    """A plan built directly gets from_level_map's checks (it ran invalid plans silently: one
    cell at level 0 in a merged block counted 0.25 / 0.75 but gave one site)."""
    levels = torch.zeros(2, 9, 7, dtype=torch.int64)
    for bad in (levels.float(), levels[0], levels.int()):
        with pytest.raises(TypeError, match="int64 levels .*from_level_map"):
            LevelPlan(bad, 1)
    with pytest.raises(ValueError, match="num_levels .* must be an int >= 1, got True"):
        LevelPlan(levels, True)
    assert LevelPlan(levels, 1).batch_size == 2
    mixed = torch.tensor([[[0, 1], [1, 1]]])
    for bad, match in ((mixed, "not block-consistent: image 0, block at \\(0, 0\\) of size 2"),
                       (torch.full((1, 2, 2), 3), "values must lie in 0..1, got 3..3"),
                       (-mixed, "values must lie in 0..1, got -1..0")):
        with pytest.raises(ValueError, match=match):
            LevelPlan(bad, 1)
    assert LevelPlan(mixed, 1, validate=False).num_levels == 1  # the caller's word for it
