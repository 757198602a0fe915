"""The evaluation loop: shard, resume, run, record, write (atomically, after every batch)."""
from __future__ import annotations

import math
import os

from ..distributed import Dist, device_name, init_distributed, resolve_device
from ..io import OutputLock, check_output_path, write_atomic, write_json_atomic
from .config import EvalConfig
from .results import finite, load_results, summarize
from .segmenter import Segmenter

__all__ = ["evaluate", "LimitLoweredError", "check_images", "check_inputs"]


class LimitLoweredError(ValueError):
    """The results file holds images this run does not ask for (a lower ``--limit``): its
    summary would pool them."""


def check_images(out_path: str, done, ids, cfg: EvalConfig) -> None:
    """Refuse an ``--out`` file holding images (``done``) this run does not ask for (``ids``):
    its summary would pool them (:class:`LimitLoweredError`)."""
    extra = sorted(set(done) - set(ids))
    if extra:
        beyond = (f"beyond --limit {cfg.limit}" if cfg.limit is not None
                  else f"no longer in the {cfg.split} split of {cfg.data_root}")
        raise LimitLoweredError(
            f"{out_path} holds results of {len(extra)} images {beyond} (e.g. {extra[0]}); "
            "evaluate them too (a larger --limit), or pass --overwrite or another --out")


def check_inputs(out_path: str, results: dict, dataset) -> None:
    """Refuse an ``--out`` file whose images were computed from other files than ``dataset``
    holds under the same frame ids (another ``--data-root``): its summary would pool two
    datasets. Compared by the SHA-256 of each image and label file, so a moved copy of the same
    data resumes; records written before the hashes were (no ``input_sha256``) are not checked."""
    from concurrent.futures import ThreadPoolExecutor

    where = {name: i for i, name in enumerate(dataset.ids)}
    recorded = [(name, rec["input_sha256"]) for name, rec in results["images"].items()
                if rec.get("input_sha256") is not None and name in where]
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashing releases the GIL
        now = pool.map(lambda item: dataset.input_sha256(where[item[0]]), recorded)
        for (name, old), new in zip(recorded, now):
            for part, files in (("image", dataset.images), ("labels", dataset.targets)):
                if old.get(part) != new[part]:
                    root = results["config"].get("data_root")
                    raise ValueError(
                        f"{out_path} holds results of {name} computed from another {part} file "
                        f"than {files[where[name]]} (another --data-root"
                        + (f" than {root}" if root else "") + "?); pass the --data-root that "
                        "run read, or --overwrite or another --out")


def evaluate(cfg: EvalConfig, segmenter: Segmenter | None = None,
             model=None) -> dict | None:
    """Run (or resume) an evaluation; returns the results dict on rank 0, ``None`` elsewhere.

    Everything that can be checked is checked before any image is computed: the settings, the
    device, the output path (and a lock on it: a second run writing the same ``--out`` is
    refused while the first is alive)."""
    import torch

    from ..data import CityscapesSegmentation, collate

    cfg.check()
    run_device = resolve_device(cfg.device)
    out_path = check_output_path(cfg.out)
    if cfg.save_predictions:
        check_output_path(cfg.save_predictions, "--save-predictions", folder=True)
    dist = init_distributed(torch.device(run_device).type)
    if dist.active and torch.device(run_device).type == "cuda":
        run_device = f"cuda:{dist.local_rank}"
    lock = OutputLock(out_path)
    try:
        # rank 0 locks and reads the file; everyone gets the same list of images still to do
        results, error = None, None
        try:
            dataset = CityscapesSegmentation(cfg.data_root, cfg.split, limit=cfg.limit,
                                             sha256=True)
            if dist.main:
                lock.__enter__()
                results = load_results(out_path, cfg)
                check_images(out_path, results["images"], dataset.ids, cfg)
                check_inputs(out_path, results, dataset)
                # the data this run reads (a moved copy of the same files resumes)
                results["config"]["data_root"] = os.path.abspath(cfg.data_root)
                if cfg.save_predictions:  # images done earlier are skipped: their PNGs must exist
                    missing = [i for i in results["images"]
                               if not os.path.isfile(_prediction_path(cfg.save_predictions, i))]
                    if missing:
                        raise ValueError(
                            f"--save-predictions {cfg.save_predictions}: {len(missing)} images of "
                            f"{out_path} were evaluated without saving their predictions (e.g. "
                            f"{missing[0]}), and a resume skips them; pass --overwrite to "
                            "evaluate everything again, or another --out")
        except Exception as e:  # every rank stops, none is left waiting, each with this error
            error = e
        dist.raise_first(error)
        done = dist.broadcast(set(results["images"]) if dist.main else None)
        todo = [i for i, name in enumerate(dataset.ids) if name not in done]
        shard = dist.shard(todo)
        steps = math.ceil(math.ceil(len(todo) / dist.world) / cfg.batch_size) if todo else 0
        seg = segmenter or Segmenter(cfg, run_device, model=model)
        if results is not None:
            results["environment"] = _environment(seg, dist, run_device, cfg)
            results["macs_parts"] = seg.macs_parts()
            results["num_images_requested"] = len(dataset)
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, shard), batch_size=cfg.batch_size, shuffle=False,
            num_workers=cfg.num_workers if shard else 0, collate_fn=collate,
            pin_memory=seg.device.type == "cuda")
        batches = iter(loader)
        bar = None
        if cfg.progress and dist.main and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc=f"eval {seg.label}", unit="img", dynamic_ncols=True)
        warm = cfg.warmup
        for _ in range(steps):
            batch = next(batches, None)
            records = []
            if batch is not None:
                if warm > 0:  # untimed passes: lazy init, allocator, cuDNN autotuning
                    for _ in range(warm if cfg.timing else 0):
                        seg.warm_up(batch["image"], batch["target"], batch["id"])
                    warm = 0
                records = _evaluate_batch(seg, batch, cfg)
            gathered = dist.gather(records)
            if dist.main:
                for part in gathered:
                    for rec in part:
                        results["images"][rec["id"]] = rec
                results["summary"] = summarize(results["images"])
                results["complete"] = len(results["images"]) >= len(dataset)
                write_json_atomic(out_path, results)
                if bar is not None:
                    bar.update(sum(len(p) for p in gathered))
                    s = results["summary"]
                    bar.set_postfix(mIoU=f"{s['miou'] or 0:.3f}",
                                    macs=f"{s['macs_fraction_of_finest']:.0%}")
        if bar is not None:
            bar.close()
        if dist.main:
            results["summary"] = summarize(results["images"])
            results["complete"] = len(results["images"]) >= len(dataset)
            write_json_atomic(out_path, results)
        dist.barrier()
    finally:
        lock.__exit__(None, None, None)
        dist.close()
    return results if dist.main else None


def _evaluate_batch(seg: Segmenter, batch: dict, cfg: EvalConfig) -> list[dict]:
    from ..data import ConfusionMatrix, counts_to_triples
    images, targets = batch["image"], batch["target"]
    logits, keep, seconds, macs = seg.predict(images, targets, batch["id"], timed=cfg.timing)
    if logits.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"the model returned logits of size {tuple(logits.shape[-2:])} for images "
                         f"of size {tuple(images.shape[-2:])}")
    pred = logits.argmax(1)
    fractions = seg.level_fractions()
    fractions = None if fractions is None else fractions.cpu()
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
            "macs_paper_ptflops": macs[b].pop("paper_backbone_ptflops"),
            "macs": macs[b], "macs_dense_finest": fine, "macs_dense_coarsest": coarse,
            "macs_fraction_of_finest": macs[b]["total"] / fine,
            "macs_fraction_of_coarsest": macs[b]["total"] / coarse,
            # share of finest-grid cells owned by level-0 sites (computed at the finest
            # resolution), and per level; None for the plain network
            "level0_share": None if fractions is None else float(fractions[b, 0]),
            "level_fractions": None if fractions is None else [float(v) for v in fractions[b]],
            "time_s": None if seconds is None else seconds / B,
            "time_device": None if seconds is None else device_name(seg.device),
            "miou": finite(cm.miou()),
            "confusion": counts_to_triples(counts),
            "input_sha256": batch["input_sha256"][b],  # which files (a resume compares them)
        })
        if cfg.save_predictions:
            _save_prediction(cfg.save_predictions, batch["id"][b], pred[b])
    return out


def _prediction_path(folder: str, frame_id: str) -> str:
    city, name = frame_id.split("/")
    return os.path.join(folder, city, f"{name}_pred_trainIds.png")


def _save_prediction(folder: str, frame_id: str, pred) -> None:
    import numpy as np
    from PIL import Image
    path = _prediction_path(folder, frame_id)
    image = Image.fromarray(pred.to("cpu").numpy().astype(np.uint8))
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _environment(seg: Segmenter, dist: Dist, run_device: str, cfg: EvalConfig) -> dict:
    import platform

    import torch
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": run_device, "world_size": dist.world, "batch_size": cfg.batch_size,
           "timing": "cuda events" if seg.device.type == "cuda" else "perf_counter"}
    if seg.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(seg.device)
    try:
        import spconv
        env["spconv"] = getattr(spconv, "__version__", "unknown")
    except ImportError:
        env["spconv"] = None
    env["model"] = seg.model_name
    if seg.checkpoint_info is not None:
        info = seg.checkpoint_info
        env["checkpoint"] = {"format": info.format, "source": info.source, "model": info.model,
                             "trained_output_stride": info.trained_output_stride,
                             **info.metadata}
    return env
