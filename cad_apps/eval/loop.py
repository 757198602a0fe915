"""The evaluation loop: shard, resume, run, record, write (atomically, after every batch)."""
from __future__ import annotations

import json
import math
import os
import uuid

from ..distributed import Dist, device_name, init_distributed, resolve_device
from ..io import (OutputLock, check_output_path, read_json, settings_difference, write_atomic,
                  write_json_atomic)
from .config import EvalConfig
from .results import finite, load_results, summarize
from .segmenter import Segmenter, check_im2col_device

__all__ = ["evaluate", "LimitLoweredError", "check_images", "check_inputs",
           "claim_predictions", "MANIFEST"]

#: the file in a --save-predictions folder that names the run its PNGs belong to
MANIFEST = "cad-spconv-eval.json"
MANIFEST_FORMAT = "cad-spconv-eval-predictions/1"


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
    check_im2col_device(cfg, run_device)  # not after hashing the data
    out_path = check_output_path(cfg.out)
    if cfg.save_predictions:
        check_output_path(cfg.save_predictions, "--save-predictions", folder=True)
    dist = init_distributed(torch.device(run_device).type)
    if dist.active and torch.device(run_device).type == "cuda":
        run_device = f"cuda:{dist.local_rank}"
    lock = OutputLock(out_path)
    predictions_lock = (OutputLock(os.path.join(cfg.save_predictions, MANIFEST),
                                   "--save-predictions") if cfg.save_predictions else None)
    try:
        # rank 0 locks and reads the file; everyone gets the same list of images still to do
        results = None
        with dist.errors_shared():  # every rank stops, none is left waiting, each with the error
            dataset = CityscapesSegmentation(cfg.data_root, cfg.split, limit=cfg.limit,
                                             sha256=True)
            if dist.main:
                lock.__enter__()
                results = load_results(out_path, cfg)
                check_images(out_path, results["images"], dataset.ids, cfg)
                check_inputs(out_path, results, dataset)
                # the data this run reads (a moved copy of the same files resumes)
                results["config"]["data_root"] = os.path.abspath(cfg.data_root)
                # the id a --save-predictions folder names; a file that has done images but no
                # id is from before run ids
                legacy = bool(results["images"]) and "run" not in results
                results.setdefault("run", uuid.uuid4().hex)
                if cfg.save_predictions:
                    predictions_lock.__enter__()
                    claim_predictions(cfg.save_predictions, out_path, results, legacy,
                                      cfg.overwrite)
        done = dist.broadcast(set(results["images"]) if dist.main else None)
        todo = [i for i, name in enumerate(dataset.ids) if name not in done]
        shard = dist.shard(todo)
        steps = math.ceil(math.ceil(len(todo) / dist.world) / cfg.batch_size) if todo else 0
        with dist.errors_shared():
            seg = segmenter or Segmenter(cfg, run_device, model=model)
            if results is not None:
                results["environment"] = _environment(seg, dist, run_device, cfg)
                results["macs_parts"] = seg.macs_parts()
                results["num_images_requested"] = len(dataset)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(dataset, shard), batch_size=cfg.batch_size,
                shuffle=False, num_workers=cfg.num_workers if shard else 0, collate_fn=collate,
                pin_memory=seg.device.type == "cuda")
            batches = iter(loader)
        bar = None
        if cfg.progress and dist.main and todo:
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc=f"eval {seg.label}", unit="img", dynamic_ncols=True)

        def save():  # rank 0: the summary of the records so far, written atomically
            results["summary"] = summarize(results["images"])
            results["complete"] = len(results["images"]) >= len(dataset)
            write_json_atomic(out_path, results)

        def write(gathered):  # rank 0, after every step with new records
            for part in gathered:
                for rec in part:
                    results["images"][rec["id"]] = rec
            save()
            if bar is not None:
                bar.update(sum(len(p) for p in gathered))
                s = results["summary"]
                bar.set_postfix(mIoU=f"{s['miou'] or 0:.3f}",
                                macs=f"{s['macs_fraction_of_finest']:.0%}")

        warm = cfg.warmup
        for _ in range(steps):
            records, error = [], None
            try:
                batch = next(batches, None)
                if batch is not None:
                    if warm > 0:  # untimed passes: lazy init, allocator, cuDNN autotuning
                        for _ in range(warm if cfg.timing else 0):
                            seg.warm_up(batch["image"], batch["target"], batch["id"])
                        warm = 0
                    records = _evaluate_batch(seg, batch, cfg)
            except Exception as e:  # raised below, after the other ranks' records are written
                error = e
            dist.share_step(records, error, write)
        if bar is not None:
            bar.close()
        dist.on_main(save)  # also where nothing was left to do (the environment, the summary)
    finally:
        if predictions_lock is not None:
            predictions_lock.__exit__(None, None, None)
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


def claim_predictions(folder: str, out_path: str, results: dict, legacy: bool,
                      overwrite: bool) -> None:
    """Tie ``--save-predictions`` ``folder`` to the run of ``results`` (its ``"run"`` id, in
    ``folder``/:data:`MANIFEST`), before any PNG is written. Refused without ``overwrite``: a
    folder of another run whose results file still holds it (its PNGs would be overwritten, and
    a resume of either would take the other's as its own), and a folder of PNGs that names no
    run, unless ``results`` is a file from before run ids (``legacy``), resumed as then. Images
    done earlier are skipped, so their PNGs must be there, written by this run: a folder left
    by another run (no longer in its results file) is taken over only where none of its PNGs
    would count as one of this run's done images."""
    fix = ("pass another --save-predictions folder, or --overwrite to replace them (which "
           "starts --out over too)")
    path = os.path.join(folder, MANIFEST)
    owner = None
    if os.path.isfile(path):
        owner = read_json(path, MANIFEST_FORMAT, "a cad-spconv eval predictions manifest",
                          f"--save-predictions {folder}: {fix}")
    if not overwrite and owner is not None and owner.get("run") != results["run"] \
            and _run_of(owner.get("out")) == owner.get("run"):
        shown = settings_difference(owner.get("config", {}), results["config"], here="there")
        raise ValueError(f"--save-predictions {folder} holds the predictions of another run, "
                         f"{owner.get('out')} ({shown or 'the same settings'}); {fix}")
    if not overwrite and owner is None and not legacy:
        found = next((os.path.join(d, f) for d, _, files in os.walk(folder) for f in sorted(files)
                      if f.endswith(_SUFFIX)), None)
        if found:
            raise ValueError(f"--save-predictions {folder} holds predictions that name no run "
                             f"(no {MANIFEST}; e.g. {found}); {fix}")
    if not overwrite and owner is not None and owner.get("run") != results["run"]:
        # a folder another run left (its results file no longer holds it): its PNGs are of that
        # run's settings, so a resume must not take them for the images it did earlier
        taken = [i for i in results["images"] if os.path.isfile(_prediction_path(folder, i))]
        if taken:
            raise ValueError(
                f"--save-predictions {folder} holds the predictions of another run, "
                f"{owner.get('out')} (no longer in its results file), and {len(taken)} images "
                f"{out_path} did earlier have PNGs there that this run did not write (e.g. "
                f"{taken[0]}): a resume would take them as its own; pass --overwrite to "
                "evaluate everything again, or another --out")
    missing = [i for i in results["images"] if not os.path.isfile(_prediction_path(folder, i))]
    if missing:
        raise ValueError(
            f"--save-predictions {folder}: {len(missing)} images of {out_path} were evaluated "
            f"without saving their predictions (e.g. {missing[0]}), and a resume skips them; "
            "pass --overwrite to evaluate everything again, or another --out")
    write_json_atomic(path, {"format": MANIFEST_FORMAT, "run": results["run"], "out": out_path,
                             "config": results["config"]})


def _run_of(out_path) -> str | None:
    """The run id in a results file; ``None`` where there is none (no such file any more, or
    another tool's): the PNGs of a manifest naming it belong to no results file."""
    try:
        with open(out_path) as f:
            return json.load(f).get("run")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


_SUFFIX = "_pred_trainIds.png"


def _prediction_path(folder: str, frame_id: str) -> str:
    city, name = frame_id.split("/")
    return os.path.join(folder, city, name + _SUFFIX)


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
