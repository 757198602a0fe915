"""The results file: resuming it, and the dataset-level summary of its per-image records."""
from __future__ import annotations

import os

from ..io import read_json, settings_difference
from .config import DEFAULT_MODEL, FORMAT, EvalConfig, comparable_mask

__all__ = ["load_results", "summarize", "format_summary"]


def load_results(path: str, cfg: EvalConfig) -> dict:
    """Existing results to resume from, or a fresh skeleton."""
    if os.path.isfile(path) and not cfg.overwrite:
        old = read_json(path, FORMAT, "a cad-spconv eval file",
                        "choose another --out, or pass --overwrite to replace it")
        _check_records(path, old)
        mine = cfg.fingerprint()
        if "files_sha256" not in old["config"]:
            # written before the weights were hashed: checked by path as then; from now on by
            # the bytes too
            old["config"]["files_sha256"] = mine["files_sha256"]
        # written before the mask rules were recorded: the old rules (None), which differ from
        # the current ones only for the masks that have one (config.MASK_RULES)
        old["config"].setdefault("mask_rule", None)
        old["config"].setdefault("im2col_dilated", False)  # written before the option
        theirs = {k: v for k, v in old["config"].items() if k not in RECORDED}
        # one setting, two spellings: a learned:PATH's path as typed (files written before it
        # was made absolute), the model named or read from the checkpoint (or the default)
        theirs["mask"] = comparable_mask(theirs.get("mask"))
        theirs["model"] = _model_run(theirs, old.get("environment", {}).get("model"))
        same_weights = all(theirs.get(k) == mine[k] for k in ("checkpoint", "files_sha256"))
        mine = dict(mine, model=_model_run(mine, theirs["model"] if same_weights else None))
        shown = settings_difference(theirs, mine)
        if shown:
            raise ValueError(f"{path} was written with other settings ({shown}); pass another "
                             "--out, or --overwrite to start over")
        return old
    return {"format": FORMAT, "config": cfg.fingerprint(), "environment": {}, "summary": {},
            "images": {}}


def _model_run(config: dict, inferred):
    """The model a setting runs: ``--model``, else the one ``inferred`` from ``--checkpoint``
    (``None``: unknown), else the default."""
    if config.get("model"):
        return config["model"]
    return DEFAULT_MODEL if config.get("checkpoint") is None else inferred


# recorded in the file's config (eval.loop), not compared on resume: the data is compared file
# by file (eval.loop.check_inputs), so a moved copy of the same data resumes
RECORDED = ("data_root",)


_RECORD_KEYS = ("confusion", "macs", "macs_dense_finest", "macs_dense_coarsest", "time_s",
                "level0_share")


def _check_records(path: str, old: dict) -> None:
    """A file with the right format but a broken body (edited, or another tool's) is refused
    when read, before any image is computed, not when the summary meets it."""
    images = old.get("images")
    bad = ("no 'config'" if not isinstance(old.get("config"), dict) else
           "'images' is not an object" if not isinstance(images, dict) else None)
    if bad is None:
        for name, rec in images.items():
            missing = [k for k in _RECORD_KEYS if not isinstance(rec, dict) or k not in rec]
            if missing:
                bad = f"the record of {name} lacks {', '.join(missing)}"
                break
            hashes = rec.get("input_sha256")
            if hashes is not None and not (isinstance(hashes, dict) and all(
                    isinstance(hashes.get(k), str) for k in ("image", "labels"))):
                bad = f"the record of {name} has a broken input_sha256"
                break
    if bad:
        raise ValueError(f"{path} is damaged ({bad}); pass --overwrite to evaluate again, or "
                         "another --out")


def summarize(images: dict, num_classes: int = 19) -> dict:
    """Dataset-level numbers from the per-image records."""
    import numpy as np

    from ..data import CLASS_NAMES, ConfusionMatrix, triples_to_counts
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
    # a resumed run may have timed its images on other machines: say so, do not hide it
    time_devices = sorted({r["time_device"] for r in recs
                           if r["time_s"] is not None and r.get("time_device")})
    level0 = np.array([r["level0_share"] for r in recs if r["level0_share"] is not None],
                      dtype=np.float64)
    iou = cm.iou()
    names = CLASS_NAMES if num_classes == len(CLASS_NAMES) else [str(i) for i in range(num_classes)]
    parts = sorted({k for r in recs for k in r["macs"]})
    return {
        "num_images": len(recs),
        "miou": finite(cm.miou()),
        "pixel_accuracy": finite(cm.pixel_accuracy()),
        "iou_per_class": {n: finite(v) for n, v in zip(names, iou)},
        "macs_mean": {p: float(np.mean([r["macs"].get(p, 0) for r in recs])) for p in parts},
        "macs_paper_ptflops_mean": float(np.mean([r.get("macs_paper_ptflops", 0) for r in recs])),
        "macs_dense_finest_mean": float(fine.mean()),
        "macs_dense_coarsest_mean": float(coarse.mean()),
        "macs_fraction_of_finest": float(macs.sum() / fine.sum()),
        "macs_fraction_of_coarsest": float(macs.sum() / coarse.sum()),
        "level0_share_mean": float(level0.mean()) if level0.size else None,
        "time_per_image_s_mean": float(times.mean()) if times.size else None,
        "time_per_image_s_median": float(np.median(times)) if times.size else None,
        # a resume may mix timed and --no-timing sessions: the times cover these images only
        "num_timed": int(times.size),
        "time_devices": time_devices,
        "confusion": cm.to_triples(),
    }


def finite(x: float):
    return None if x != x else float(x)  # NaN (class absent) -> null in JSON


def format_summary(result: dict) -> str:
    s, c = result["summary"], result["config"]
    if not s.get("num_images"):
        return "no images evaluated"
    model = result.get("environment", {}).get("model") or c["model"]
    setting = (f"dense output stride {c['dense']}" if c.get("dense") else
               f"mask {c['mask']} strides {c['finest_stride']}->{c['coarsest_stride']}"
               + (f" ({c['semantics']} semantics)" if c.get("semantics", "paper") != "paper" else ""))

    def share(v):
        return "n/a (no labelled pixels)" if v is None else f"{v:.4f}"
    lines = [f"{model} {setting}: {s['num_images']} images",
             f"  mIoU {share(s['miou'])}   pixel accuracy {share(s['pixel_accuracy'])}",
             f"  multiply-adds per image {s['macs_mean']['total'] / 1e9:.2f} G = "
             f"{s['macs_fraction_of_finest']:.1%} of dense stride {c['finest_stride']}, "
             f"{s['macs_fraction_of_coarsest']:.1%} of dense stride {c['coarsest_stride']}"]
    timing = ("not timed" if s["time_per_image_s_mean"] is None else
              f"time per image {s['time_per_image_s_mean'] * 1e3:.1f} ms (median "
              f"{s['time_per_image_s_median'] * 1e3:.1f} ms)")
    if s["time_per_image_s_mean"] is not None and s.get("num_timed", s["num_images"]) \
            < s["num_images"]:
        timing += f" ({s['num_timed']} of {s['num_images']} images timed)"
    if len(s.get("time_devices") or []) > 1:
        timing += f" MIXED over {', '.join(s['time_devices'])} (a resumed run)"
    if s.get("level0_share_mean") is not None:
        lines.append(f"  cells at the finest resolution (level 0): "
                     f"{s['level0_share_mean']:.1%}   {timing}")
    else:
        lines.append(f"  {timing}")
    return "\n".join(lines)
