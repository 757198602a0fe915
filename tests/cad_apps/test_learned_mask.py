"""The learned mask: estimator layout, Gumbel sampling, the dense blend of the paper's training
recipe against torchvision's own stride-8 / stride-16 networks, and training on tiny synthetic
data (the loss falls, the budget steers rho_hat, resuming is exact)."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet, resnet50
from torchvision.models.segmentation.fcn import FCN, FCNHead

from adapters.output_stride import output_stride
from cad_apps import cli
from cad_apps.blended import BlendedSegmenter
from cad_apps.train_mask import TrainConfig, build_model, feature_channels, train
from cad_spconv.learned_mask import MaskEstimator, budget_loss
from tests.support.inputs import synthetic_items


# ------------------------------------------------------------------ estimator
def test_estimator_layout_is_the_papers():
    est = MaskEstimator(512)
    expected = {"0.weight": (128, 512, 3, 3), "0.bias": (128,), "2.weight": (64, 128, 3, 3),
                "2.bias": (64,), "5.weight": (64, 64, 3, 3), "5.bias": (64,),
                "7.weight": (2, 64, 3, 3), "7.bias": (2,)}
    assert {k: tuple(v.shape) for k, v in est.state_dict().items()} == expected
    assert isinstance(est[4], nn.MaxPool2d) and est[4].kernel_size == 2 and est[4].stride == 2
    assert all(isinstance(est[i], nn.ReLU) for i in (1, 3, 6))
    assert all(est[i].padding == (1, 1) for i in (0, 2, 5, 7))


def test_estimator_loads_reference_checkpoint_keys():
    src = MaskEstimator(16)
    ckpt = {"model_state": {"backbone.mask_estimator." + k: v for k, v in src.state_dict().items()},
            "cur_itrs": 10}
    ckpt["model_state"]["backbone.layer1.0.conv1.weight"] = torch.zeros(1)
    est = MaskEstimator(16)
    est.load_reference(ckpt)
    for k, v in src.state_dict().items():
        assert torch.equal(est.state_dict()[k], v)
    with pytest.raises(KeyError, match="mask_estimator"):
        est.load_reference({"model_state": {"backbone.layer1.0.conv1.weight": torch.zeros(1)}})


@pytest.mark.parametrize("size", [(9, 13), (8, 12)])
def test_estimator_keep_is_the_argmax_on_the_finest_grid(size):
    torch.manual_seed(0)
    est = MaskEstimator(16).double()
    with torch.no_grad():  # a decisive last layer, so both decisions occur
        est[7].weight.normal_(0, 1)
        est[7].bias.zero_()
    x = torch.randn(2, 16, *size, dtype=torch.float64)
    logits = est.logits(x)
    h, w = -(-size[0] // 2), -(-size[1] // 2)
    assert logits.shape == (2, 2, h, w)
    keep = est(x)
    assert keep.dtype == torch.bool and keep.shape == (2, 1, *size)
    # the reference code's channel order (its eval backbone): channel 1 is "downsample here",
    # so its published estimators load as they are
    low = (logits[:, 1] > logits[:, 0]).numpy()
    expected = np.zeros((2, *size), dtype=bool)
    for b in range(2):
        for y in range(size[0]):
            for x_ in range(size[1]):
                expected[b, y, x_] = not low[b, y // 2, x_ // 2]
    np.testing.assert_array_equal(keep[:, 0].numpy(), expected)
    assert 0 < expected.mean() < 1


def test_gumbel_sample_is_hard_and_differentiable():
    torch.manual_seed(1)
    est = MaskEstimator(8)
    x = torch.randn(3, 8, 11, 10)
    low = est.sample(x)
    assert low.shape == (3, 1, 6, 5)
    assert set(low.unique().tolist()) <= {0.0, 1.0}
    loss = budget_loss(low, 0.5)
    assert torch.isclose(loss, (0.5 - low.mean()) ** 2)
    loss.backward()
    assert est[7].weight.grad is not None and est[7].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="rho"):
        budget_loss(low, 1.5)


def test_estimator_rejects_wrong_features():
    with pytest.raises(ValueError, match=r"\[B, 512, H0, W0\]"):
        MaskEstimator(512)(torch.zeros(1, 256, 8, 8))
    with pytest.raises(ValueError, match="power of two"):
        MaskEstimator(512, downsample=3)


# ------------------------------------------------------------------ stride configurations
@pytest.mark.parametrize("stride,replace", [(8, [False, True, True]), (16, [False, False, True]),
                                                   (32, [False, False, False])])
def test_output_stride_matches_torchvision_replace_stride_with_dilation(stride, replace):
    model = resnet50(weights=None)
    target = resnet50(weights=None, replace_stride_with_dilation=replace)

    def geometry(m):
        return [(n, c.stride, c.dilation, c.padding) for n, c in m.named_modules()
                if isinstance(c, nn.Conv2d)]

    before = geometry(model)
    with output_stride(model, stride):
        assert geometry(model) == geometry(target)
    assert geometry(model) == before  # restored


# ------------------------------------------------------------------ the blend
def small_fcn(replace, num_classes=3):
    """A real torchvision ResNet (Bottleneck, narrow) in an FCN, at a given dilation setting."""
    trunk = ResNet(Bottleneck, [1, 2, 1, 1], width_per_group=8, replace_stride_with_dilation=replace)
    backbone = IntermediateLayerGetter(trunk, return_layers={"layer4": "out"})
    return FCN(backbone, FCNHead(2048, num_classes), None)


def test_blend_equals_torchvision_stride_8_and_16_paths():
    torch.manual_seed(2)
    fine = small_fcn([False, True, True]).double().eval()
    coarse = small_fcn([False, False, True]).double().eval()
    coarse.load_state_dict(fine.state_dict())
    est = MaskEstimator(512).double()
    blended = BlendedSegmenter(fine, est).eval()
    images = torch.randn(2, 3, 61, 83, dtype=torch.float64)

    with torch.no_grad():
        f8 = fine.backbone(images)["out"]
        f16 = coarse.backbone(images)["out"]
        H0, W0 = f8.shape[-2:]
        up16 = f16.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :H0, :W0]
        mask = (torch.rand(2, 1, -(-H0 // 2), -(-W0 // 2)) < 0.5).double()
        m = mask.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :H0, :W0]
        seen = {}
        fine.classifier.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0]))
        for forced in (torch.zeros_like(mask), torch.ones_like(mask), mask):
            # the first sample blends the paths, the second (the reference's) is the rate
            draws = iter((forced, 1 - forced))
            est.sample_logits = lambda logits, tau=None, draws=draws: next(draws)
            out = blended(images)
            expected = forced.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, :H0, :W0]
            torch.testing.assert_close(seen["x"], expected * up16 + (1 - expected) * f8,
                                       rtol=1e-12, atol=1e-12)
            assert torch.equal(out["low_res"], forced)
            assert out["rho_hat"] == (1 - forced).mean()
        est.sample_logits = lambda logits, tau=None: torch.zeros_like(mask)
        torch.testing.assert_close(blended(images)["out"], fine(images)["out"], rtol=1e-12, atol=1e-12)
        est.sample_logits = lambda logits, tau=None: torch.ones_like(mask)
        head16 = F.interpolate(fine.classifier(up16), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
        torch.testing.assert_close(blended(images)["out"], head16, rtol=1e-12, atol=1e-12)
        assert 0 < float(m.mean()) < 1
        # the coarse path runs on its own batch-norm statistics, the fine one on the model's
        bn = blended.low_res["layer3"][0].bn1
        bn.running_mean += 0.5
        assert not torch.allclose(blended(images)["out"], head16)
        est.sample_logits = lambda logits, tau=None: torch.zeros_like(mask)
        torch.testing.assert_close(blended(images)["out"], fine(images)["out"], rtol=1e-12,
                                   atol=1e-12)
        bn.running_mean -= 0.5
    # the backbone is left at its own stride configuration
    torch.testing.assert_close(fine.backbone(images)["out"], f8, rtol=0, atol=0)


def test_blend_rejects_mismatched_estimator():
    model = small_fcn([False, True, True])
    with pytest.raises(ValueError, match="downsample=4"):
        BlendedSegmenter(model, MaskEstimator(512), 8, 32)


# ------------------------------------------------------------------ training
def tiny_blended(seed=0):
    torch.manual_seed(seed)
    model = build_model("fcn_tiny", 3)
    est = MaskEstimator(feature_channels(model, 8))
    return BlendedSegmenter(model, est)


def run(rho, iters, seed=0):
    # a short schedule needs a faster estimator than the reference's 0.01 x lr over 30k steps
    cfg = TrainConfig(iters=iters, batch_size=2, crop_size=40, lr=0.02, estimator_lr_mult=0.5,
                      backbone_lr_mult=1.0, rho=rho, budget_weight=4.0, save_every=0, seed=seed,
                      scale_range=(0.75, 1.25))
    return train(tiny_blended(seed), synthetic_items(8), cfg, progress=False)


def test_each_group_follows_the_poly_schedule_at_its_multiplier(monkeypatch):
    """Every step: estimator, backbone and head at ``lr * (1 - i / iters) ** 0.9`` times their
    own multiplier (the reference's 0.01 / 0.1 / 1 by default), and the budget loss on the
    reference's second Gumbel sample (``rate_sample``), not on the sample that blends the
    paths."""
    import cad_spconv.learned_mask as LM
    from cad_apps import blended as B

    iters = 3
    cfg = TrainConfig(iters=iters, batch_size=2, crop_size=40, lr=0.02, save_every=0)
    net = tiny_blended()
    role = {id(p): "estimator" for p in net.estimator.parameters()}
    role.update({id(p): "backbone" for p in net.model.backbone.parameters()})
    mult = {"estimator": cfg.estimator_lr_mult, "backbone": cfg.backbone_lr_mult, "head": 1.0}
    seen = []

    def record(optimizer, args, kwargs):
        seen.append({role.get(id(g["params"][0]), "head"): g["lr"]
                     for g in optimizer.param_groups})
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(record)
    outs, budgets = [], []
    forward = B.BlendedSegmenter.forward
    monkeypatch.setattr(B.BlendedSegmenter, "forward",
                        lambda self, *a, **k: outs.append(forward(self, *a, **k)) or outs[-1])
    budget_loss = LM.budget_loss
    monkeypatch.setattr(LM, "budget_loss",
                        lambda sample, rho: budgets.append(sample) or budget_loss(sample, rho))
    try:
        train(net, synthetic_items(4), cfg, progress=False)
    finally:
        handle.remove()
    assert len(seen) == iters
    for i, lrs in enumerate(seen):
        base = cfg.lr * (1 - i / iters) ** 0.9
        assert lrs == pytest.approx({k: base * m for k, m in mult.items()}, rel=1e-12)
    assert len(budgets) == iters
    assert all(b is out["rate_sample"] for b, out in zip(budgets, outs))
    assert not all(torch.equal(out["rate_sample"], out["low_res"]) for out in outs)


def test_augmentation_moves_image_and_labels_together():
    """Scale 1, crops larger than the image (padding), flips: every label still sits on its
    own pixel (channel 0 carries the label), and exactly the padding is ignore (channel 1 is 1
    on the image, 0 on the padding)."""
    from cad_apps.train_mask import _augment
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 19, (13, 17), generator=gen)
    image = torch.stack([target.double(), torch.ones(13, 17, dtype=torch.float64),
                         torch.zeros(13, 17, dtype=torch.float64)])
    cfg = TrainConfig(crop_size=20, scale_range=(1.0, 1.0), color_jitter=0.0)
    flipped = set()
    for seed in range(8):
        img, tgt = _augment(image, target, cfg, torch.Generator().manual_seed(seed))
        on_image = tgt != cfg.ignore_index
        assert torch.equal(on_image, img[1] == 1) and int(on_image.sum()) == 13 * 17
        assert torch.equal(img[0][on_image].long(), tgt[on_image])
        rows = on_image.any(1).nonzero()[:, 0]
        cols = on_image.any(0).nonzero()[:, 0]
        inner = tgt[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        flipped.add(torch.equal(inner, target.flip(-1)))
        assert torch.equal(inner, target) or torch.equal(inner, target.flip(-1))
    assert flipped == {False, True}


def test_training_loss_falls_and_budget_steers_rho_hat():
    iters = 24
    runs = {rho: run(rho, iters) for rho in (0.75, 0.25)}
    ends = {}
    for rho, hist in runs.items():
        assert len(hist) == iters and [r["iteration"] for r in hist] == list(range(1, iters + 1))
        first = np.mean([r["task_loss"] for r in hist[:4]])
        last = np.mean([r["task_loss"] for r in hist[-4:]])
        assert last < 0.8 * first, (rho, first, last)
        start = np.mean([r["rho_hat"] for r in hist[:3]])
        ends[rho] = end = np.mean([r["rho_hat"] for r in hist[-6:]])
        assert abs(end - rho) < abs(start - rho), (rho, start, end)
        assert abs(end - rho) < 0.15, (rho, end)
    assert ends[0.75] > ends[0.25] + 0.3, ends


def test_resume_continues_exactly(tmp_path):
    data = synthetic_items(5, seed=3)
    cfg = TrainConfig(iters=4, batch_size=2, crop_size=32, lr=0.01, save_every=2, seed=5)
    straight = tiny_blended(1)
    h_straight = train(straight, data, cfg, progress=False)

    out = str(tmp_path / "run")
    first = tiny_blended(1)
    cut = cfg
    # crash in the third step, after the checkpoint of iteration 2
    calls = {"n": 0}
    forward = first.forward

    def crash_after_two(*a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return forward(*a, **k)

    first.forward = crash_after_two
    with pytest.raises(KeyboardInterrupt):
        train(first, data, cut, out_dir=out, progress=False, meta={"model": "fcn_tiny"})
    assert sorted(os.listdir(out)) == ["history.json", "last.pt"]  # no temporary files left
    resumed = tiny_blended(7)  # different init: everything must come from the checkpoint
    h_resumed = train(resumed, data, cut, out_dir=out, resume=True, progress=False,
                      meta={"model": "fcn_tiny"})
    assert [r["loss"] for r in h_resumed] == [r["loss"] for r in h_straight]
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="model: 'fcn_tiny' in the checkpoint vs 'other' now"):
        train(tiny_blended(1), data, cut, out_dir=out, resume=True, progress=False,
              meta={"model": "other"})
    with pytest.raises(ValueError, match="rho: 0.5 in the checkpoint vs 0.3 now"):
        train(tiny_blended(1), data, dataclasses.replace(cut, rho=0.3), out_dir=out, resume=True,
              progress=False, meta={"model": "fcn_tiny"})
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(tiny_blended(1), data, cut, out_dir=str(tmp_path / "empty"), resume=True, progress=False)


def test_cli_train_mask_on_synthetic_cityscapes(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "2", "--batch-size", "2",
            "--crop-size", "48", "--out", out, "--no-progress", "--no-eval"]
    assert cli.main(argv) == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "last.pt"))
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    est_keys = {"backbone.mask_estimator." + k for k in MaskEstimator(64).state_dict()}
    assert state["cur_itrs"] == 2 and est_keys <= set(state["model_state"])
    # a train-mask checkpoint initialises the estimator of a new run
    out2 = str(tmp_path / "run2")
    assert cli.main(argv[:-3] + [out2, "--no-progress", "--no-eval", "--iters", "0",
                                 "--estimator-weights", os.path.join(out, "last.pt")]) == 0
    state2 = torch.load(os.path.join(out2, "last.pt"), weights_only=True)
    assert state2["cur_itrs"] == 0
    for k in est_keys:
        assert torch.equal(state2["model_state"][k], state["model_state"][k]), k
    # ... but not one trained for other strides (the checkpoint records them)
    capsys.readouterr()
    assert cli.main(argv[:-3] + [str(tmp_path / "run3"), "--no-progress", "--no-eval",
                                 "--iters", "0", "--coarsest-stride", "32",
                                 "--estimator-weights", os.path.join(out, "last.pt")]) == 2
    assert "trained for strides 8->16, this run uses 8->32" in capsys.readouterr().err
    assert cli.main(["train-mask", "--out", out, "--no-eval"]) == 2
    assert "exactly one of --data-root or --synthetic" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--workers", "-1"], "--workers must be >= 0 (0 loads the data in the main process), got -1"),
    (["--rho", "1.5"], "--rho (target fraction of low-resolution cells) must lie in [0, 1]"),
    (["--tau", "0"], "--tau must be > 0, got 0.0"),
    (["--color-jitter", "1"], "--color-jitter must lie in [0, 1), got 1.0"),
    (["--crop-size", "0"], "--iters >= 0, --batch-size >= 1 and --crop-size >= 1 are required"),
])
def test_cli_settings_are_refused_by_option_before_an_old_run_is_cleared(tmp_path, capsys,
                                                                         argv, message):
    """Bad settings are refused naming the option, before ``--overwrite`` removes anything of
    the run in OUT (``--workers -1`` was refused by torch's data loader, as num_workers, after
    the old run's eval.json was gone)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt", "eval.json"):  # stand-ins: nothing may touch them
        (out / name).write_bytes(b"old " + name.encode())
    assert cli.main(["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "1",
                     "--batch-size", "2", "--crop-size", "32", "--out", str(out),
                     "--no-progress", "--overwrite", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert sorted(os.listdir(out)) == ["eval.json", "last.pt"]
    assert (out / "eval.json").read_bytes() == b"old eval.json"


def test_cli_refuses_to_replace_or_mix_runs(tmp_path, capsys):
    """An existing run is not replaced without --overwrite; --resume with other settings is
    refused, naming them; fcn_tiny takes no weights."""
    out = str(tmp_path / "run")
    argv = ["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "1", "--batch-size", "1",
            "--crop-size", "32", "--out", out, "--no-progress", "--no-eval"]
    assert cli.main(argv) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    assert cli.main(argv) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    assert cli.main(argv + ["--resume", "--rho", "0.3", "--iters", "2"]) == 2
    err = capsys.readouterr().err
    assert "rho: 0.5 in the checkpoint vs 0.3 now" in err and "iters" in err
    stale = os.path.join(out, "eval.json")
    with open(stale, "w") as f:
        f.write("{}")
    assert cli.main(argv + ["--overwrite", "--iters", "2"]) == 0
    assert not os.path.exists(stale)  # the old run's evaluation is not left beside the new run
    assert cli.main(argv[:-1] + ["--weights", "x.pth", "--no-eval"]) == 2
    assert "random weights only" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--save-every", "-1"]) == 2
    assert "--save-every must be >= 0" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--coarsest-stride", "12"]) == 2
    assert "--coarsest-stride 12: coarsest_stride must be a power of two" in capsys.readouterr().err
    assert cli.main(argv + ["--resume", "--eval-images", "1"]) == 2
    assert "--no-eval skips: drop one of them" in capsys.readouterr().err
    # a second writer of the same --out is refused with a message, not a traceback
    from cad_apps.io import OutputLock
    with OutputLock(os.path.join(out, "last.pt")):
        assert cli.main(argv + ["--resume", "--iters", "2"]) == 2
    assert "being written by another running process" in capsys.readouterr().err
    # --resume on a file that is not a train-mask checkpoint: a message, not a traceback
    for content in (b"", b"truncated", None):
        if content is None:
            torch.save({"model_state": {}}, os.path.join(out, "last.pt"))
        else:
            with open(os.path.join(out, "last.pt"), "wb") as f:
                f.write(content)
        assert cli.main(argv + ["--resume", "--iters", "3"]) == 2
        err = capsys.readouterr().err
        assert "cad-spconv train-mask: error:" in err and "Traceback" not in err
    assert "is not a train-mask checkpoint" in err


def test_a_diverged_run_stops_before_saving_its_state(tmp_path, capsys, monkeypatch):
    """A NaN / Inf loss crashed at the first save ("Out of range float values are not JSON
    compliant") after last.pt got NaN weights and without history.json: it stops at the first
    non-finite loss, naming the iteration and --lr, and saves nothing of that state (nor keeps
    what it made for itself when nothing was saved); a non-finite --lr or multiplier is refused
    up front."""
    from cad_apps.train_mask import DivergedError

    out = str(tmp_path / "run")
    argv = ["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "6", "--save-every",
            "2", "--batch-size", "2", "--crop-size", "32", "--device", "cpu", "--out", out,
            "--no-progress", "--no-eval"]
    for bad in (["--lr", "nan"], ["--lr", "inf"], ["--backbone-lr-mult", "-1"],
                ["--estimator-lr-mult", "nan"]):
        assert cli.main(argv + bad) == 2
        assert f"{bad[0]} must be a finite number >= 0, got" in capsys.readouterr().err
        assert not os.path.exists(out)
    assert cli.main(argv + ["--lr", "1e12"]) == 2
    err = capsys.readouterr().err
    assert ("training diverged: the loss is nan" in err and "at iteration 2; nothing was saved; "
            "start again with a lower --lr (now 1e+12)" in err), err
    # it left OUT behind with its synthetic data and lock file: what it made goes, and it says so
    assert f"; removed {out}, which this run had made" in err, err
    assert not os.path.exists(out)
    os.makedirs(out)  # in a folder of the user's, only what the run made in it
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")
    assert cli.main(argv + ["--lr", "1e12"]) == 2
    err = capsys.readouterr().err
    assert "last.pt.lock, " in err and "synthetic, which this run had made" in err, err
    assert os.listdir(out) == ["notes.txt"]
    # --overwrite of a run, diverging before its first save: the old run stays, and the advice
    # keeps --overwrite (without it the command is refused: OUT holds a run)
    assert cli.main(argv[:argv.index("--out")] + ["--lr", "0.01", "--iters", "1",
                                                 *argv[argv.index("--out"):]]) == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    assert cli.main(argv + ["--lr", "1e12", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert ("at iteration 2; nothing was saved (" + os.path.join(out, "last.pt") + " still "
            "holds the run started over); start again with a lower --lr (now 1e+12) and "
            "--overwrite") in err, err
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    # diverging after a save keeps that save, and the advice says how to start over
    data = synthetic_items(4, seed=2)
    cfg = TrainConfig(iters=4, batch_size=2, crop_size=32, lr=0.01, save_every=1)
    blended = tiny_blended(0)
    forward, calls = blended.forward, {"n": 0}

    def nan_on_third(*a, **k):
        calls["n"] += 1
        res = forward(*a, **k)
        return dict(res, out=res["out"] * float("nan")) if calls["n"] == 3 else res

    blended.forward = nan_on_third
    out2 = str(tmp_path / "run2")
    with pytest.raises(DivergedError, match=r"at iteration 3; .*last.pt still holds iteration 2; "
                                            r"start again with a lower --lr \(now 0.01\) and "
                                            r"--overwrite"):
        train(blended, data, cfg, out_dir=out2, progress=False)
    assert torch.load(os.path.join(out2, "last.pt"), weights_only=True)["cur_itrs"] == 2
    with open(os.path.join(out2, "history.json")) as f:
        assert len(json.load(f)) == 2
    # a finite loss whose step made the weights non-finite: the save is refused too
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, closure=None: [
        p.data.fill_(float("inf")) for g in self.param_groups for p in g["params"]])
    with pytest.raises(DivergedError, match="weight tensors are not finite .* at iteration 1; "
                                            "nothing was saved"):
        train(tiny_blended(0), data, dataclasses.replace(cfg, iters=1),
              out_dir=str(tmp_path / "run3"), progress=False)
    assert not os.path.exists(str(tmp_path / "run3" / "last.pt"))


def test_resume_on_other_data_is_refused(tmp_path, capsys):
    """--resume continued silently on another --data-root (the data were not in meta): the
    training images are recorded (count, names) and compared, wherever the folder is (a copy
    or a symlink resumes); runs written before they were recorded still resume."""
    import shutil

    from cad_apps.data import make_synthetic_cityscapes

    roots = []
    for i, n in enumerate((2, 3)):
        roots.append(str(tmp_path / f"cs{i}"))
        make_synthetic_cityscapes(roots[-1], "train", num_images=n, size=(32, 64))
    out = str(tmp_path / "run")
    argv = ["train-mask", "--model", "fcn_tiny", "--iters", "1", "--batch-size", "1",
            "--crop-size", "32", "--device", "cpu", "--out", out, "--no-progress", "--no-eval"]
    assert cli.main(argv + ["--data-root", roots[0]]) == 0
    path = os.path.join(out, "last.pt")
    state = torch.load(path, weights_only=True)
    assert state["meta"]["data_root"] == roots[0] and state["meta"]["train_images"] == 2
    resume = argv + ["--resume"]
    assert cli.main(resume + ["--data-root", roots[1]]) == 2
    err = capsys.readouterr().err
    assert "train_images: 2 in the checkpoint vs 3 now" in err and "train_ids_sha256" in err, err
    assert cli.main(resume + ["--synthetic"]) == 2
    assert "train_images: 2 in the checkpoint vs 8 now" in capsys.readouterr().err
    assert torch.load(path, weights_only=True)["cur_itrs"] == 1
    # the same images elsewhere: a copy (node-local scratch) or a symlink
    shutil.copytree(roots[0], tmp_path / "copy")
    os.symlink(roots[0], tmp_path / "link")
    for root in ("copy", "link"):
        assert cli.main(resume + ["--data-root", str(tmp_path / root)]) == 0, \
            capsys.readouterr().err
    for key in ("train_images", "train_ids_sha256"):  # a run from before the data were recorded
        del state["meta"][key]
    torch.save(state, path)
    assert cli.main(resume + ["--data-root", roots[1]]) == 0
    assert torch.load(path, weights_only=True)["meta"]["train_images"] == 3


def test_deeplabv3_with_a_batch_of_one_is_refused_up_front(tmp_path, capsys):
    """DeepLabV3 with --batch-size 1 failed with torch's raw batch-norm error after the model
    was built and the data written: refused first, naming --batch-size and --freeze-model."""
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    out = tmp_path / "run"
    assert cli.main(["train-mask", "--synthetic", "--model", "deeplabv3_resnet50",
                     "--batch-size", "1", "--out", str(out), "--no-progress", "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert ("--model deeplabv3_resnet50 with --batch-size 1: DeepLabV3's ASPP pooling branch"
            in err and "--batch-size 2 or more, or --freeze-model" in err), err
    assert not out.exists()
    # train() itself: any model with an ASPP pooling branch, unless the model is frozen
    blended = tiny_blended(0)
    blended.model.probe = ASPPPooling(4, 4)  # never run: the check comes first
    cfg = TrainConfig(iters=1, batch_size=1, crop_size=32, save_every=0)
    with pytest.raises(ValueError, match="batch_size 1: DeepLabV3's ASPP pooling branch"):
        train(blended, synthetic_items(2), cfg, progress=False)
    train(blended, synthetic_items(2), dataclasses.replace(cfg, freeze_model=True),
          progress=False)


def test_seed_fixes_the_initial_weights(tmp_path):
    """--seed seeds everything: the same seed gives the same losses, another seed others."""
    losses = []
    for i, seed in enumerate((3, 3, 4)):
        out = str(tmp_path / f"r{i}")
        assert cli.main(["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "2",
                         "--batch-size", "1", "--crop-size", "32", "--seed", str(seed), "--out",
                         out, "--no-progress", "--no-eval"]) == 0
        with open(os.path.join(out, "history.json")) as f:
            losses.append([r["loss"] for r in json.load(f)])
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_the_two_paths_share_weights_and_keep_their_own_statistics():
    torch.manual_seed(0)
    blended = tiny_blended(0)
    high = blended.model.backbone.layer3
    low = blended.low_res["layer3"]
    assert low[0].conv1.weight is high[0].conv1.weight and low[0].bn1.weight is high[0].bn1.weight
    assert low[0].bn1.running_mean is not high[0].bn1.running_mean
    cfg = TrainConfig(iters=2, batch_size=2, crop_size=32, save_every=0, seed=1)
    train(blended, synthetic_items(4), cfg, progress=False)
    assert not torch.equal(low[0].bn1.running_mean, high[0].bn1.running_mean)
    assert low[0].bn1.momentum == high[0].bn1.momentum == cfg.bn_momentum == 0.01
    # the reference layout holds both copies and loads back
    from cad_apps.blended import load_reference_state, reference_state
    state = reference_state(blended)
    assert any(k.startswith("backbone.layer3_low_res.") for k in state)
    assert any(k.startswith("backbone.layer3_high_res.") for k in state)
    other = tiny_blended(5)
    load_reference_state(other, state)
    for (k, a), b in zip(blended.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


# ------------------------------------------------------------------ auxiliary heads, refusals
def tiny_with_aux(num_classes=19):
    """fcn_tiny with torchvision's auxiliary head on layer3 (as weights trained with
    aux_loss=True carry: aux_classifier.* keys)."""
    model = build_model("fcn_tiny", num_classes)
    model.backbone.return_layers = {"layer4": "out", "layer3": "aux"}
    model.aux_classifier = FCNHead(64, num_classes)
    return model


def test_aux_head_is_neither_trained_nor_stored_and_resume_loads(tmp_path):
    from cad_apps.blended import load_reference_state, reference_state
    from cad_apps.checkpoints import CheckpointMismatchError

    def blended_aux(seed):
        torch.manual_seed(seed)
        model = tiny_with_aux(3)
        return BlendedSegmenter(model, MaskEstimator(feature_channels(model, 8)))

    data = synthetic_items(4, seed=2)
    cfg = TrainConfig(iters=2, batch_size=2, crop_size=32, save_every=1, seed=4)
    first = blended_aux(1)
    aux_before = {k: v.clone() for k, v in first.model.aux_classifier.state_dict().items()}
    out = str(tmp_path / "run")
    train(first, data, cfg, out_dir=out, progress=False)
    for k, v in first.model.aux_classifier.state_dict().items():
        assert torch.equal(v, aux_before[k]), k  # unused: not trained
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert not any(k.startswith("aux_classifier.") for k in state["model_state"])
    # resume: the stored state loads into a model with an auxiliary head (it was refused)
    resumed = blended_aux(9)
    train(resumed, data, cfg, out_dir=out, resume=True, progress=False)
    for (k, a), b in zip(first.state_dict().items(), resumed.state_dict().values()):
        if not k.startswith("model.aux_classifier."):
            assert torch.equal(a, b), k
    # reference_state / load_reference_state are inverse for a model with or without the head
    plain = tiny_blended(3)  # no auxiliary head
    load_reference_state(plain, reference_state(first))
    load_reference_state(plain, dict(reference_state(first), **{
        f"aux_classifier.{k}": v for k, v in first.model.aux_classifier.state_dict().items()}))
    with_aux = dict(reference_state(first), **{f"aux_classifier.{k}": v for k, v in
                                                first.model.aux_classifier.state_dict().items()})
    other = blended_aux(5)
    load_reference_state(other, with_aux)
    assert torch.equal(other.model.aux_classifier[4].weight, first.model.aux_classifier[4].weight)
    # a mismatched state is a clear KeyError naming the keys, nothing loaded (not RuntimeError)
    broken = dict(reference_state(first))
    broken.pop("classifier.classifier.4.bias")
    broken["backbone.extra.weight"] = torch.zeros(1)
    before = [v.clone() for v in other.state_dict().values()]
    with pytest.raises(CheckpointMismatchError, match=r"(?s)1 missing keys: classifier\.classifier"
                                                      r"\.4\.bias.*1 unexpected keys: backbone"):
        load_reference_state(other, broken)
    assert all(torch.equal(a, b) for a, b in zip(before, other.state_dict().values()))


def _fake_weights(num_classes=19, aux=True):
    """build_model stand-in for --weights: a tiny FCN (with an auxiliary head) loaded from the
    file, so the CLI path of real aux_loss=True weights runs in a second."""
    def build(name, n, weights=None):
        if weights is None:
            return build_model(name, n)
        model = tiny_with_aux(num_classes) if aux else build_model("fcn_tiny", num_classes)
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model
    return build


def test_cli_weights_with_aux_head_train_evaluate_and_resume(tmp_path, capsys, monkeypatch):
    from cad_apps import train_mask

    weights = str(tmp_path / "aux.pth")
    torch.manual_seed(0)
    torch.save(tiny_with_aux().state_dict(), weights)
    monkeypatch.setattr(train_mask, "build_model", _fake_weights())
    out = str(tmp_path / "run")
    argv = ["train-mask", "--synthetic", "--model", "fcn_resnet50", "--weights", weights,
            "--iters", "2", "--save-every", "1", "--batch-size", "1", "--crop-size", "32",
            "--out", out, "--no-progress", "--eval-images", "1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "trained 2 iterations" in printed and "mIoU" in printed
    assert os.path.exists(os.path.join(out, "eval.json"))
    state = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert not any(k.startswith("aux_classifier.") for k in state["model_state"])
    os.remove(os.path.join(out, "eval.json"))
    assert cli.main(argv + ["--resume"]) == 0, capsys.readouterr().err
    assert "mIoU" in capsys.readouterr().out and os.path.exists(os.path.join(out, "eval.json"))


def test_cli_resume_of_a_mismatched_checkpoint_is_a_message(tmp_path, capsys):
    out = str(tmp_path / "run")
    argv = ["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "1", "--batch-size",
            "1", "--crop-size", "32", "--out", out, "--no-progress", "--no-eval"]
    assert cli.main(argv) == 0
    path = os.path.join(out, "last.pt")
    state = torch.load(path, weights_only=True)
    state["model_state"].pop("classifier.classifier.4.bias")
    torch.save(state, path)
    assert cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cad-spconv train-mask: error: --resume:" in err
    assert "1 missing keys: classifier.classifier.4.bias" in err and "--overwrite" in err
    state["model_state"]["classifier.classifier.4.bias"] = torch.zeros(19)  # intact weights,
    # an optimizer state of other parameters
    state["optimizer_state"]["param_groups"] = state["optimizer_state"]["param_groups"][:1]
    torch.save(state, path)
    assert cli.main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "optimizer state" in err and "--overwrite" in err


def test_cli_refuses_before_training(tmp_path, capsys, monkeypatch):
    """Class counts other than Cityscapes' 19, a missing val split, --eval-images 0 and
    DeepLabV3+ are refused before any training (nothing written)."""
    from cad_apps import train_mask
    from cad_apps.data import make_synthetic_cityscapes

    root = str(tmp_path / "cs")
    make_synthetic_cityscapes(root, "train", num_images=2, size=(32, 64))
    base = ["train-mask", "--data-root", root, "--model", "fcn_tiny", "--iters", "1",
            "--batch-size", "1", "--crop-size", "32", "--no-progress"]
    cases = [
        (["--num-classes", "5", "--no-eval"], "--num-classes 5: train-mask trains and evaluates "
                                              "on Cityscapes, whose labels are the 19 trainIds"),
        (["--num-classes", "21", "--no-eval"], "--num-classes 21"),
        ([], "no Cityscapes 'val' split"),
        ([], "train-mask evaluates on the val split after training: provide it, or pass "
             "--no-eval"),
        (["--eval-images", "0"], "--eval-images must be >= 1, got 0"),
    ]
    for i, (extra, message) in enumerate(cases):
        out = str(tmp_path / f"r{i}")
        assert cli.main(base + ["--out", out] + extra) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (extra, err)
        assert not os.path.exists(os.path.join(out, "last.pt")), extra
    # weights with another class count: refused once built, before training
    weights = str(tmp_path / "w21.pth")
    torch.save(build_model("fcn_tiny", 21).state_dict(), weights)
    monkeypatch.setattr(train_mask, "build_model", _fake_weights(21, aux=False))
    out = str(tmp_path / "w21")
    assert cli.main(["train-mask", "--data-root", root, "--model", "fcn_resnet50", "--weights",
                     weights, "--iters", "1", "--batch-size", "1", "--crop-size", "32", "--out",
                     out, "--no-progress", "--no-eval"]) == 2
    assert f"--weights {weights} predict 21 classes" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "last.pt"))
    # the val split is needed only for the evaluation
    assert cli.main(base + ["--out", str(tmp_path / "noval"), "--no-eval"]) == 0
    # DeepLabV3+ is not offered: its decoder needs features the two-path blend does not have
    with pytest.raises(SystemExit):
        cli.main(base + ["--out", str(tmp_path / "dlp"), "--model", "deeplabv3plus_resnet50"])
    assert "supports DeepLabV3 and FCN only" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "dlp"))


def test_blend_refuses_deeplabv3plus():
    from adapters.deeplabv3plus import deeplabv3plus_resnet

    trunk = ResNet(Bottleneck, [1, 1, 1, 1], width_per_group=8,
                   replace_stride_with_dilation=[False, True, True])
    model = deeplabv3plus_resnet(trunk, 3)
    with pytest.raises(TypeError, match="low_level.*DeepLabV3 and FCN heads only"):
        BlendedSegmenter(model, MaskEstimator(512))
