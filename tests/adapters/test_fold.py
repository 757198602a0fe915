"""Batch-norm folding (adapters.fold_batchnorm): the folded model computes what the unfolded
one does (float64, random batch-norm statistics, odd sizes, a batch of 2 with different
masks), on converted models and on their torchvision sources; no batch norm is left."""
import pytest
import torch
import torchvision.models as tvm
from torch import nn

from tests.support import emulation as emu
from tests.support.epilogue import fused_epilogues
from adapters import convert, fold_batchnorm
from cad_spconv import LevelPlan

MIXED = (49, 67)  # finest grid 7x9 at stride 8


def images(size=MIXED, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def batchnorms(m: nn.Module) -> int:
    return sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())


def check_folded(model: nn.Module, run):
    """Fold a copy of ``model``; same outputs, no batch norm left, ``model`` untouched."""
    before = batchnorms(model)
    with torch.no_grad():
        want = run(model)
        folded = fold_batchnorm(model)
        got = run(folded)
    assert batchnorms(folded) == 0 and folded.folded_batchnorms == before > 0
    assert batchnorms(model) == before  # the original is not changed
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            emu.assert_rel(got[key], want[key])
    else:
        emu.assert_rel(got, want)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_classifier(arch):
    torch.manual_seed(0)
    source = emu.prepare(getattr(tvm, arch)(num_classes=10))
    cad = convert(source, 8, 32)
    spec, _ = emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")
    x = images()
    check_folded(cad, lambda m: m(x, spec))
    check_folded(source, lambda m: m(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("kind", ["levels", "keep", "all kept", "none kept"])
def test_room_for_dense_builds_the_map_in_the_last_stage_buffer(arch, kind):
    """A folded model asked for ``room_for_dense``: its last stage's output, densified with
    ``consume``, is the map of the plain forward, bit for bit, built in the features' own
    buffer where the sites are not one grid (else a view of them, or a fresh upsampling); the
    kinds of masks give both."""
    torch.manual_seed(0)
    cad = fold_batchnorm(convert(emu.prepare(getattr(tvm, arch)(num_classes=10)), 8, 32))
    if kind.endswith("kept"):  # the sites are one grid's cells: a view, an upsampling
        level = 0 if kind == "all kept" else cad.num_levels
        spec = LevelPlan.from_level_map(torch.full((2, 7, 9), level), cad.num_levels)
    else:
        spec, _ = emu.mixed_masks(3, 2, (7, 9), cad.num_levels, kind)
    x = images()
    for inference in (False, True):
        with torch.inference_mode(inference), torch.no_grad():
            want = cad.forward_features(x, spec).dense()
            y = cad.forward_features(x, spec, room_for_dense=True)
            ptr, grid = y.features.data_ptr(), y.plan.grid_level(y.step)
            got = y.dense(consume=True)
        assert torch.equal(got, want)
        # in place (mixed levels) or a view (the finest grid's cells); an upsampling is fresh
        assert (got.data_ptr() == ptr) == (grid in (None, 0)), (kind, grid)


def test_a_stage_input_is_released_after_its_shortcut_unless_returned(monkeypatch):
    """A folded stage's first block releases its input's features once its downsample has
    read them (nothing reads them after), but not a returned stage's output: with layer3
    returned, layer4's first block leaves it alone and the returned map is right."""
    from cad_spconv import CADTensor
    torch.manual_seed(0)
    source = emu.prepare(tvm.resnet18(num_classes=10))
    spec, _ = emu.mixed_masks(3, 2, (7, 9), 2, "levels")
    x = images()
    released = []
    release = CADTensor.release
    monkeypatch.setattr(CADTensor, "release",
                        lambda t: (released.append(t.step), release(t)))
    # the stages' inputs: layer3's the entered tensor (step 0), layer4's layer3's output
    for returns, want in (({"layer4": "out"}, [0, 1]), ({"layer3": "f3", "layer4": "out"},
                                                          [0])):
        cad = convert(source, 8, 32, return_layers=returns, dense=False)
        with torch.no_grad():
            plain = {k: v.dense() for k, v in cad(x, spec).items()}
            released.clear()
            got = {k: v.dense() for k, v in fold_batchnorm(cad)(x, spec).items()}
        assert released == want
        for key in plain:
            emu.assert_rel(got[key], plain[key])
    # a hook that keeps a stage's output (on its last block): the next stage leaves it alone
    folded = fold_batchnorm(convert(source, 8, 32))
    kept = []
    folded.layer3[-1].register_forward_hook(lambda m, i, o: kept.append(o))
    released.clear()
    with torch.no_grad():
        folded(x, spec)
    assert released == [0] and kept[0].features.shape[0] > 0


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_handed_over_input_goes_before_the_next_conv_of_its_block(arch, monkeypatch):
    """A folded stage's first block runs its downsample and conv1 first, the two readers of
    its input, and releases the input before the conv after them (so that it is not held with
    that conv's output and the downsample's transients at once); the same values."""
    from cad_spconv import CADTensor
    torch.manual_seed(0)
    source = emu.prepare(getattr(tvm, arch)(num_classes=10))
    spec, _ = emu.mixed_masks(3, 2, (7, 9), 2, "levels")
    x = images()
    cad = convert(source, 8, 32, return_layers={"layer4": "out"}, dense=False)
    with torch.no_grad():
        plain = cad(x, spec)["out"].dense()
    folded = fold_batchnorm(cad)
    log = []
    release = CADTensor.release
    monkeypatch.setattr(CADTensor, "release", lambda t: (log.append("release"), release(t)))
    names = ["downsample.0", "conv1", "conv2"] + (["conv3"] if arch == "resnet50" else [])
    for stage in (folded.layer3, folded.layer4):
        for name in names:
            # an instance attribute, not a hook: a hooked block is never handed its input
            module = stage[0].get_submodule(name)
            module.forward = (lambda f, tag: lambda *a, **k: (log.append(tag), f(*a, **k))[1])(
                module.forward, name)
    with torch.no_grad():
        got = folded(x, spec)["out"].dense()
    emu.assert_rel(got, plain)
    want = ["downsample.0", "conv1", "release", *names[2:]]
    assert log == want * 2, log


def test_a_returned_stem_conv_is_not_folded():
    """A feature extractor that returns ``conv1``'s own output keeps its stem batch norm: the
    fold would change that output."""
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    source = emu.prepare(tvm.resnet18(num_classes=10))
    returns = {"conv1": "stem", "bn1": "stem_bn", "layer4": "out"}
    cad = convert(source, 8, 16, return_layers=returns)
    spec, _ = emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")
    x = images()
    getter = IntermediateLayerGetter(source, returns).eval()
    for model, run in ((cad, lambda m: m(x, spec)), (getter, lambda m: m(x))):
        with torch.no_grad():
            want = run(model)
            folded = fold_batchnorm(model)
            got = run(folded)
        assert batchnorms(folded) == 1  # bn1 of the stem
        for key in want:
            emu.assert_rel(got[key], want[key])


@pytest.mark.parametrize("sparse_head", [False, True])
def test_deeplabv3(sparse_head):
    torch.manual_seed(0)
    source = emu.prepare(tvm.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=True))
    cad = convert(source, 8, 16, sparse_head=sparse_head)
    spec, _ = emu.mixed_masks(4, 2, (7, 9), cad.num_levels, "keep")
    x = images()
    check_folded(cad, lambda m: m(x, spec))
    if not sparse_head:
        check_folded(source, lambda m: m(x))


def test_vgg16_bn_features():
    torch.manual_seed(0)
    source = emu.prepare(tvm.vgg16_bn().features[:33])
    cad = convert(source, 2, 8)
    x = images((29, 43))
    spec, _ = emu.mixed_masks(5, 2, (14, 21), cad.num_levels, "map")  # floor pools
    check_folded(cad, lambda m: m(x, spec))
    check_folded(source, lambda m: m(x))


def test_inplace_changes_the_model_itself():
    torch.manual_seed(0)
    m = emu.prepare(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    x = images((9, 11))
    with torch.no_grad():
        want = m(x)
        assert fold_batchnorm(m, inplace=True) is m and isinstance(m[1], nn.Identity)
        emu.assert_rel(m(x), want)


def test_refuses_what_cannot_be_folded():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="model.eval"):
        fold_batchnorm(m)
    m.eval()[1].train()
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(m)
    stats_free = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        fold_batchnorm(stats_free.eval())


def test_converting_a_folded_model_names_the_order():
    """fold_batchnorm leaves Identity in place of the batch norms, which convert cannot take;
    the error says to convert first, then fold."""
    with torch.device("meta"):
        folded = fold_batchnorm(tvm.resnet18(num_classes=3).eval())
    with pytest.raises(TypeError, match=r"bn1 .*Identity.*convert the model first, then fold"):
        convert(folded, 8, 16)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folded_blocks_fuse_their_epilogues(arch, monkeypatch):
    """A folded block's ReLUs and residual add go into its convs' epilogues (oneDNN post-ops
    in float32 and bfloat16, channels-last): float32 within the float32 tolerance of the
    float64 model that was not folded, for nothing kept (blocks on grid maps), everything kept
    and mixed masks (gathered sites: the 1x1 convs fuse, the 3x3 ones apply it afterwards); a
    MAC count (hooked layers) runs op by op and counts the same."""
    import copy

    from cad_spconv.engines import epilogue
    from cad_spconv.macs import MacCounter

    torch.manual_seed(0)
    source = emu.prepare(getattr(tvm, arch)(num_classes=10))
    cad = convert(source, 8, 32, return_layers={"layer4": "out"})
    x = images()
    specs = {"none": torch.zeros(2, 1, *MIXED, dtype=torch.bool),
             "all": torch.ones(2, 1, *MIXED, dtype=torch.bool),
             "mixed": emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")[0]}
    answers = fused_epilogues(monkeypatch)
    dtypes = [torch.float32] + [torch.bfloat16] * (torch.bfloat16 in epilogue._FUSED_DTYPES)
    for dtype in dtypes:
        folded = fold_batchnorm(copy.deepcopy(cad)).to(dtype).to(memory_format=torch.channels_last)
        xd = x.to(dtype).contiguous(memory_format=torch.channels_last)
        for name, spec in specs.items():
            with torch.inference_mode():
                want = cad(x, spec)["out"]
                answers.clear()
                got = folded(xd, spec)["out"]
                # 3x3 convs on gathered sites (all of a BasicBlock's) apply it afterwards
                least = 0 if arch == "resnet18" and name == "mixed" else 2 * len(cad.layer4)
                assert sum(answers) >= least, (name, dtype)
                if dtype == torch.float32:
                    emu.assert_rel(got, want, torch.float32)
                answers.clear()
                with MacCounter(folded, 2) as counter:
                    counted = folded(xd, spec)["out"]
                assert not any(answers), name  # hooked: op by op
                with MacCounter(cad, 2) as reference:
                    cad(x, spec)
                assert counter.result()["total"] == reference.result()["total"]
                if dtype == torch.float32:
                    emu.assert_rel(counted, got, torch.float32)


def test_optimize_for_inference_compiles_the_dense_stages(monkeypatch):
    """``optimize_for_inference(compile_dense=True)``: batch norms folded, the dense stages
    (stem, layer1, layer2 at finest stride 8) run as one compiled graph, with the eager
    model's values (float32 tolerance, a batch of 2 with mixed masks); a forward that returns a
    dense stage's own output runs them eagerly; a deep copy compiles its own; the source is
    untouched."""
    import copy

    from torchvision.models.resnet import BasicBlock, ResNet

    from adapters import optimize_for_inference
    from adapters.resnet import _ResNetTrunk

    torch.manual_seed(0)
    source = emu.prepare(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10))
    cad = convert(source, 8, 16, return_layers={"layer2": "mid", "layer4": "out"}).float()
    x = images().float().contiguous(memory_format=torch.channels_last)
    spec = emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")[0]
    compiled = []
    real = _ResNetTrunk._compiled_dense_stages
    monkeypatch.setattr(_ResNetTrunk, "_compiled_dense_stages",
                        lambda self: compiled.append(self) or real(self))
    fast = optimize_for_inference(cad, compile_dense=True)
    assert batchnorms(fast) == 0 and batchnorms(cad) > 0 and not cad.compile_dense
    with torch.inference_mode():
        want = cad(x, spec)
        got = fast(x, spec)  # layer2 is returned: the dense stages run eagerly
        assert not compiled
        for key in want:
            emu.assert_rel(got[key], want[key], torch.float32)
        fast.return_layers = {"layer4": "out"}
        got = fast(x, spec)
        assert compiled == [fast]
        emu.assert_rel(got["out"], want["out"], torch.float32)
        twin = copy.deepcopy(fast)
        emu.assert_rel(twin(x, spec)["out"], want["out"], torch.float32)
    kept = fast.__dict__["_compiled_dense"]
    assert twin.__dict__["_compiled_dense"][2] is not kept[2]


def test_optimize_for_inference_compiles_a_dense_head():
    """A segmentation model's dense head (on the densified map) runs compiled too, with the
    eager model's values (float32 tolerance, a batch of 2 with mixed masks), and eagerly
    where hooked, so that a MAC count sees its layers; a sparse head stays eager."""
    from cad_spconv import count_macs
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    from adapters import optimize_for_inference

    torch.manual_seed(0)
    backbone = IntermediateLayerGetter(ResNet(BasicBlock, [1, 1, 1, 1]), {"layer4": "out"})
    source = emu.prepare(DeepLabV3(backbone, DeepLabHead(512, 5)))
    x = images().float().contiguous(memory_format=torch.channels_last)
    for sparse_head in (False, True):
        cad = convert(source, 8, 16, sparse_head=sparse_head).float()
        spec = emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")[0]
        fast = optimize_for_inference(cad, compile_dense=True)
        want_macs = count_macs(cad, x, spec)["total"]
        # counted before and after the first forward (which compiles), twice: a graph compiled
        # under the counter's hooks, or one that ran hooked layers, would miss them
        assert count_macs(fast, x, spec)["total"] == want_macs
        with torch.inference_mode():
            want = cad(x, spec)["out"]
            got = fast(x, spec)["out"]
            for _ in range(2):  # as the bench counts: in inference mode too
                assert count_macs(fast, x, spec)["total"] == want_macs
        emu.assert_rel(got, want, torch.float32)
        assert ("_compiled_classifier" in fast.__dict__) == (not sparse_head)


def test_compiled_for_inference_runs_eagerly_past_the_recompile_limit():
    """One static graph per input shape; past dynamo's recompile limit the function runs
    eagerly, with one warning, and gives the same values."""
    import warnings

    import torch._dynamo.config as dynamo_config

    from adapters import compiled_for_inference

    torch._dynamo.reset()
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    run = compiled_for_inference(conv)
    with torch.inference_mode(), dynamo_config.patch(recompile_limit=1):
        a, b = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 6, 10)
        torch.testing.assert_close(run(a), conv(a))
        with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
            torch.testing.assert_close(run(b), conv(b))
        torch.testing.assert_close(run(a), conv(a))
    # each compiled function has its own limit: three nn.Sequential (one forward code) under a
    # limit of two compile without a warning
    with torch.inference_mode(), dynamo_config.patch(recompile_limit=2), \
            warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for _ in range(3):
            seq = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).eval()
            torch.testing.assert_close(compiled_for_inference(seq)(a), seq(a))
    torch._dynamo.reset()


def test_optimize_for_inference_refusals():
    from adapters import optimize_for_inference

    cad = convert(emu.prepare(tvm.resnet18(num_classes=3)), 8, 16)
    with pytest.raises(TypeError, match="compile_dense must be a bool"):
        optimize_for_inference(cad, compile_dense=1)
    with pytest.raises(ValueError, match="model.eval"):
        optimize_for_inference(copy_train(cad))
    vgg = convert(emu.prepare(tvm.vgg11().features[:8]), 2, 4)
    with pytest.raises(ValueError, match="no converted ResNet trunk"):
        optimize_for_inference(vgg, compile_dense=True)


def copy_train(model):
    import copy

    return copy.deepcopy(model).train()


def test_blocks_hand_their_outputs_over_only_where_nothing_else_keeps_them(monkeypatch):
    """In a folded stage each block's output becomes the next block's own (its last conv
    writes into it: ``residual_inplace``), except where a hook could have kept it: a hooked
    block's output, and the stage outputs a model returns, keep their values."""
    from cad_spconv.engines import epilogue

    torch.manual_seed(0)
    source = emu.prepare(tvm.resnet50(num_classes=10))
    cad = convert(source, 8, 32, return_layers={"layer3": "mid", "layer4": "out"})
    folded = fold_batchnorm(cad).float().to(memory_format=torch.channels_last)
    x = images().float().contiguous(memory_format=torch.channels_last)
    inplace, real = [], epilogue.conv_map

    def spy(*args, **kwargs):
        inplace.append(args[9] if len(args) > 9 else kwargs.get("residual_inplace", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(epilogue, "conv_map", spy)
    kept = {}
    folded.layer3[2].register_forward_hook(
        lambda m, i, o: kept.update(tensor=o, values=o.features.clone()))
    for spec in (torch.zeros(2, 1, *MIXED, dtype=torch.bool),
                 emu.mixed_masks(3, 2, (7, 9), cad.num_levels, "levels")[0]):
        inplace.clear()
        with torch.inference_mode():
            got = folded(x, spec)
            mid = got["mid"].clone()
        # layer3: blocks 1, 2 and 4, 5 take over their input (3 follows the hooked block 2),
        # layer4: blocks 1, 2
        assert sum(inplace) >= 6, inplace
        assert torch.equal(kept["tensor"].features, kept["values"])  # not written into
        assert torch.equal(got["mid"], mid)
    cad_f = cad.float()
    with torch.inference_mode():
        ref = cad_f(x, spec)
    for key in ref:
        emu.assert_rel(got[key], ref[key], torch.float32)
