"""D2-Net's network in the keypoint study: the ``d2_tf.pth`` key mapping, the dense baselines at
output stride 1 / 2 / 4 / 8 against the paper code's layer lists written out, and the adaptive
networks' guarantees in float64 (everything kept == dense finest stride, nothing kept == dense
stride 8), through the whole extraction path down to the sampled descriptors."""
import numpy as np
import pytest
import torch
from torch import nn

from cad_apps.checkpoints import CheckpointError, CheckpointMismatchError
from cad_apps.keypoints.extract import ExtractConfig, Extractor, sample_descriptors
from cad_apps.keypoints.preprocess import caffe_tensor
from cad_apps.keypoints.network import (DescriptorNetwork, d2_features_state_dict,
                                        dense_at_stride, load_d2_weights, vgg16_conv4_3)
from cad_spconv import LevelPlan
from cad_spconv.macs import count_macs
from tests.support import emulation as emu
from tests.support.emulation import assert_rel
from tests.support.hpatches import d2_checkpoint, dense_reference, thin_vgg
from tests.support.hpatches import one_torch_thread  # noqa: F401 (autouse fixture)

SIZE = (32, 40)


def images(seed=0, size=SIZE):
    return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64) * 50


def test_d2_checkpoint_keys_map_onto_vgg16_conv4_3(tmp_path):
    torch.manual_seed(3)
    src = vgg16_conv4_3()
    ckpt = d2_checkpoint(src)
    assert sorted(ckpt["model"])[:2] == ["dense_feature_extraction.model.0.bias",
                                         "dense_feature_extraction.model.0.weight"]
    path = tmp_path / "d2_tf.pth"
    torch.save(ckpt, path)
    loaded = load_d2_weights(str(path))
    for (k, a), (k2, b) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert len(loaded.state_dict()) == 20  # 10 convs: weight + bias
    # conv4_3 is layer 21 in D2-Net's Sequential and in vgg16().features
    assert torch.equal(loaded[21].weight, ckpt["model"]["dense_feature_extraction.model.21.weight"])


def test_d2_checkpoint_errors_name_the_problem(tmp_path):
    sd = d2_checkpoint(vgg16_conv4_3())["model"]
    missing = {k: v for k, v in sd.items() if not k.startswith("dense_feature_extraction.model.21.")}
    with pytest.raises(CheckpointMismatchError, match=r"missing \['dense_feature_extraction.model.21"):
        d2_features_state_dict({"model": missing})
    extra = dict(sd, **{"dense_feature_extraction.model.16.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        d2_features_state_dict(extra)
    bad = dict(sd, **{"dense_feature_extraction.model.0.weight": torch.zeros(64, 3, 5, 5)})
    with pytest.raises(CheckpointMismatchError, match=r"model.0.weight has shape \(64, 3, 5, 5\)"):
        d2_features_state_dict(bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="--weights: .*junk.pth is not a PyTorch checkpoint"):
        load_d2_weights(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="d2_tf.pth"):
        load_d2_weights(str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_dense_networks_equal_the_reference_layer_lists(stride):
    stack = thin_vgg()
    x = images(1)
    with torch.no_grad():
        out = dense_at_stride(stack, stride)(x)
        expected = dense_reference(stack, x, stride)
    assert out.shape[-2:] == (SIZE[0] // stride, SIZE[1] // stride)
    assert torch.equal(out, expected)


def test_docs_credit_dense_networks_to_the_papers_code_not_d2_nets():
    """D2-Net's own stride-4 network (its lib/model_test.py) keeps pool3 as a 2x2/1 average pool
    in front of the dilated conv4_x: not our dense stride 4 (the paper code's), so the docs must
    not credit the dense networks to D2-Net's code."""
    import copy
    from pathlib import Path

    import cad_apps.keypoints.network as network

    stack = thin_vgg()
    d2_own = copy.deepcopy(stack)
    d2_own[16] = nn.AvgPool2d(2, stride=1)
    for i in (17, 19, 21):
        d2_own[i].padding, d2_own[i].dilation = (2, 2), (2, 2)
    with torch.no_grad():
        assert d2_own(images(1)).shape != dense_at_stride(stack, 4)(images(1)).shape
    docs = (Path(__file__).resolve().parents[2] / "docs" / "keypoints.md").read_text()
    for text in (docs, network.__doc__):
        flat = " ".join(text.split())
        assert "D2-Net's and the paper's code" not in flat
        assert "D2-Net's own output-stride-4 network keeps the third pool as a 2x2/1 average " \
               "pool" in flat


def test_dense_networks_share_parameters():
    stack = thin_vgg()
    dense = dense_at_stride(stack, 1)
    assert {id(p) for p in dense.parameters()} == {id(p) for p in stack.parameters()}
    assert stack[21].dilation == (1, 1)  # the source is not modified


def test_non_vgg_stacks_are_refused():
    with pytest.raises(ValueError, match="3 max pools"):
        dense_at_stride(thin_vgg()[:16], 2)
    dilated = thin_vgg()
    dilated[21] = nn.Conv2d(dilated[21].in_channels, dilated[21].out_channels, 3, padding=2, dilation=2)
    with pytest.raises(ValueError, match="plain 'same' conv"):
        dense_at_stride(dilated, 4)


@pytest.mark.parametrize("finest", [1, 2, 4])
def test_adaptive_network_all_kept_and_none_kept(finest):
    stack = thin_vgg()
    net = DescriptorNetwork(stack, finest, adaptive=True)
    x = images(2)
    grid = (SIZE[0] // finest, SIZE[1] // finest)
    L = net.num_levels
    all_kept = LevelPlan.from_level_map(torch.zeros(1, *grid, dtype=torch.int64), L)
    none_kept = LevelPlan.from_level_map(torch.full((1, *grid), L, dtype=torch.int64), L)
    with torch.no_grad():
        assert_rel(net(x, all_kept), dense_reference(stack, x, finest))
        coarse = net.net.forward_features(x, none_kept).dense(grid="step")
        assert_rel(coarse, dense_reference(stack, x, 8))
        # densified, nothing kept is the stride-8 map repeated over 8/F x 8/F cells
        up = dense_reference(stack, x, 8).repeat_interleave(8 // finest, 2).repeat_interleave(8 // finest, 3)
        assert_rel(net(x, none_kept), up)
        assert count_macs(net.net, x, all_kept)["total"] == count_macs(dense_at_stride(stack, finest), x)["total"]
        assert count_macs(net.net, x, none_kept)["total"] == count_macs(dense_at_stride(stack, 8), x)["total"]


def _config(tmp_path, finest, dilations, **kw):
    return ExtractConfig(data_root=str(tmp_path), out=str(tmp_path / "out"), finest_stride=finest,
                         dilations=dilations, random_weights=True, dtype="float64", **kw).validate()


def _scene(size=SIZE, seed=0):
    from cad_apps.keypoints.hpatches import synthetic_scene

    return synthetic_scene(size, seed)


@pytest.mark.parametrize("finest", [1, 2, 4])
def test_extracted_descriptors_all_kept_equal_dense_finest_stride(tmp_path, finest):
    """Dilations covering the image keep everything: the descriptors are the dense
    stride-F network's, sampled at the same cells (float64, thin random VGG)."""
    stack = thin_vgg(seed=finest)
    L = (8 // finest).bit_length() - 1
    big = 2 * max(SIZE) + 1
    ex = Extractor(_config(tmp_path, finest, (big,) * L), stack)
    rgb = _scene()
    r = ex.run(rgb)
    assert len(r["xy"]) > 3
    assert (r["plan"].levels == 0).all()
    dense = Extractor(_config(tmp_path, finest, ()), stack).run(rgb)
    assert_rel(r["features"], dense["features"])
    got = sample_descriptors(r["features"][0], r["xy"], SIZE, np.float64)
    want = sample_descriptors(dense["features"][0], dense["xy"], SIZE, np.float64)
    assert_rel(torch.from_numpy(got), torch.from_numpy(want))
    assert r["macs"]["total"] == dense["macs"]["total"]


@pytest.mark.parametrize("finest, dilations", [(4, (11,)), (8, ())])
def test_the_timed_forward_runs_without_the_multiply_add_hooks(tmp_path, monkeypatch, finest,
                                                                dilations):
    """The counter's hooks ran inside the timed forward (on CUDA a device-to-host copy per
    adaptive layer): hooks made slow must not show in the time, and the counts stay exact. A
    dense network is counted once per image size."""
    import time

    from cad_spconv.macs import MacCounter

    stack, rgb = thin_vgg(), _scene()
    expected = Extractor(_config(tmp_path, finest, dilations), stack).run(rgb)["macs"]
    add, calls = MacCounter._add, []

    # 10 convs: 1 s per counted forward, twice the bound below, which leaves a tiny forward
    # room on a busy 2-core CI machine
    def slow(self, *args):
        calls.append(1)
        time.sleep(0.1)
        return add(self, *args)
    monkeypatch.setattr(MacCounter, "_add", slow)
    ex = Extractor(_config(tmp_path, finest, dilations), stack)
    for _ in range(2):
        r = ex.run(rgb)
        assert r["time_s"] < 0.5, r["time_s"]
        assert r["macs"]["total"] == expected["total"] and r["macs"]["parts"] == expected["parts"]
    assert len(calls) == (10 if finest == 8 else 20)


@pytest.mark.parametrize("finest", [1, 4])
def test_extracted_descriptors_none_kept_equal_dense_stride_8(tmp_path, finest):
    """Dilations 0 constrain nothing: every cell takes the stride-8 feature of its 8x8 block."""
    stack = thin_vgg(seed=10 + finest)
    L = (8 // finest).bit_length() - 1
    r = Extractor(_config(tmp_path, finest, (0,) * L), stack).run(_scene(seed=1))
    assert (r["plan"].levels == L).all()
    dense8 = Extractor(_config(tmp_path, 8, ()), stack).run(_scene(seed=1))
    s = 8 // finest
    up = dense8["features"].repeat_interleave(s, 2).repeat_interleave(s, 3)
    assert_rel(r["features"], up)
    got = sample_descriptors(r["features"][0], r["xy"], SIZE, np.float64)
    want = sample_descriptors(up[0], dense8["xy"], SIZE, np.float64)
    assert_rel(torch.from_numpy(got), torch.from_numpy(want))
    assert r["macs"]["total"] == dense8["macs"]["total"]


def test_real_width_vgg16_adaptive_all_kept_equals_dense_stride_2(tmp_path):
    """Once with the real VGG16 widths (512-d descriptors), random weights, float64."""
    torch.manual_seed(0)
    stack = vgg16_conv4_3().double().eval()
    ex = Extractor(_config(tmp_path, 2, (99, 99)), stack)
    r = ex.run(_scene((16, 24)))
    dense = Extractor(_config(tmp_path, 2, ()), stack).run(_scene((16, 24)))
    assert r["features"].shape == (1, 512, 8, 12)
    assert_rel(r["features"], dense["features"])


def test_reference_semantics_runs_the_centre_anchored_network(tmp_path):
    """``--semantics reference``: the adapter's centre-anchored sites. Everything kept still
    equals the dense network (no coarse site to anchor); a mixed plan differs from the paper
    semantics only where coarse sites read their taps."""
    stack = thin_vgg(seed=5)
    rgb = _scene(seed=3)
    ref = Extractor(_config(tmp_path, 2, (9, 17), semantics="reference"), stack)
    paper = Extractor(_config(tmp_path, 2, (9, 17)), stack)
    assert ref.net.net.semantics == "reference" and paper.net.net.semantics == "paper"
    r, p = ref.run(rgb), paper.run(rgb)
    assert 0 < float(r["plan"].level_fractions()[0, 0]) < 1
    assert not torch.allclose(r["features"], p["features"])
    x = caffe_tensor(rgb, dtype=torch.float64)
    # each against the independent emulation of its semantics on the same plan
    levels = r["plan"].levels.cpu().numpy()
    with torch.no_grad():
        for got, semantics in ((r, "reference"), (p, "paper")):
            assert_rel(got["features"],
                       emu.vgg_features(stack, x, levels, 2, 8, semantics=semantics).dense())
    big = Extractor(_config(tmp_path, 2, (99, 99), semantics="reference"), stack).run(rgb)
    with torch.no_grad():
        assert_rel(big["features"], dense_reference(stack, x, 2))


def test_checkpoints_pickling_other_objects_are_refused_with_the_fix(tmp_path):
    import argparse

    ckpt = d2_checkpoint(vgg16_conv4_3())
    ckpt["args"] = argparse.Namespace(lr=1e-3)  # as D2-Net's training checkpoints hold
    torch.save(ckpt, tmp_path / "train.pth")
    with pytest.raises(CheckpointError, match="keep its tensors only"):
        load_d2_weights(str(tmp_path / "train.pth"))


@pytest.mark.parametrize("mask", ["random", "inverted"])
def test_ablation_plans_are_drawn_per_image_and_reproducibly(tmp_path, mask):
    """Each image draws its random / inverted plan from its own stream (the seed, the sequence
    and the image number): other images get other plans, the same image the same one."""
    ex = Extractor(_config(tmp_path, 2, (5, 9), mask=mask, seed=4), thin_vgg(scale=32))
    xy = np.array([[5.0, 7.0], [20.0, 11.0], [33.0, 25.0]])
    size = (64, 96)

    def levels(sequence, k):
        return ex.plan(xy, size, sequence, k).levels[0].numpy()
    base = levels("v_a", 2)
    np.testing.assert_array_equal(levels("v_a", 2), base)
    for other in (("v_a", 3), ("i_b", 2)):
        assert not np.array_equal(levels(*other), base), other
