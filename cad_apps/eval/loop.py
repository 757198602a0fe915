"""The evaluation loop: shard, resume, run, record, write (atomically, after every batch)."""
from __future__ import annotations

import math
import os

from ..distributed import Dist, init_distributed
from ..io import write_json_atomic
from .config import EvalConfig, parse_mask
from .results import finite, load_results, summarize
from .segmenter import Segmenter

__all__ = ["evaluate"]


def evaluate(cfg: EvalConfig, segmenter: Segmenter | None = None,
             model=None) -> dict | None:
    """Run (or resume) an evaluation; returns the results dict on rank 0, ``None`` elsewhere."""
    import torch

    from ..data import CityscapesSegmentation, collate

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
    from ..data import ConfusionMatrix, counts_to_triples
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
            "time_s": None if seconds is None else seconds / B, "miou": finite(cm.miou()),
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
