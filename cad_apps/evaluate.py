"""``cad-spconv eval``: a converted segmentation model on Cityscapes (Hesse et al., Sec. 4.2).

One path for every setting: the torchvision model (output stride 8, dilated) is converted with
:func:`adapters.convert` and run with a keep mask. ``--mask none`` keeps nothing (the dense
coarsest-stride baseline), ``--mask all`` keeps everything (the dense finest-stride baseline),
``edge:T``, ``learned:P`` and ``oracle`` are the paper's masks; ``random:F``,
``inverted-edge:T`` and ``shuffled-edge:T`` are the "inadequate mask" ablation.

Per image it records multiply-adds (absolute, per part, and as fractions of the dense
torchvision networks at the finest / coarsest output stride on the same image size), the
fraction of cells kept, the time of the forward pass (CUDA events on GPU, ``perf_counter`` on
CPU) and the image's confusion matrix; the summary holds mIoU
and per-class IoU over all images. The JSON file is rewritten atomically after every step, so an
interrupted run resumes where it stopped (images already in the file are skipped). Under
``torchrun --nproc_per_node=N`` each process evaluates a shard and rank 0 merges and writes.

Heavy imports live inside functions so ``cad-spconv --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from typing import Optional

from .distributed import Dist, init_distributed
from .io import write_json_atomic

FORMAT = "cad-spconv-eval/1"
MASK_HELP = ("edge:T (Sobel edges > T, paper: 0.15/0.35/0.95) | learned:PATH | oracle | none "
             "(dense coarsest stride) | all (dense finest stride) | random:F (a fraction F of "
             "finest cells kept at random) | inverted-edge:T | shuffled-edge:T (the edge mask's "
             "budget at random places)")
# settings that change the results; a resumed run must match them
_FINGERPRINT = ("model", "checkpoint", "split", "finest_stride", "coarsest_stride", "mask",
                "dilation", "sparse_head", "dtype", "seed")


# --------------------------------------------------------------------------- mask specification
@dataclass(frozen=True)
class MaskSpec:
    """A parsed ``--mask`` value."""

    kind: str  # edge | learned | oracle | none | all | random | inverted-edge | shuffled-edge
    threshold: float | None = None
    path: str | None = None
    fraction: float | None = None

    def __str__(self):
        if self.kind in ("edge", "inverted-edge", "shuffled-edge"):
            return f"{self.kind}:{self.threshold:g}"
        if self.kind == "random":
            return f"random:{self.fraction:g}"
        if self.kind == "learned":
            return f"learned:{self.path}"
        return self.kind


def parse_mask(text: str) -> MaskSpec:
    """Parse ``edge:0.35``, ``learned:PATH``, ``oracle``, ``none``, ``all``, ``random:0.3``,
    ``inverted-edge:0.35``, ``shuffled-edge:0.35``."""
    kind, _, value = str(text).partition(":")
    kind = kind.strip().lower()
    if kind in ("none", "all", "oracle"):
        if value:
            raise ValueError(f"--mask {kind} takes no value, got {text!r}")
        return MaskSpec(kind)
    if kind in ("edge", "inverted-edge", "shuffled-edge", "random"):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--mask {kind}:X needs a number, got {text!r} (e.g. {kind}:0.35)") from None
        if not math.isfinite(number) or number < 0 or (kind == "random" and number > 1):
            raise ValueError(f"--mask {text!r}: the value must be >= 0"
                             + (" and <= 1" if kind == "random" else ""))
        return MaskSpec(kind, fraction=number) if kind == "random" else MaskSpec(kind, threshold=number)
    if kind == "learned":
        if not value:
            raise ValueError("--mask learned:PATH needs the mask estimator's checkpoint path")
        return MaskSpec(kind, path=value)
    raise ValueError(f"unknown --mask {text!r}; expected {MASK_HELP}")


# --------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    data_root: str
    out: str
    model: str = "deeplabv3_resnet101"
    checkpoint: Optional[str] = None
    split: str = "val"
    finest_stride: int = 8
    coarsest_stride: int = 16
    mask: str = "edge:0.35"
    dilation: int = 11
    sparse_head: bool = False
    device: Optional[str] = None
    dtype: str = "float32"
    batch_size: int = 1
    num_workers: int = 2
    limit: Optional[int] = None
    seed: int = 0
    warmup: int = 1
    timing: bool = True
    save_predictions: Optional[str] = None
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["mask"] = str(parse_mask(self.mask))
        d["checkpoint"] = os.path.abspath(self.checkpoint) if self.checkpoint and os.path.isfile(
            self.checkpoint) else self.checkpoint
        return {k: d[k] for k in _FINGERPRINT}


def configure(parser: argparse.ArgumentParser):
    p = parser
    p.add_argument("--data-root", required=True, help="Cityscapes folder holding leftImg8bit/ and gtFine/")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    from adapters.builders import SEGMENTATION_MODELS

    p.add_argument("--model", default="deeplabv3_resnet101", choices=SEGMENTATION_MODELS)
    p.add_argument("--checkpoint", help="weights: a file (torchvision or the paper's "
                   "DeepLabV3Plus-Pytorch checkpoints) or a torchvision weights name in the torch "
                   "cache; without it the weights are random")
    p.add_argument("--finest-stride", type=int, default=8)
    p.add_argument("--coarsest-stride", type=int, default=16)
    p.add_argument("--mask", default="edge:0.35", help=MASK_HELP)
    p.add_argument("--dilation", type=int, default=11,
                   help="square dilation of edge / oracle masks in pixels (paper: 11)")
    p.add_argument("--sparse-head", action="store_true",
                   help="convert the head too (default: the head runs densified at the finest "
                        "stride, as in the paper)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random weights (without --checkpoint) and random masks")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes before timing")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the separate timed forward pass (halves the cost; time_s is null)")
    p.add_argument("--out", default="results.json", help="JSON results (resumed if it exists)")
    p.add_argument("--save-predictions", metavar="DIR",
                   help="write <DIR>/<city>/<frame>_pred_trainIds.png per image")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args) -> EvalConfig:
    names = EvalConfig.__dataclass_fields__
    return EvalConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})


def main(args) -> int:
    try:
        cfg = config_from_args(args)
        result = evaluate(cfg)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"cad-spconv eval: error: {e}", file=sys.stderr)
        return 2
    if result is not None:  # rank 0
        print(format_summary(result))
    return 0


# --------------------------------------------------------------------------- results file
def load_results(path: str, cfg: EvalConfig) -> dict:
    """Existing results to resume from, or a fresh skeleton."""
    if os.path.isfile(path) and not cfg.overwrite:
        with open(path) as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); remove it or pass --overwrite") from None
        if old.get("format") != FORMAT:
            raise ValueError(f"{path} is not a cad-spconv eval file; choose another --out")
        mine = cfg.fingerprint()
        diff = {k: (old["config"].get(k), mine[k]) for k in mine if old["config"].get(k) != mine[k]}
        if diff:
            shown = ", ".join(f"{k}: {a!r} in the file vs {b!r} now" for k, (a, b) in diff.items())
            raise ValueError(f"{path} was written with other settings ({shown}); pass another "
                             "--out, or --overwrite to start over")
        return old
    return {"format": FORMAT, "config": cfg.fingerprint(), "environment": {}, "summary": {},
            "images": {}}


def summarize(images: dict, num_classes: int = 19) -> dict:
    """Dataset-level numbers from the per-image records."""
    import numpy as np

    from .data import CLASS_NAMES, ConfusionMatrix, triples_to_counts
    cm = ConfusionMatrix(num_classes)
    for rec in images.values():
        cm.add(triples_to_counts(rec["confusion"], num_classes))
    recs = list(images.values())
    if not recs:
        return {"num_images": 0}
    macs = np.array([r["macs"]["total"] for r in recs], dtype=np.float64)
    fine = np.array([r["macs_dense_finest"] for r in recs], dtype=np.float64)
    coarse = np.array([r["macs_dense_coarsest"] for r in recs], dtype=np.float64)
    times = np.array([r["time_s"] for r in recs if r["time_s"] is not None], dtype=np.float64)
    kept = np.array([r["kept_fraction"] for r in recs], dtype=np.float64)
    iou = cm.iou()
    names = CLASS_NAMES if num_classes == len(CLASS_NAMES) else [str(i) for i in range(num_classes)]
    parts = sorted({k for r in recs for k in r["macs"]})
    return {
        "num_images": len(recs),
        "miou": _finite(cm.miou()),
        "pixel_accuracy": _finite(cm.pixel_accuracy()),
        "iou_per_class": {n: _finite(v) for n, v in zip(names, iou)},
        "macs_mean": {p: float(np.mean([r["macs"].get(p, 0) for r in recs])) for p in parts},
        "macs_dense_finest_mean": float(fine.mean()),
        "macs_dense_coarsest_mean": float(coarse.mean()),
        "macs_fraction_of_finest": float(macs.sum() / fine.sum()),
        "macs_fraction_of_coarsest": float(macs.sum() / coarse.sum()),
        "kept_fraction_mean": float(kept.mean()),
        "time_per_image_s_mean": float(times.mean()) if times.size else None,
        "time_per_image_s_median": float(np.median(times)) if times.size else None,
        "confusion": cm.to_triples(),
    }


def _finite(x: float):
    return None if x != x else float(x)  # NaN (class absent) -> null in JSON


def format_summary(result: dict) -> str:
    s, c = result["summary"], result["config"]
    if not s.get("num_images"):
        return "no images evaluated"
    miou = "n/a" if s["miou"] is None else f"{s['miou']:.4f}"
    return "\n".join([
        f"{c['model']} mask {c['mask']} strides {c['finest_stride']}->{c['coarsest_stride']}: "
        f"{s['num_images']} images",
        f"  mIoU {miou}   pixel accuracy {s['pixel_accuracy']:.4f}",
        f"  multiply-adds per image {s['macs_mean']['total'] / 1e9:.2f} G = "
        f"{s['macs_fraction_of_finest']:.1%} of dense stride {c['finest_stride']}, "
        f"{s['macs_fraction_of_coarsest']:.1%} of dense stride {c['coarsest_stride']}",
        f"  cells kept at stride {c['finest_stride']}: {s['kept_fraction_mean']:.1%}   " + (
            "not timed" if s["time_per_image_s_mean"] is None else
            f"time per image {s['time_per_image_s_mean'] * 1e3:.1f} ms (median "
            f"{s['time_per_image_s_median'] * 1e3:.1f} ms)")])


# --------------------------------------------------------------------------- the model
def dense_macs(model_name: str, output_stride: int, size, num_classes: int = 19) -> dict:
    """``count_macs`` of the plain torchvision model at ``output_stride`` (8: layer3/4 dilated,
    16: layer4 dilated, 32: none) on one ``size`` image: the dense baselines the paper compares
    against (its stride-16 network runs the head at stride 16 too). Built and run on the meta
    device: only shapes matter, so it is instant and allocates nothing."""
    import torch

    from adapters.builders import segmentation_model
    from cad_spconv.macs import count_macs
    with torch.device("meta"):
        seg = segmentation_model(model_name, num_classes, output_stride=output_stride)
    return count_macs(seg.eval(), torch.empty(1, 3, int(size[0]), int(size[1]), device="meta"))


def load_mask_estimator(spec: str, downsample: int):
    """The learned mask estimator (:class:`~cad_spconv.learned_mask.MaskEstimator`) from a
    checkpoint, its input channels read from the weights."""
    from .checkpoints import load_into, read_mask_estimator
    from cad_spconv.learned_mask import MaskEstimator
    state, path = read_mask_estimator(spec)
    estimator = MaskEstimator(in_channels=int(state["0.weight"].shape[1]), downsample=downsample)
    load_into(estimator, state, source=path)
    return estimator.eval()


class Segmenter:
    """A converted segmentation model and one mask setting: :meth:`predict` runs a batch,
    :meth:`dense_macs` gives the dense baselines (counted once per image size)."""

    def __init__(self, cfg: EvalConfig, device, model=None):
        import torch

        from .checkpoints import build_segmentation_model
        self.cfg = cfg
        self.mask = parse_mask(cfg.mask)
        self.device = torch.device(device)
        self.dtype = getattr(torch, cfg.dtype)
        info = None
        if model is None:
            # seeded, so random weights (no --checkpoint) agree across resumed runs and ranks
            torch.manual_seed(cfg.seed)
            model, info = build_segmentation_model(cfg.model, cfg.checkpoint)
        self.checkpoint_info = info
        self.num_classes = _num_classes(model)
        if self.num_classes != 19:
            raise ValueError(f"the model predicts {self.num_classes} classes; Cityscapes "
                             "evaluation needs the 19 trainId classes (a Cityscapes-trained checkpoint)")
        from adapters import convert
        model = model.to(self.device, self.dtype).eval()
        self.cad = convert(model, finest_stride=cfg.finest_stride,
                           coarsest_stride=cfg.coarsest_stride, sparse_head=cfg.sparse_head).eval()
        self.estimator = None
        if self.mask.kind == "learned":
            self.estimator = load_mask_estimator(
                self.mask.path, cfg.coarsest_stride // cfg.finest_stride).to(self.device, self.dtype)
        self._dense: dict = {}
        self._generator = torch.Generator(device="cpu").manual_seed(cfg.seed)

    # masks --------------------------------------------------------------------------------
    def keep_for(self, images, targets):
        """The ``keep`` argument for this batch (a bool mask, or the learned estimator)."""
        import torch

        from cad_spconv import masks
        B, _, H, W = images.shape
        kind, cfg = self.mask.kind, self.cfg
        if kind == "none":
            return torch.zeros(B, 1, H, W, dtype=torch.bool, device=images.device)
        if kind == "all":
            return torch.ones(B, 1, H, W, dtype=torch.bool, device=images.device)
        if kind == "learned":
            return self.estimator
        if kind == "random":  # the fraction counts cells of the finest grid
            return masks.random(B, (H, W), self.mask.fraction, cell=cfg.finest_stride,
                                generator=self._generator, device=images.device)
        if kind == "oracle":
            none = torch.zeros(B, 1, H, W, dtype=torch.bool, device=images.device)
            coarse, fine = self._run(images, none), self._run(images, ~none)
            return masks.oracle(coarse, fine, targets, cfg.dilation)
        keep = masks.edge(images, self.mask.threshold, cfg.dilation)
        if kind == "edge":
            return keep
        if kind == "inverted-edge":
            return masks.invert(keep)
        if kind == "shuffled-edge":  # the edge mask's budget at random places
            return masks.random_like(keep, cell=cfg.finest_stride, generator=self._generator)
        raise AssertionError(kind)

    def _run(self, images, keep):
        import torch
        with torch.no_grad():
            out = self.cad(images, keep)
        return out["out"] if isinstance(out, dict) else out

    def predict(self, images, targets, timed: bool = True):
        """``(logits, keep, seconds, macs)`` for a batch.

        ``seconds``: the plain forward (mask computation included, except for the oracle, whose
        mask is given), ``None`` when not ``timed``. ``macs``: per image ``{"total": int,
        <part>: int}`` (parts: dense, sparse, head, mask) from a counted forward; hooks would
        distort the timing, so a timed run counts in a second forward, an untimed one takes
        the logits from the counted forward.
        """
        import time

        import torch

        from cad_spconv.macs import MacCounter
        images = images.to(self.device, self.dtype, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        given = self.keep_for(images, targets) if self.mask.kind == "oracle" else None
        seconds = logits = None
        if timed:
            cuda = self.device.type == "cuda"
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            keep = given if given is not None else self.keep_for(images, targets)
            logits = self._run(images, keep)
            if cuda:
                end.record()
                torch.cuda.synchronize(self.device)
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = time.perf_counter() - t0
        else:
            keep = given if given is not None else self.keep_for(images, targets)
        B = images.shape[0]
        extra = {"mask": keep} if isinstance(keep, torch.nn.Module) else None
        with MacCounter(self.cad, B, extra) as counter:
            counted = self._run(images, keep)
        logits = counted if logits is None else logits
        r = counter.result()
        macs = [{"total": int(r["per_image"][b]),
                 **{p: int(v[b]) for p, v in sorted(r["per_image_parts"].items())}}
                for b in range(B)]
        return logits, keep, seconds, macs

    def warm_up(self, images, targets):
        """One untimed, uncounted forward."""
        images = images.to(self.device, self.dtype)
        self._run(images, self.keep_for(images, targets.to(self.device)))

    def level_fractions(self):
        """``[B, L+1]`` fractions of finest cells per level, from the last forward."""
        return self.cad.last_plan.level_fractions()

    def dense_macs(self, size) -> tuple[int, int]:
        """(finest, coarsest) multiply-adds of the dense networks on one image of ``size``."""
        key = (int(size[0]), int(size[1]))
        if key not in self._dense:
            self._dense[key] = tuple(
                dense_macs(self.cfg.model, s, key, self.num_classes)["total"]
                for s in (self.cfg.finest_stride, self.cfg.coarsest_stride))
        return self._dense[key]


def _num_classes(model) -> int:
    head = getattr(model, "classifier", None)
    last = head[-1] if head is not None and len(head) else None
    return int(getattr(last, "out_channels", -1))


# --------------------------------------------------------------------------- the loop
def evaluate(cfg: EvalConfig, segmenter: Segmenter | None = None,
             model=None) -> dict | None:
    """Run (or resume) an evaluation; returns the results dict on rank 0, ``None`` elsewhere."""
    import torch

    from .data import CityscapesSegmentation, collate

    parse_mask(cfg.mask)
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.finest_stride >= cfg.coarsest_stride:
        raise ValueError(f"--finest-stride ({cfg.finest_stride}) must be smaller than "
                         f"--coarsest-stride ({cfg.coarsest_stride})")
    device_name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available; use --device cpu")
    dist = init_distributed(torch.device(device_name).type)
    if dist.active and torch.device(device_name).type == "cuda":
        device_name = f"cuda:{dist.local_rank}"

    dataset = CityscapesSegmentation(cfg.data_root, cfg.split, limit=cfg.limit)
    # rank 0 reads the file; everyone gets the same list of images still to do
    results, problem = None, None
    if dist.rank == 0:
        try:
            results = load_results(cfg.out, cfg)
        except ValueError as e:
            problem = str(e)
    done, problem = dist.broadcast((set(results["images"]) if results else set(), problem))
    if problem:  # every rank stops, none is left waiting
        if dist.active:
            import torch.distributed as tdist
            tdist.destroy_process_group()
        raise ValueError(problem)
    todo = [i for i, name in enumerate(dataset.ids) if name not in done]
    shard = todo[dist.rank::dist.world]
    steps = math.ceil(math.ceil(len(todo) / dist.world) / cfg.batch_size) if todo else 0

    seg = segmenter or Segmenter(cfg, device_name, model=model)
    if results is not None:
        results["environment"] = _environment(seg, dist, device_name, cfg)
        results["num_images_requested"] = len(dataset)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.num_workers if shard else 0, collate_fn=collate,
        pin_memory=seg.device.type == "cuda")
    batches = iter(loader)
    bar = None
    if cfg.progress and dist.rank == 0 and todo:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), desc=f"eval {seg.mask}", unit="img", dynamic_ncols=True)
    warm = cfg.warmup
    for _ in range(steps):
        batch = next(batches, None)
        records = []
        if batch is not None:
            if warm > 0:  # untimed passes: lazy init, allocator, cuDNN autotuning
                for _ in range(warm if cfg.timing else 0):
                    seg.warm_up(batch["image"], batch["target"])
                warm = 0
            records = _evaluate_batch(seg, batch, cfg)
        gathered = dist.gather(records)
        if dist.rank == 0:
            for part in gathered:
                for rec in part:
                    results["images"][rec["id"]] = rec
            results["summary"] = summarize(results["images"])
            results["complete"] = len(results["images"]) >= len(dataset)
            write_json_atomic(cfg.out, results)
            if bar is not None:
                bar.update(sum(len(p) for p in gathered))
                s = results["summary"]
                bar.set_postfix(mIoU=f"{s['miou'] or 0:.3f}", macs=f"{s['macs_fraction_of_finest']:.0%}")
    if bar is not None:
        bar.close()
    if dist.rank == 0:
        results["summary"] = summarize(results["images"])
        results["complete"] = len(results["images"]) >= len(dataset)
        write_json_atomic(cfg.out, results)
    if dist.active:
        import torch.distributed as tdist
        tdist.barrier()
        tdist.destroy_process_group()
    return results if dist.rank == 0 else None


def _evaluate_batch(seg: Segmenter, batch: dict, cfg: EvalConfig) -> list[dict]:
    from .data import ConfusionMatrix, counts_to_triples
    images, targets = batch["image"], batch["target"]
    logits, keep, seconds, macs = seg.predict(images, targets, timed=cfg.timing)
    if logits.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"the model returned logits of size {tuple(logits.shape[-2:])} for images "
                         f"of size {tuple(images.shape[-2:])}")
    pred = logits.argmax(1)
    fractions = seg.level_fractions().cpu()
    fine, coarse = seg.dense_macs(images.shape[-2:])
    targets = targets.to(pred.device)
    B = images.shape[0]
    out = []
    for b in range(B):  # per image bookkeeping (B is the batch size, not a pixel loop)
        counts = ConfusionMatrix.compute(pred[b], targets[b]).cpu().numpy()
        cm = ConfusionMatrix(counts=counts)
        out.append({
            "id": batch["id"][b], "index": int(batch["index"][b]),
            "size": [int(images.shape[-2]), int(images.shape[-1])],
            "macs": macs[b], "macs_dense_finest": fine, "macs_dense_coarsest": coarse,
            "macs_fraction_of_finest": macs[b]["total"] / fine,
            "macs_fraction_of_coarsest": macs[b]["total"] / coarse,
            "kept_fraction": float(fractions[b, 0]),
            "level_fractions": [float(v) for v in fractions[b]],
            "time_s": None if seconds is None else seconds / B, "miou": _finite(cm.miou()),
            "confusion": counts_to_triples(counts),
        })
        if cfg.save_predictions:
            _save_prediction(cfg.save_predictions, batch["id"][b], pred[b])
    return out


def _save_prediction(folder: str, frame_id: str, pred) -> None:
    import numpy as np
    from PIL import Image
    city, name = frame_id.split("/")
    path = os.path.join(folder, city, f"{name}_pred_trainIds.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.png"
    Image.fromarray(pred.to("cpu").numpy().astype(np.uint8)).save(tmp)
    os.replace(tmp, path)


def _environment(seg: Segmenter, dist: Dist, device_name: str, cfg: EvalConfig) -> dict:
    import platform

    import torch
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": device_name, "world_size": dist.world, "batch_size": cfg.batch_size,
           "timing": "cuda events" if seg.device.type == "cuda" else "perf_counter"}
    if seg.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(seg.device)
    try:
        import spconv
        env["spconv"] = getattr(spconv, "__version__", "unknown")
    except ImportError:
        env["spconv"] = None
    if seg.checkpoint_info is not None:
        info = seg.checkpoint_info
        env["checkpoint"] = {"format": info.format, "source": info.source,
                             "trained_output_stride": info.trained_output_stride}
    return env
