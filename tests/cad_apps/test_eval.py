"""``cad-spconv eval`` on a synthetic Cityscapes folder, against independent dense references.

The model is DeepLabV3-ResNet50 (same head and adapter path as ResNet-101, half the cost) with
random weights saved as a paper-format checkpoint; everything runs in float64 on tiny images,
so predictions of the converted model and the dense references agree pixel for pixel.
"""
import dataclasses
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models import get_model

from cad_apps.cli import main as cli
from cad_apps.data import CityscapesSegmentation, make_synthetic_cityscapes
from cad_apps.eval import EvalConfig, MaskSpec, dense_macs, evaluate, parse_mask
from cad_apps.io import write_json_atomic

MODEL = "deeplabv3_resnet50"
SIZE = (40, 56)  # finest grid 5x7 (odd), coarsest 3x4


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, num_images=3, size=SIZE, seed=3)
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(7)
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
    with torch.no_grad():  # tame the random net a little and make BN statistics non-trivial
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ckpt") / "best_deeplabv3_resnet50_cityscapes_os8.pth"
    state = {("classifier.classifier." + k[11:] if k.startswith("classifier.") else k): v
             for k, v in model.state_dict().items()}
    torch.save({"model_state": state}, path)
    return str(path), model.eval()


def run(fixture_root, checkpoint, tmp_path, mask, name=None, dtype="float64", timing=False, **kw):
    out = str(tmp_path / (name or f"{mask.replace(':', '_')}.json"))
    cfg = EvalConfig(data_root=fixture_root, out=out, model=MODEL, checkpoint=checkpoint[0],
                     mask=mask, dilation=kw.pop("dilation", 3), device="cpu", dtype=dtype,
                     num_workers=0, warmup=kw.pop("warmup", 0), progress=False, timing=timing,
                     **kw)
    return evaluate(cfg), out


@pytest.fixture(scope="module")
def edge_fresh(fixture_root, checkpoint, tmp_path_factory):
    """One uninterrupted single-process run, to compare resumed and distributed runs with."""
    return run(fixture_root, checkpoint, tmp_path_factory.mktemp("fresh"), "edge:0.35")[0]


def confusion(pred, target):
    t, p = target.reshape(-1).numpy(), pred.reshape(-1).numpy()
    keep = t != 255
    return np.bincount(t[keep] * 19 + p[keep], minlength=361).reshape(19, 19)


def miou(counts):
    tp = np.diag(counts).astype(float)
    union = counts.sum(0) + counts.sum(1) - np.diag(counts)
    ok = union > 0
    return float((tp[ok] / union[ok]).mean())


def reference_predictions(model, root, coarse: bool):
    """Dense float64 predictions: the stride-8 torchvision model, or (coarse) the stride-16
    ResNet with its features repeated onto the stride-8 grid and the head run there."""
    model = model.double()
    ds = CityscapesSegmentation(root)
    preds = {}
    for i in range(len(ds)):
        item = ds[i]
        x = item["image"][None].double()
        with torch.no_grad():
            if not coarse:
                logits = model(x)["out"]
            else:
                rn = get_model("resnet50", weights=None, replace_stride_with_dilation=[False, False, True])
                rn.load_state_dict(model.backbone.state_dict(), strict=False)
                rn = rn.double().eval()
                f = rn.maxpool(rn.relu(rn.bn1(rn.conv1(x))))
                f = rn.layer4(rn.layer3(rn.layer2(rn.layer1(f))))
                H0, W0 = math.ceil(x.shape[-2] / 8), math.ceil(x.shape[-1] / 8)
                f = f.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :H0, :W0]
                logits = F.interpolate(model.classifier(f), size=x.shape[-2:], mode="bilinear",
                                       align_corners=False)
        preds[item["id"]] = (logits.argmax(1)[0], item["target"])
    model.float()
    return preds


def test_parse_mask():
    assert parse_mask("edge:0.35") == MaskSpec("edge", threshold=0.35)
    assert str(parse_mask("random:0.3")) == "random:0.3"
    assert parse_mask("learned:/a/b.pth").path == "/a/b.pth"
    assert parse_mask("learned").path is None and str(parse_mask("learned")) == "learned"
    assert parse_mask("none").kind == "none" and parse_mask("ALL").kind == "all"
    for bad, msg in (("edge", "number"), ("edge:x", "number"), ("random:2", "<= 1"),
                     ("learned:", "PATH"), ("sobel:1", "unknown"), ("none:1", "no value")):
        with pytest.raises(ValueError, match=msg):
            parse_mask(bad)


@pytest.mark.parametrize("mask", ["all", "none"])
def test_dense_baselines_match_independent_references(fixture_root, checkpoint, tmp_path, mask):
    result, out = run(fixture_root, checkpoint, tmp_path, mask)
    ref = reference_predictions(checkpoint[1], fixture_root, coarse=mask == "none")
    total = np.zeros((19, 19), np.int64)
    for name, (pred, target) in ref.items():
        counts = confusion(pred, target)
        total += counts
        rec = result["images"][name]
        got = np.zeros((19, 19), np.int64)
        for t, p, n in rec["confusion"]:
            got[t, p] = n
        assert np.array_equal(got, counts), name
        fine = dense_macs(MODEL, 8, SIZE)
        coarse = dense_macs(MODEL, 16, SIZE)
        assert rec["macs_dense_finest"] == fine["total"]
        assert rec["macs_dense_coarsest"] == coarse["total"]
        if mask == "all":
            assert rec["macs"]["total"] == fine["total"] and rec["level0_share"] == 1.0
            assert rec["macs_fraction_of_finest"] == 1.0
        else:  # backbone of the stride-16 network, head densified at stride 8 (paper's setup)
            assert rec["macs"]["total"] == coarse["parts"]["backbone"] + fine["parts"]["classifier"]
            assert rec["level0_share"] == 0.0
    assert result["summary"]["miou"] == miou(total)
    assert result["summary"]["num_images"] == 3 and result["complete"]
    with open(out) as f:  # what is on disk is what was returned
        assert json.load(f)["summary"]["miou"] == result["summary"]["miou"]


def test_edge_mask_saves_predictions_that_score_the_same(fixture_root, checkpoint, tmp_path):
    preds_dir = tmp_path / "preds"
    result, _ = run(fixture_root, checkpoint, tmp_path, "edge:1.5", save_predictions=str(preds_dir),
                    batch_size=2, timing=True)
    ds = CityscapesSegmentation(fixture_root)
    total = np.zeros((19, 19), np.int64)
    for i, name in enumerate(ds.ids):
        city, frame = name.split("/")
        pred = np.asarray(Image.open(preds_dir / city / f"{frame}_pred_trainIds.png")).astype(np.int64)
        total += confusion(torch.from_numpy(pred), ds[i]["target"])
    s = result["summary"]
    assert s["miou"] == miou(total)
    for rec in result["images"].values():
        assert 0.0 < rec["level0_share"] < 1.0
        assert math.isclose(sum(rec["level_fractions"]), 1.0)
        assert rec["macs_dense_coarsest"] < rec["macs"]["total"] < rec["macs_dense_finest"]
        assert rec["macs"]["total"] == sum(v for k, v in rec["macs"].items() if k != "total")
        assert rec["time_s"] > 0
    assert s["macs_fraction_of_finest"] < 1.0 < s["macs_fraction_of_coarsest"]
    # a finished run resumed with --save-predictions into another folder would save nothing
    with pytest.raises(ValueError, match="3 images .* were evaluated without saving their "
                                         "predictions"):
        run(fixture_root, checkpoint, tmp_path, "edge:1.5", save_predictions=str(tmp_path / "p2"),
            batch_size=2, timing=True)
    run(fixture_root, checkpoint, tmp_path, "edge:1.5", save_predictions=str(preds_dir),
        batch_size=2, timing=True)  # the same folder: every PNG is there, the resume is fine


def test_resume_skips_done_images_and_matches_a_fresh_run(fixture_root, checkpoint, tmp_path,
                                                          edge_fresh):
    fresh = edge_fresh
    part, out = run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="resumed.json", limit=1)
    assert len(part["images"]) == 1 and part["complete"]
    # an "interrupted" file: one image done, then the whole split
    resumed, _ = run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="resumed.json")
    first = next(iter(part["images"]))
    assert resumed["images"][first] == part["images"][first]  # kept, not recomputed
    assert set(resumed["images"]) == set(fresh["images"])
    for k in fresh["images"]:
        a, b = fresh["images"][k], resumed["images"][k]
        assert a["confusion"] == b["confusion"] and a["macs"] == b["macs"]
    assert resumed["summary"]["miou"] == fresh["summary"]["miou"]
    with pytest.raises(ValueError, match=r"mask: 'edge:0.35' in the file vs 'edge:0.95' now"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.95", name="resumed.json")
    with pytest.raises(ValueError, match=r"dilation: 3 in the file vs 5 now"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="resumed.json", dilation=5)
    # a lower --limit would pool images it does not ask for into its summary
    with pytest.raises(ValueError, match=r"results of 2 images beyond --limit 1 .*--overwrite"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="resumed.json", limit=1)
    # a damaged body is refused when read, before any image is computed
    good = json.loads((tmp_path / "resumed.json").read_text())
    for damage, message in ((lambda d: d.update(images=[]), "'images' is not an object"),
                            (lambda d: d["images"][first].pop("confusion"),
                             f"the record of {first} lacks confusion")):
        broken = json.loads(json.dumps(good))
        damage(broken)
        (tmp_path / "damaged.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=rf"damaged \({message}\).*--overwrite"):
            run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="damaged.json")


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(str(path), {"a": 1})
    with pytest.raises(ValueError, match="Out of range float"):
        write_json_atomic(str(path), {"a": float("nan")})  # fails while serialising
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    # a symlinked output keeps its link (the target is replaced) and a file keeps its mode
    os.chmod(path, 0o600)
    link = tmp_path / "link.json"
    link.symlink_to(path)
    write_json_atomic(str(link), {"a": 2})
    assert link.is_symlink() and json.loads(path.read_text()) == {"a": 2}
    assert path.stat().st_mode & 0o777 == 0o600


def test_learned_mask_records_what_the_converted_model_computes(fixture_root, checkpoint, tmp_path):
    """``learned:P``: per image, the multiply-adds (estimator part included) and the kept
    fraction are those of the converted model run with the estimator as its ``keep``; the
    estimator is centred so that both decisions occur, its threshold in the middle of the widest
    gap between the central logit differences (eval runs channels-last, this reference NCHW: a
    threshold on a site would let rounding flip it)."""
    from adapters import convert
    from cad_apps.blended import features_before_adaptive
    from cad_spconv import count_macs
    from cad_spconv.learned_mask import MaskEstimator
    torch.manual_seed(0)
    model = checkpoint[1]
    est = MaskEstimator(512, downsample=2)
    ds = CityscapesSegmentation(fixture_root)
    images = torch.stack([ds[i]["image"] for i in range(2)])
    with torch.no_grad():
        logits = est.logits(features_before_adaptive(model, images, 8))
        diffs = (logits[:, 1] - logits[:, 0]).flatten().sort().values
        central = diffs[len(diffs) // 4: 3 * len(diffs) // 4 + 1]
        widest = (central[1:] - central[:-1]).argmax()
        assert central[widest + 1] - central[widest] > 1e-4
        est[7].bias[1] -= (central[widest] + central[widest + 1]) / 2
    path = tmp_path / "estimator.pth"
    torch.save({"model_state": {"backbone.mask_estimator." + k: v for k, v in est.state_dict().items()}},
               path)
    result, _ = run(fixture_root, checkpoint, tmp_path, f"learned:{path}", dtype="float32", limit=2)
    # an estimator file that says it was trained for other strides is refused
    trained = tmp_path / "estimator_8to32.pth"
    torch.save(dict(torch.load(path, weights_only=True),
                    meta={"finest_stride": 8, "coarsest_stride": 32}), trained)
    with pytest.raises(ValueError, match=r"trained for strides 8->32, this run uses 8->16"):
        run(fixture_root, checkpoint, tmp_path, f"learned:{trained}", dtype="float32", limit=2)
    cad = convert(model, 8, 16).eval()
    kept = []
    for i in range(2):
        rec = result["images"][ds.ids[i]]
        want = count_macs(cad, images[i:i + 1], est.eval())
        assert rec["macs"]["total"] == want["total"] and rec["macs"]["mask"] == want["parts"]["mask"]
        assert rec["macs"]["total"] == sum(v for k, v in rec["macs"].items() if k != "total")
        assert rec["level0_share"] == float(cad.last_plan.level_fractions()[0, 0])
        # the paper's count (ptflops convention): backbone with the estimator, head left out
        paper = want["ptflops"]["per_image_parts"]
        assert paper["mask"][0] > 0
        assert rec["macs_paper_ptflops"] == sum(paper[p][0] for p in ("dense", "sparse", "mask"))
        kept.append(rec["level0_share"])
    assert 0 < sum(kept) / 2 < 1


def test_oracle_and_ablation_masks_run(fixture_root, checkpoint, tmp_path):
    for mask in ("oracle", "inverted-edge:0.95", "shuffled-edge:0.95", "random:0.5"):
        result, _ = run(fixture_root, checkpoint, tmp_path, mask, dtype="float32", limit=1)
        rec = next(iter(result["images"].values()))
        assert rec["macs_dense_coarsest"] <= rec["macs"]["total"] <= rec["macs_dense_finest"] + 1
        if mask == "random:0.5":  # the level-0 share of the finest grid, to half a block
            assert abs(rec["level0_share"] - 0.5) <= 2 / 35


def test_files_from_before_a_mask_rule_changed_are_not_resumed(fixture_root, checkpoint,
                                                                tmp_path):
    """Random masks are drawn per image and the inverse is taken on the grid since 2026-12-05:
    a file written before (no "mask_rule" in its settings) is refused for those masks, which
    would mix both rules in one summary, and resumed for the others."""
    for mask, refused in (("random:0.5", True), ("inverted-edge:0.35", True),
                          ("edge:0.35", False)):
        _, out = run(fixture_root, checkpoint, tmp_path, mask, limit=1)
        old = json.loads(open(out).read())
        del old["config"]["mask_rule"]
        write_json_atomic(out, old)
        if refused:
            with pytest.raises(ValueError, match="mask_rule"):
                run(fixture_root, checkpoint, tmp_path, mask)
        else:
            assert len(run(fixture_root, checkpoint, tmp_path, mask)[0]["images"]) == 3


@pytest.mark.parametrize("mask", ["random:0.5", "shuffled-edge:0.95"])
def test_random_masks_depend_only_on_the_seed_and_the_image(fixture_root, checkpoint, tmp_path,
                                                            mask):
    """An image's random mask is drawn from its own generator (``--seed`` and its frame id), so
    the batch, a warm-up and a resume leave it as it is; another seed changes it."""
    plain, _ = run(fixture_root, checkpoint, tmp_path, mask, name="plain.json")
    batched, _ = run(fixture_root, checkpoint, tmp_path, mask, name="batched.json",
                     batch_size=2, timing=True, warmup=1)
    run(fixture_root, checkpoint, tmp_path, mask, name="resumed.json", limit=1)
    resumed, _ = run(fixture_root, checkpoint, tmp_path, mask, name="resumed.json")
    other, _ = run(fixture_root, checkpoint, tmp_path, mask, name="other.json", seed=1)
    assert len(plain["images"]) == 3
    for k, rec in plain["images"].items():
        for again in (batched, resumed):
            assert again["images"][k]["confusion"] == rec["confusion"], k
            assert again["images"][k]["macs"] == rec["macs"], k
            assert again["images"][k]["level0_share"] == rec["level0_share"], k
    # the masks themselves, on frames large enough for edge masks that keep part of the grid:
    # per image, whatever the batch; another seed draws others
    from cad_apps.data import collate
    from cad_apps.eval.segmenter import Segmenter

    make_synthetic_cityscapes(tmp_path / "large", num_images=3, size=(128, 256), seed=4)
    dataset = CityscapesSegmentation(str(tmp_path / "large"), "val")
    batch = collate([dataset[i] for i in range(len(dataset))])
    images, targets, ids = batch["image"].double(), batch["target"], batch["id"]
    cfg = EvalConfig(data_root=fixture_root, out="", model=MODEL, checkpoint=checkpoint[0],
                     mask=mask, dilation=3, device="cpu", dtype="float64", num_workers=0)
    seg = Segmenter(cfg, torch.device("cpu"))
    together = seg.keep_for(images, targets, ids)
    alone = torch.cat([seg.keep_for(images[i:i + 1], targets[i:i + 1], ids[i:i + 1])
                       for i in reversed(range(len(ids)))]).flip(0)
    assert torch.equal(together, alone)
    reseeded = Segmenter(dataclasses.replace(cfg, seed=1), torch.device("cpu"))
    assert not torch.equal(reseeded.keep_for(images, targets, ids), together)


def test_cli_reports_clear_errors(fixture_root, tmp_path, capsys):
    rc = cli(["eval", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "x.json"),
              "--device", "cpu", "--model", MODEL])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    coco = tmp_path / "coco21.pth"
    torch.save(get_model(MODEL, weights=None, weights_backbone=None, num_classes=21).state_dict(), coco)
    rc = cli(["eval", "--data-root", fixture_root, "--out", str(tmp_path / "x.json"), "--device",
              "cpu", "--model", MODEL, "--checkpoint", str(coco), "--num-workers", "0"])
    assert rc == 2 and "21 classes" in capsys.readouterr().err
    rc = cli(["eval", "--data-root", fixture_root, "--out", str(tmp_path / "x.json"), "--device",
              "cpu", "--model", MODEL, "--mask", "edge"])
    assert rc == 2 and "needs a number" in capsys.readouterr().err


def test_im2col_dilated_computes_the_aspp_as_gemms(fixture_root, checkpoint, tmp_path,
                                                    edge_fresh, monkeypatch):
    """``--im2col-dilated``: the ASPP's three dilated convs run as GEMMs (in float64 the same
    predictions and counts as the run without), also under bfloat16 autocast; a resume
    without the option is refused; where it would change nothing it is refused."""
    import adapters.dilated

    calls, real = [], adapters.dilated._im2col
    monkeypatch.setattr(adapters.dilated, "_im2col",
                        lambda x, *a, **k: calls.append(x.dtype) or real(x, *a, **k))
    result, _ = run(fixture_root, checkpoint, tmp_path, "edge:0.35", im2col_dilated=True)
    assert calls == [torch.float64] * 3 * 3  # 3 convs, 3 images (untimed: one pass each)
    assert result["config"]["im2col_dilated"] is True
    for k, rec in edge_fresh["images"].items():
        assert result["images"][k]["confusion"] == rec["confusion"]
        assert result["images"][k]["macs"] == rec["macs"]
    with pytest.raises(ValueError, match=r"im2col_dilated: True in the file vs False now"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.35")
    calls.clear()
    low, _ = run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="bf16.json",
                 dtype="bfloat16", im2col_dilated=True, limit=1)
    assert calls == [torch.bfloat16] * 3 and len(low["images"]) == 1
    with pytest.raises(ValueError, match=r"no dense conv with dilation >= 6 .*--sparse-head"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="s.json", sparse_head=True,
            im2col_dilated=True)
    from cad_apps.eval.segmenter import Segmenter

    cfg = EvalConfig(data_root=fixture_root, out=str(tmp_path / "c.json"), model=MODEL,
                     im2col_dilated=True)
    with pytest.raises(ValueError, match="on cuda they stay torch's convs"):
        Segmenter(cfg, "cuda")
    import cad_apps.data
    import cad_apps.eval.loop

    def unread(*args, **kwargs):
        raise AssertionError("the data was read (hashed) before the refusal")

    with monkeypatch.context() as patch:
        patch.setattr(cad_apps.eval.loop, "resolve_device", lambda device: "cuda")
        patch.setattr(cad_apps.data, "CityscapesSegmentation", unread)
        with pytest.raises(ValueError, match="on cuda they stay torch's convs.*--device cpu"):
            evaluate(dataclasses.replace(cfg, device="cuda"))
    assert not os.path.exists(cfg.out)
    # one model for several settings (experiments.overlays): swapped once, found swapped after
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=19,
                      aux_loss=False)
    for mask in ("edge:0.35", "none"):
        Segmenter(dataclasses.replace(cfg, mask=mask), "cpu", model=model)


def test_results_from_before_im2col_dilated_resume_as_without_it(fixture_root, checkpoint,
                                                                  tmp_path):
    """Files written before the option record no ``im2col_dilated``: they were computed
    without it, resume so and are refused with it."""
    run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="old.json", limit=1)
    path = tmp_path / "old.json"
    old = json.loads(path.read_text())
    del old["config"]["im2col_dilated"]
    write_json_atomic(str(path), old)
    resumed, _ = run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="old.json", limit=1)
    assert resumed["images"] == old["images"]
    with pytest.raises(ValueError, match=r"im2col_dilated: False in the file vs True now"):
        run(fixture_root, checkpoint, tmp_path, "edge:0.35", name="old.json", limit=1,
            im2col_dilated=True)


def torchrun_eval(data_root, checkpoint, out, mask):
    """``cad-spconv eval`` under ``torchrun --nproc_per_node=2`` on CPU (gloo)."""
    import subprocess
    import sys

    from tests.support.inputs import REPO
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cad_apps.cli", "eval", "--data-root", str(data_root), "--model", MODEL,
           "--checkpoint", checkpoint[0], "--mask", mask, "--dilation", "3", "--device", "cpu",
           "--dtype", "float64", "--num-workers", "0", "--no-timing", "--no-progress",
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_two_processes_merge_to_the_single_process_result(fixture_root, checkpoint, tmp_path,
                                                                   edge_fresh):
    single = edge_fresh
    out = tmp_path / "dist.json"
    proc = torchrun_eval(fixture_root, checkpoint, out, "edge:0.35")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = json.loads(out.read_text())
    assert merged["environment"]["world_size"] == 2 and merged["complete"]
    assert set(merged["images"]) == set(single["images"])
    for k, rec in single["images"].items():
        assert merged["images"][k]["confusion"] == rec["confusion"]
        assert merged["images"][k]["macs"] == rec["macs"]
    assert merged["summary"]["miou"] == single["summary"]["miou"]
    assert "mIoU" in proc.stdout


def test_output_problems_are_found_before_any_work(fixture_root, checkpoint, tmp_path):
    """A second writer on one --out is refused while the first is alive; --out a directory,
    a bad device or a negative warm-up are refused before an image is computed."""
    from cad_apps.io import OutputBusyError, OutputLock
    out = tmp_path / "locked.json"
    with OutputLock(str(out)):
        with pytest.raises(OutputBusyError, match="being written by another running process"):
            run(fixture_root, checkpoint, tmp_path, "none", name="locked.json")
    assert not out.exists()
    for bad, msg in ((dict(out=str(tmp_path)), "is a directory"),
                     (dict(device="tpu"), "use cpu, cuda"), (dict(device="meta"), "only cpu and cuda"),
                     (dict(device="nonsense"), "is not a device"),
                     (dict(warmup=-1), "--warmup must be >= 0")):
        cfg = EvalConfig(**{**dict(data_root=fixture_root, out=str(tmp_path / "x.json"),
                                   checkpoint=checkpoint[0], device="cpu"), **bad})
        with pytest.raises(ValueError, match=msg):
            evaluate(cfg)
    assert not (tmp_path / "x.json").exists()
    from cad_apps.cli import build_parser
    from cad_apps.eval import config_from_args
    argv = ["eval", "--data-root", fixture_root, "--out", str(tmp_path / "x.json")]
    with pytest.raises(ValueError, match="--warmup .* --no-timing skips timing: drop one"):
        config_from_args(build_parser("eval").parse_args(argv + ["--warmup", "3", "--no-timing"]))
    assert config_from_args(build_parser("eval").parse_args(argv)).warmup == 1
    assert config_from_args(build_parser("eval").parse_args(argv + ["--warmup", "0",
                                                                    "--no-timing"])).warmup == 0
    assert config_from_args(build_parser("eval").parse_args(argv + ["--no-timing"])).timing is False


def test_split_without_labels_and_broken_images(tmp_path, checkpoint):
    """A split whose labels are all ignored (Cityscapes' test split) gives a summary without
    mIoU instead of a crash; a truncated image is named."""
    from cad_apps.eval import format_summary
    root = tmp_path / "cs"
    make_synthetic_cityscapes(root, split="test", num_images=1, size=SIZE, seed=1)
    label = next((root / "gtFine" / "test").rglob("*_labelIds.png"))
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(label)  # all 'unlabeled'
    cfg = EvalConfig(data_root=str(root), out=str(tmp_path / "t.json"), split="test",
                     checkpoint=checkpoint[0], mask="none", device="cpu", num_workers=0,
                     progress=False, timing=False, warmup=0)
    result = evaluate(cfg)
    assert result["summary"]["miou"] is None and result["summary"]["pixel_accuracy"] is None
    assert "n/a (no labelled pixels)" in format_summary(result)
    image = next((root / "leftImg8bit" / "test").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"cannot read the image {image}"):
        evaluate(dataclasses.replace(cfg, out=str(tmp_path / "t2.json")))


def test_resuming_with_other_weights_at_the_same_path_is_refused(fixture_root, checkpoint,
                                                                 tmp_path):
    """A retrained checkpoint written over the old file is another setting: the results file
    records the weights' SHA-256, so a resume cannot mix two networks' images."""
    import shutil

    path = tmp_path / "ckpt.pth"
    shutil.copy(checkpoint[0], path)
    mine = (str(path), checkpoint[1])
    run(fixture_root, mine, tmp_path, "none", name="r.json", limit=1)
    run(fixture_root, mine, tmp_path, "none", name="r.json", limit=2)  # same bytes: resumes
    state = torch.load(path, weights_only=True)
    key = next(k for k, v in state["model_state"].items() if v.is_floating_point())
    state["model_state"][key] = state["model_state"][key] + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="written with other settings .*files_sha256"):
        run(fixture_root, mine, tmp_path, "none", name="r.json")
    # a file from before the hashes resumes (checked by path, as then) and gets them
    old = json.loads((tmp_path / "r.json").read_text())
    del old["config"]["files_sha256"]
    (tmp_path / "r.json").write_text(json.dumps(old))
    resumed, _ = run(fixture_root, mine, tmp_path, "none", name="r.json")
    assert resumed["summary"]["num_images"] == 3
    assert resumed["config"]["files_sha256"]["checkpoint"] is not None


def test_commands_print_os_errors_and_interrupts_in_one_line(monkeypatch, capsys):
    """A full disk or a refused write is a message (exit 2); Ctrl-C says that what was written
    is complete (exit 130); a DataLoader worker's error shows its last line only."""
    import cad_apps.eval as ev
    from cad_apps import cli
    from cad_apps.io import error_text

    def full(cfg):
        raise OSError(28, "No space left on device", "/x/r.json")

    monkeypatch.setattr(ev, "evaluate", full)
    argv = ["eval", "--data-root", ".", "--out", "/tmp/x.json", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "error: [Errno 28] No space left on device: '/x/r.json'" in capsys.readouterr().err

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    assert cli.main(argv) == 130
    assert "interrupted; files written so far are complete" in capsys.readouterr().err
    worker = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback "
                        "(most recent call last):\n  File \"x.py\", line 1\nValueError: image "
                        "a.png is truncated")
    assert error_text(worker) == "ValueError: image a.png is truncated"


def test_interrupt_advice_never_discards_the_saved_work(tmp_path, monkeypatch, capsys):
    """After Ctrl-C the advice said "resume with the same command" even with --overwrite (which
    discards the saved work) and "plus --resume" for train-mask --overwrite (which --resume
    excludes): it is built from the run's own arguments. Both resume only from a save of the
    interrupted run (an earlier run's file is not one: eval --overwrite replaces it only at its
    first write, and resuming it would be refused for its other settings). A save is told from
    an earlier run's file by the file's identity, not by clocks."""
    import cad_apps.eval as ev
    import cad_apps.train_mask as tm
    from cad_apps import cli

    saves = []

    def interrupted(args=None, *a, **k):
        saved = saves.pop() if saves else None
        if saved:  # this run saved before the interruption, atomically as the apps do
            tmp = saved.with_name(saved.name + ".tmp")
            tmp.write_bytes(b"saved")
            # a file's mtime comes from the kernel's coarse clock, which can read a few ms
            # before the run's start by time.time() (CI once failed so): never compare them
            os.utime(tmp, (1, 1))
            os.replace(tmp, saved)
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "evaluate", interrupted)
    monkeypatch.setattr(tm, "_main", interrupted)
    (tmp_path / "o").mkdir()
    ckpt, out = tmp_path / "o" / "last.pt", tmp_path / "x.json"
    for earlier in (ckpt, out):
        earlier.write_bytes(b"an earlier run")
        os.utime(earlier, (0, 0))
    o, x = str(tmp_path / "o"), str(out)
    cases = [
        (out, ["eval", "--data-root", ".", "--out", x, "--overwrite", "--device", "cpu"],
         f"without --overwrite: cad-spconv eval --data-root . --out {x} --device cpu\n"),
        (None, ["eval", "--data-root", ".", "--out", x], "with the same command\n"),
        (ckpt, ["train-mask", "--synthetic", "--overw", "--out", o],
         f"--resume in place of --overwrite: cad-spconv train-mask --synthetic --resume --out "
         f"{o}\n"),
        (ckpt, ["train-mask", "--synthetic", "--out", o],
         f"same command plus --resume: cad-spconv train-mask --synthetic --out {o} --resume\n"),
        (None, ["train-mask", "--synthetic", "--out", o, "--resume"], "with the same command\n"),
    ]
    for saved, argv, advice in cases:
        saves.append(saved)
        assert cli.main(argv) == 130
        err = capsys.readouterr().err
        assert "interrupted; files written so far are complete; " in err and err.endswith(advice)
        for earlier in (ckpt, out):  # from now on an earlier run's again
            os.utime(earlier, (0, 0))
    # interrupted before its first save: the file there is an earlier run's
    for argv, advice in (
            (["train-mask", "--synthetic", "--overwrite", "--out", o], " (a save comes every "
             "--save-every iterations)"),
            (["train-mask", "--synthetic", "--out", str(tmp_path / "fresh")], " (a save comes "
             "every --save-every iterations)"),
            (["eval", "--data-root", ".", "--out", x, "--overwrite"], ""),
            (["eval", "--data-root", ".", "--out", str(tmp_path / "new.json"), "--overwrite"],
             "")):
        saves.append(None)
        assert cli.main(argv) == 130
        assert capsys.readouterr().err.endswith(
            f"nothing of this run was saved yet{advice}: run the same command again\n")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc (a folder where no "
                    "file can be created)")
def test_an_uncreatable_lock_is_not_reported_as_a_busy_output():
    from cad_apps.io import OutputLock
    with pytest.raises(ValueError, match="cannot create its lock file"):
        with OutputLock("/proc/cad_spconv_test.json"):
            pass


def test_a_batch_time_is_shared_by_its_images(fixture_root, checkpoint, tmp_path, monkeypatch):
    """Timed forwards of a batch of 2 on a clock that moves 1 s per reading: each image's time
    is half the batch's."""
    import itertools
    import types

    from cad_apps.eval import segmenter
    clock = itertools.count()
    monkeypatch.setattr(segmenter, "time", types.SimpleNamespace(
        perf_counter=lambda: float(next(clock))))
    result, _ = run(fixture_root, checkpoint, tmp_path, "none", timing=True, batch_size=2,
                    limit=2)
    assert [r["time_s"] for r in result["images"].values()] == [0.5, 0.5]


@pytest.mark.parametrize("field,other", [
    ("model", "fcn_resnet50"), ("checkpoint", "other.pth"), ("split", "test"),
    ("finest_stride", 4), ("coarsest_stride", 32), ("dense", 8), ("semantics", "reference"),
    ("mask", "edge:0.95"), ("dilation", 5), ("sparse_head", True), ("dtype", "float64"),
    ("im2col_dilated", True), ("seed", 1)])
def test_every_setting_that_changes_results_is_in_the_resume_fingerprint(field, other):
    """A resume compares fingerprints: each setting that changes an image's result must be in
    it (one left out would let a resume mix two settings in one summary)."""
    import dataclasses

    from cad_apps.eval import EvalConfig
    cfg = EvalConfig(data_root="d", out="o.json", model="deeplabv3_resnet50")
    changed = dataclasses.replace(cfg, **{field: other}, **(
        {"mask": None} if field == "dense" else {}))
    a, b = cfg.fingerprint(), changed.fingerprint()
    assert a[field] != b[field]


def test_summary_pools_images_as_documented():
    """Means over images, the median time, and multiply-add fractions as ratios of sums."""
    from cad_apps.eval import summarize
    recs = {k: {"confusion": [], "macs": {"total": m}, "macs_dense_finest": f,
                "macs_dense_coarsest": c, "level0_share": 0.5, "time_s": t,
                "time_device": "cpu (A)"}
            for k, m, f, c, t in (("a", 2, 4, 1, 0.1), ("b", 3, 4, 1, 0.2), ("c", 5, 8, 2, 0.6))}
    s = summarize(recs)
    assert s["time_per_image_s_median"] == 0.2
    assert s["time_per_image_s_mean"] == pytest.approx(0.3, abs=1e-15)
    assert s["macs_fraction_of_finest"] == 10 / 16 and s["macs_fraction_of_coarsest"] == 10 / 4
    assert s["macs_mean"]["total"] == pytest.approx(10 / 3, abs=1e-15)


def test_times_from_other_machines_are_flagged_not_pooled_silently():
    from cad_apps.eval import format_summary, summarize
    rec = {"confusion": [], "macs": {"total": 2}, "macs_dense_finest": 4,
           "macs_dense_coarsest": 1, "level0_share": 0.5, "time_s": 0.1, "time_device": "cpu (A)"}
    one = summarize({"a": rec, "b": dict(rec, time_s=0.3)})
    assert one["time_devices"] == ["cpu (A)"]
    mixed = summarize({"a": rec, "b": dict(rec, time_device="cuda (H200)")})
    assert mixed["time_devices"] == ["cpu (A)", "cuda (H200)"]
    result = {"summary": mixed, "config": {"model": "m", "mask": "none", "finest_stride": 8,
                                           "coarsest_stride": 16}}
    assert "MIXED over cpu (A), cuda (H200)" in format_summary(result)


def test_a_resume_on_other_data_under_the_same_frame_ids_is_refused(checkpoint, tmp_path):
    """Another --data-root with the same frame ids (other pixels) would mix two datasets in one
    summary: each record holds the SHA-256 of its image and label files, which a resume
    compares. A moved copy of the same data resumes, and so does a file written before the
    hashes."""
    import shutil

    a, b, moved = tmp_path / "a", tmp_path / "b", tmp_path / "moved"
    make_synthetic_cityscapes(a, num_images=3, size=SIZE, seed=1)
    make_synthetic_cityscapes(b, num_images=3, size=SIZE, seed=5)
    assert CityscapesSegmentation(str(a)).ids == CityscapesSegmentation(str(b)).ids
    first, out = run(str(a), checkpoint, tmp_path, "none", name="r.json", limit=1)
    assert first["config"]["data_root"] == str(a)
    with pytest.raises(ValueError, match=rf"r.json holds results of .* computed from another "
                                         rf"image file than {b}.*another --data-root than {a}"):
        run(str(b), checkpoint, tmp_path, "none", name="r.json", limit=2)
    shutil.copytree(a, moved)
    resumed, _ = run(str(moved), checkpoint, tmp_path, "none", name="r.json", limit=2)
    assert len(resumed["images"]) == 2 and resumed["config"]["data_root"] == str(moved)
    old = json.loads(open(out).read())  # a file from before the hashes: resumed as then
    for rec in old["images"].values():
        del rec["input_sha256"]
    del old["config"]["data_root"]
    write_json_atomic(out, old)
    assert len(run(str(b), checkpoint, tmp_path, "none", name="r.json")[0]["images"]) == 3


def test_a_predictions_folder_belongs_to_one_run(fixture_root, checkpoint, tmp_path):
    """--save-predictions names its run (DIR/cad-spconv-eval.json): a run with other settings
    and another --out is refused instead of overwriting the PNGs, and after --overwrite took
    the folder, the first run's resume is refused instead of taking them as its own. A folder
    of PNGs that names no run is refused too, except for the resume of a file from before."""
    preds = tmp_path / "preds"
    run(fixture_root, checkpoint, tmp_path, "none", name="r1.json", limit=1,
        save_predictions=str(preds))
    png = next(preds.rglob("*_pred_trainIds.png"))
    before = png.read_bytes()
    with pytest.raises(ValueError, match=rf"--save-predictions {preds} holds the predictions "
                                         rf"of another run, {tmp_path / 'r1.json'} \(mask: "
                                         rf"'none' there vs 'all' now\).*--overwrite"):
        run(fixture_root, checkpoint, tmp_path, "all", name="r2.json", limit=1,
            save_predictions=str(preds))
    assert png.read_bytes() == before
    run(fixture_root, checkpoint, tmp_path, "all", name="r2.json", limit=1,
        save_predictions=str(preds), overwrite=True)
    with pytest.raises(ValueError, match=r"holds the predictions of another run, .*r2.json"):
        run(fixture_root, checkpoint, tmp_path, "none", name="r1.json", limit=2,
            save_predictions=str(preds))
    (preds / "cad-spconv-eval.json").unlink()
    with pytest.raises(ValueError, match=r"holds predictions that name no run"):
        run(fixture_root, checkpoint, tmp_path, "none", name="r3.json", limit=1,
            save_predictions=str(preds))
    old = json.loads((tmp_path / "r2.json").read_text())  # a file from before run ids
    del old["run"]
    write_json_atomic(str(tmp_path / "r2.json"), old)
    run(fixture_root, checkpoint, tmp_path, "all", name="r2.json", limit=2,
        save_predictions=str(preds))
    manifest = json.loads((preds / "cad-spconv-eval.json").read_text())
    assert manifest["run"] == json.loads((tmp_path / "r2.json").read_text())["run"]


def test_a_resume_does_not_take_the_pngs_of_a_run_that_left_its_folder(
        fixture_root, checkpoint, tmp_path):
    """Run 1 saves its predictions into P; --overwrite starts the same --out over without
    --save-predictions (run 2); run 2's resume with --save-predictions P is refused: P names
    run 1, whose results file no longer holds it, and its PNGs (mask none) would pass for run
    2's (mask all). With --overwrite the folder is taken over and the PNGs are rewritten."""
    preds = tmp_path / "preds"
    run(fixture_root, checkpoint, tmp_path, "none", name="r.json", limit=1,
        save_predictions=str(preds))
    png = next(preds.rglob("*_pred_trainIds.png"))
    before = png.read_bytes()
    run(fixture_root, checkpoint, tmp_path, "all", name="r.json", limit=1, overwrite=True)
    with pytest.raises(ValueError, match=rf"--save-predictions {preds} holds the predictions "
                                         rf"of another run, {tmp_path / 'r.json'} \(no longer "
                                         rf"in its results file\).*--overwrite"):
        run(fixture_root, checkpoint, tmp_path, "all", name="r.json", limit=2,
            save_predictions=str(preds))
    assert png.read_bytes() == before
    manifest = json.loads((preds / "cad-spconv-eval.json").read_text())
    assert manifest["config"]["mask"] == "none"  # still run 1's
    results, _ = run(fixture_root, checkpoint, tmp_path, "all", name="r.json", limit=2,
                     save_predictions=str(preds), overwrite=True)
    manifest = json.loads((preds / "cad-spconv-eval.json").read_text())
    assert manifest["run"] == results["run"] and len(results["images"]) == 2
    # and a legitimate resume of the run that now holds the folder goes on
    assert len(run(fixture_root, checkpoint, tmp_path, "all", name="r.json",
                   save_predictions=str(preds))[0]["images"]) == 3


def test_torchrun_an_input_error_on_one_rank_stops_every_rank_with_its_message(
        fixture_root, checkpoint, tmp_path):
    """A corrupt image in rank 1's first step: both ranks print its one-line message and exit
    with 2 (rank 0 no longer fails inside gloo with a traceback), and the record rank 0
    computed in that step is written."""
    import shutil

    root = tmp_path / "cs"
    shutil.copytree(fixture_root, root)
    ds = CityscapesSegmentation(str(root))
    with open(ds.images[1], "wb") as f:  # rank 1 takes index 1, rank 0 indices 0 and 2
        f.write(b"\x89PNG garbage")
    out = tmp_path / "dist.json"
    proc = torchrun_eval(root, checkpoint, out, "none")
    assert proc.returncode != 0
    message = f"cad-spconv eval: error: cannot read the image {ds.images[1]}"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]
    assert "gloo" not in proc.stderr and "[rank" not in proc.stderr, proc.stderr[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(\d+)", proc.stderr)) == {"2"}  # torchrun's report
    assert list(json.loads(out.read_text())["images"]) == [ds.ids[0]]


def test_an_error_that_does_not_pickle_reaches_the_other_ranks_as_its_built_in_base():
    from cad_apps.distributed import _portable

    class Odd(ValueError):  # a local class: not picklable
        pass

    class OddDecode(UnicodeDecodeError):  # a built-in base that needs other arguments
        pass

    plain = ValueError("bad input")
    assert _portable(plain) is plain
    copy = _portable(Odd("bad input"))  # its built-in base: still a one-line input error
    assert type(copy) is ValueError and str(copy) == "Odd: bad input"
    copy = _portable(OddDecode("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert type(copy) is RuntimeError and str(copy).startswith("OddDecode: 'utf-8' codec")


def test_a_label_file_that_is_not_8_bit_label_ids_is_named(checkpoint, tmp_path, capsys):
    """A 1-bit label PNG was a TypeError traceback: it is one line naming the file and the
    format expected (exit 2); float, multi-channel and out-of-range label images too."""
    root = tmp_path / "cs"
    make_synthetic_cityscapes(root, num_images=1, size=SIZE, seed=1)
    ds = CityscapesSegmentation(str(root))
    label = ds.targets[0]
    ids = np.asarray(Image.open(label))
    Image.fromarray(ids > 10).save(label)  # mode "1"
    rc = cli(["eval", "--data-root", str(root), "--out", str(tmp_path / "x.json"), "--device",
              "cpu", "--model", MODEL, "--checkpoint", checkpoint[0], "--mask", "none",
              "--num-workers", "0", "--no-progress", "--no-timing"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert (f"error: {label} has 1-bit pixels; labels must be an 8-bit single-channel PNG of "
            "Cityscapes labelIds") in err
    for image, fmt, problem in (  # a float map saved under the .png name (PNG has no floats)
            (Image.fromarray(ids.astype(np.float32)), "TIFF", "float32 pixels"),
            (Image.fromarray(np.stack([ids] * 3, -1)), "PNG", "3 channels"),
            (Image.fromarray((ids.astype(np.uint16) + 1000)), "PNG", "values 1000..")):
        image.save(label, format=fmt)
        with pytest.raises(ValueError, match=f"{label} has {problem}"):
            ds.load_target(0)


def test_an_even_dilation_and_an_estimator_for_other_features_are_refused_before_any_image(
        fixture_root, checkpoint, tmp_path):
    """Both were found inside the first forward, after the model was built, by messages that
    named neither the option nor the fix."""
    from cad_apps.eval.segmenter import Segmenter
    from cad_spconv.learned_mask import MaskEstimator

    for mask in ("edge:0.35", "inverted-edge:0.35", "shuffled-edge:0.35", "oracle"):
        with pytest.raises(ValueError, match=r"--dilation must be odd .* got 4: use 3 or 5"):
            EvalConfig(data_root="missing", out="x.json", mask=mask, dilation=4).check()
    path = tmp_path / "estimator_1024.pth"
    torch.save(MaskEstimator(1024, downsample=2).state_dict(), path)
    cfg = EvalConfig(data_root=fixture_root, out=str(tmp_path / "x.json"), model=MODEL,
                     checkpoint=checkpoint[0], mask=f"learned:{path}", device="cpu",
                     num_workers=0)
    with pytest.raises(ValueError, match=rf"--mask learned:{path}: the estimator in {path} "
                                         rf"takes 1024-channel features, and {MODEL} gives 512 "
                                         r"channels at --finest-stride 8.*trained for this model"):
        Segmenter(cfg, torch.device("cpu"))


def test_an_even_dilation_is_kept_for_the_masks_that_do_not_dilate(fixture_root, checkpoint,
                                                                    tmp_path):
    """none / all / random / learned never read --dilation: an even value is not refused for
    them, so results files written before the check with such a value still resume."""
    for mask in ("none", "all", "random:0.5", "learned", "learned:est.pth"):
        EvalConfig(data_root="missing", out="x.json", mask=mask, dilation=10).check()
    EvalConfig(data_root="missing", out="x.json", dense=16).check()
    first, _ = run(fixture_root, checkpoint, tmp_path, "none", name="r.json", limit=1,
                   dilation=10)
    assert first["config"]["dilation"] == 10
    resumed, _ = run(fixture_root, checkpoint, tmp_path, "none", name="r.json", limit=2,
                     dilation=10)
    assert len(resumed["images"]) == 2


def test_one_setting_written_two_ways_resumes(fixture_root, checkpoint, tmp_path, monkeypatch):
    """The model read from --checkpoint and the same model named with --model, and a
    learned:PATH given relative and absolute, are one setting: a resume is not refused (files
    written before, with the path as typed, compare the same way)."""
    from cad_spconv.learned_mask import MaskEstimator

    monkeypatch.chdir(tmp_path)
    torch.save(MaskEstimator(512, downsample=2).state_dict(), tmp_path / "est.pth")
    base = dict(data_root=fixture_root, checkpoint=checkpoint[0], device="cpu", dtype="float64",
                num_workers=0, warmup=0, progress=False, timing=False, dilation=3)
    for first, then, out in (
            (dict(mask="none"), dict(mask="none", model=MODEL), "model.json"),
            (dict(mask="learned:est.pth", model=MODEL),
             dict(mask=f"learned:{tmp_path / 'est.pth'}", model=MODEL), "learned.json")):
        evaluate(EvalConfig(out=out, limit=1, **base, **first))
        assert len(evaluate(EvalConfig(out=out, limit=2, **base, **then))["images"]) == 2
        assert len(evaluate(EvalConfig(out=out, limit=3, **base, **first))["images"]) == 3
    old = json.loads((tmp_path / "learned.json").read_text())
    old["config"]["mask"] = "learned:est.pth"  # as files written before kept it
    write_json_atomic(str(tmp_path / "learned.json"), old)
    evaluate(EvalConfig(out="learned.json", **base, mask=f"learned:{tmp_path / 'est.pth'}",
                        model=MODEL))
    with pytest.raises(ValueError, match=r"model: 'deeplabv3_resnet50' in the file vs "
                                         r"'fcn_resnet50' now"):
        evaluate(EvalConfig(out="model.json", **base, mask="none", model="fcn_resnet50"))


def test_a_time_over_some_of_the_images_says_so():
    """A resume mixing timed and --no-timing sessions: the time is over the timed images only,
    and the summary says how many."""
    from cad_apps.eval import format_summary, summarize
    rec = {"confusion": [], "macs": {"total": 2}, "macs_dense_finest": 4,
           "macs_dense_coarsest": 1, "level0_share": 0.5, "time_s": 0.1, "time_device": "cpu (A)"}
    config = {"model": "m", "mask": "none", "finest_stride": 8, "coarsest_stride": 16}
    mixed = summarize({"a": rec, "b": dict(rec, time_s=None, time_device=None)})
    assert mixed["num_timed"] == 1 and mixed["time_per_image_s_mean"] == 0.1
    assert "time per image 100.0 ms (median 100.0 ms) (1 of 2 images timed)" in format_summary(
        {"summary": mixed, "config": config})
    timed = summarize({"a": rec, "b": rec})
    assert timed["num_timed"] == 2 and "timed)" not in format_summary({"summary": timed,
                                                                       "config": config})
