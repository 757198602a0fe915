"""``cad-spconv keypoints evaluate``: mean matching accuracy on HPatches (D2-Net's benchmark, as
the paper's Fig. 6 uses it).

Per sequence and pair ``(1, k)``, ``k = 2..6``: descriptors are matched by mutual nearest
neighbours of their dot products (a keypoint of image 1 and one of image ``k`` that are each
other's best match; the first index wins a tie); a match is correct at threshold ``t`` if
image 1's keypoint, mapped through ``H_1_k``, lands within ``t`` pixels (Euclidean) of image
``k``'s. The pair's accuracy at ``t`` is correct / all matches (0 for a pair without matches).
MMA@t is the mean over the pairs of the illumination (``i_*``), viewpoint (``v_*``) or all
sequences, for ``t = 1 .. 15``; the headline is MMA@3. Dot products are taken in float64.

Descriptors are matched as stored (the paper's code: raw, unnormalised features). ``normalize``
(``--normalize``) L2-normalises them first, i.e. matches by cosine similarity: not the paper's
protocol, but useful for random weights, whose raw dot products are dominated by a few
large-norm descriptors (on the synthetic set: 1-3 mutual matches per pair instead of ~20).

With several feature folders, :func:`plot_mma` draws MMA@3 over the mean multiply-adds per
image (the paper's Fig. 6).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..io import check_output_path, read_json, write_atomic, write_json_atomic
from . import hpatches
from .extract import DAMAGED, summarize

__all__ = ["FORMAT", "THRESHOLDS", "mutual_nearest_neighbours", "reprojection_errors", "l2_normalize",
           "pair_accuracy", "load_features", "read_extract_summary", "evaluate_folder",
           "unique_labels", "run_evaluate", "report_notes", "plot_mma", "setting_group", "setting_label"]

FORMAT = "cad-spconv-keypoints-eval/1"
THRESHOLDS = tuple(range(1, 16))


def mutual_nearest_neighbours(desc_a: np.ndarray, desc_b: np.ndarray) -> np.ndarray:
    """``[M, 2]`` index pairs ``(i, j)`` with ``j`` the best match of ``i`` and ``i`` the best
    match of ``j`` under the dot product (float64; ties: the first index)."""
    a = np.asarray(desc_a, dtype=np.float64)
    b = np.asarray(desc_b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    sim = a @ b.T
    nn_ab = sim.argmax(axis=1)
    nn_ba = sim.argmax(axis=0)
    ids = np.arange(len(a))
    mutual = nn_ba[nn_ab] == ids
    return np.stack([ids[mutual], nn_ab[mutual]], axis=1).astype(np.int64)


def reprojection_errors(kp_a: np.ndarray, kp_b: np.ndarray, matches: np.ndarray,
                        homography: np.ndarray) -> np.ndarray:
    """Pixel distance between ``H @ kp_a[i]`` and ``kp_b[j]`` for every match ``(i, j)``."""
    pa = np.asarray(kp_a, dtype=np.float64)[matches[:, 0], :2]
    pb = np.asarray(kp_b, dtype=np.float64)[matches[:, 1], :2]
    proj = np.concatenate([pa, np.ones((len(pa), 1))], 1) @ np.asarray(homography).T
    proj = proj[:, :2] / proj[:, 2:]
    return np.sqrt(((pb - proj) ** 2).sum(1))


def pair_accuracy(errors: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> list[float]:
    """Fraction of matches within each threshold (0 for no matches, as the benchmark)."""
    if len(errors) == 0:
        return [0.0 for _ in thresholds]
    return [float(np.mean(errors <= t)) for t in thresholds]


def load_features(folder: str, sequence: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keypoints [N, >=2], descriptors [N, C])`` of one image, checked."""
    path = os.path.join(folder, sequence, f"{k}.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"features {path} are missing: the folder does not cover sequence {sequence} of "
            "--data-root; run (or resume) `cad-spconv keypoints extract` into it")
    fix = (f"re-extract it: rerun the `cad-spconv keypoints extract` command that wrote {folder} "
           "(same --out and settings), which extracts damaged or missing files again")
    try:
        z = np.load(path)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError("an .npy array, not an .npz archive")
        with z:
            kp, desc = z["keypoints"], z["descriptors"]
    except DAMAGED as e:
        raise ValueError(f"features {path} are damaged, truncated or lack 'keypoints' / "
                         f"'descriptors' ({type(e).__name__}: {e}); {fix}") from None
    if kp.ndim != 2 or kp.shape[1] < 2 or desc.ndim != 2 or len(desc) != len(kp):
        raise ValueError(f"features {path}: keypoints {kp.shape} and descriptors {desc.shape} do "
                         f"not form [N, 3] / [N, C]; {fix}")
    return kp, desc


def read_extract_summary(folder: str) -> dict:
    """The ``summary.json`` of an extraction folder."""
    from .extract import FORMAT as EXTRACT_FORMAT

    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features {folder} has no summary.json: it is not the --out of "
                                "`cad-spconv keypoints extract`")
    summary = read_json(path, EXTRACT_FORMAT, "a cad-spconv keypoints summary",
                        "give the --out folder of `cad-spconv keypoints extract`")
    return summary


def l2_normalize(desc: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero), in float64."""
    d = np.asarray(desc, dtype=np.float64)
    norm = np.linalg.norm(d, axis=1, keepdims=True)
    return d / np.where(norm > 0, norm, 1.0)


def evaluate_folder(sequences: Sequence[hpatches.HPatchesSequence], folder: str,
                    thresholds: Sequence[float] = THRESHOLDS, normalize: bool = False) -> dict:
    """MMA of one features folder over ``sequences`` (whose homographies are read here)."""
    pairs = []
    num_features = []
    for seq in sequences:
        kp1, d1 = load_features(folder, seq.name, 1)
        d1 = l2_normalize(d1) if normalize else d1
        num_features.append(len(kp1))
        for _, k in hpatches.PAIRS:
            kpk, dk = load_features(folder, seq.name, k)
            dk = l2_normalize(dk) if normalize else dk
            num_features.append(len(kpk))
            if d1.shape[1] != dk.shape[1]:
                raise ValueError(f"{folder}/{seq.name}: descriptors of image 1 have "
                                 f"{d1.shape[1]} channels, of image {k} {dk.shape[1]}")
            hom = hpatches.read_homography(seq.homography(k))
            matches = mutual_nearest_neighbours(d1, dk)
            err = reprojection_errors(kp1, kpk, matches, hom)
            pairs.append({"sequence": seq.name, "k": k, "num_matches": int(len(matches)),
                          "accuracy": pair_accuracy(err, thresholds)})
    mma, matches_mean = {}, {}
    for group, kinds in (("i", "i"), ("v", "v"), ("all", "iv")):
        sel = [p for p in pairs if p["sequence"][0] in kinds]
        mma[group] = ([float(v) for v in np.mean([p["accuracy"] for p in sel], axis=0)]
                      if sel else None)
        matches_mean[group] = float(np.mean([p["num_matches"] for p in sel])) if sel else None
    at3 = list(thresholds).index(3) if 3 in thresholds else None
    return {"mma": mma,
            "mma@3": {g: (v[at3] if v is not None and at3 is not None else None)
                      for g, v in mma.items()},
            "num_pairs": {g: sum(p["sequence"][0] in kinds for p in pairs)
                          for g, kinds in (("i", "i"), ("v", "v"), ("all", "iv"))},
            "num_matches_mean": matches_mean,
            "num_features_mean": float(np.mean(num_features)), "pairs": pairs}


def setting_group(settings: dict) -> str:
    """Plot group of an extraction: ``dense``, ``adaptive F->8``, ``random F->8`` or
    ``inverted F->8``."""
    if not settings.get("dilations"):
        return "dense"
    name = {"keypoints": "adaptive"}.get(settings["mask"], settings["mask"])
    return f"{name} {settings['finest_stride']}->8"


def setting_label(settings: dict) -> str:
    if not settings.get("dilations"):
        return f"OS {settings['finest_stride']}"
    return "/".join(str(d) for d in settings["dilations"])


# --plot formats (matplotlib writes each from the extension) and how their files begin
PLOT_FORMATS = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-", ".svg": b"<svg"}


def _plot_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in PLOT_FORMATS:
        raise ValueError(f"--plot {path}: the figure's format is taken from the extension; give "
                         f"a path ending in {', '.join(PLOT_FORMATS)}")
    return ext


def _is_figure(path: str, ext: str) -> bool:
    """Whether ``path`` is a ``ext`` figure (a file this command may replace), or a PNG, which
    earlier versions of this command wrote under any ``--plot`` name."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head.startswith(PLOT_FORMATS[".png"]):
        return True
    if ext == ".svg":  # after an XML declaration and doctype
        return PLOT_FORMATS[ext] in head
    return head.startswith(PLOT_FORMATS[ext])


def _check_outputs(out: str, plot: Optional[str], folders: Sequence[str]):
    """The report and plot paths, checked before any work: two different files, a figure format
    known by its extension, and an existing file only replaced if it is this command's own
    report / a figure of that format (any other file, such as a features folder's
    ``summary.json``, is someone's input or result)."""
    out = check_output_path(out, "--out")
    if os.path.splitext(out)[1].lower() in PLOT_FORMATS:
        raise ValueError(f"--out {out} is the JSON report; give a .json path (the figure goes to "
                         "--plot, by default next to --out)")
    if plot is None and len(folders) > 1:
        plot = os.path.splitext(out)[0] + ".png"
    if plot is not None:
        plot = check_output_path(plot, "--plot")
        if os.path.realpath(plot) == os.path.realpath(out):
            raise ValueError(f"--plot and --out name the same file {out}; give two paths")
        ext = _plot_format(plot)
    if os.path.exists(out):
        read_json(out, FORMAT, "a keypoints evaluate report",
                  "this command replaces only its own reports: choose another --out")
    if plot is not None and os.path.exists(plot) and not _is_figure(plot, ext):
        raise ValueError(f"--plot {plot} exists and is not a {ext[1:].upper()}; this command "
                         "replaces only its own figures: choose another --plot")
    return out, plot


def unique_labels(labels: Sequence[str]) -> list[str]:
    """One distinct name per folder: a label's repeats become ``"<label> (n)"`` with the first
    ``n >= 2`` that no other label is, given or made (folders with the same name, or ``a``,
    ``a (2)``, ``a``: the third is ``a (3)``), so no folder's results replace another's."""
    taken, out = set(labels), []
    for label in labels:
        if label in out:
            n = 2
            while f"{label} ({n})" in taken:
                n += 1
            label = f"{label} ({n})"
            taken.add(label)
        out.append(label)
    return out


def run_evaluate(data_root: str, folders: Sequence[str], out: str,
                 plot: Optional[str] = None, labels: Optional[Sequence[str]] = None,
                 title: Optional[str] = None, normalize: bool = False) -> dict:
    """Evaluate every features folder; write ``out`` (JSON) and, with several folders or
    ``plot``, the MMA@3-vs-multiply-adds figure (``plot``: PNG, PDF or SVG by its extension, or
    ``out`` with ``.png``)."""
    if not folders:
        raise ValueError("give at least one --features folder")
    out, plot = _check_outputs(out, plot, folders)
    sequences = hpatches.list_sequences(data_root)
    for seq in sequences:
        hpatches.load_sequence(seq, homographies=True)
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(f)) for f in folders]
    if len(labels) != len(folders):
        raise ValueError("give one label per --features folder")
    results = {}
    for folder, label in zip(folders, unique_labels(labels)):
        folder = os.path.abspath(folder)
        summary = read_extract_summary(folder)
        res = evaluate_folder(sequences, folder, normalize=normalize)
        # multiply-adds and times of the images evaluated: a folder may hold more sequences
        # than --data-root (a subset evaluated), and the MMA covers only these
        names = {seq.name for seq in sequences}
        records = {i: r for i, r in summary.get("images", {}).items()
                   if i.rpartition("/")[0] in names}
        # features written without their record (an extraction interrupted in between, or a
        # summary.json of an older version that claimed completeness regardless)
        unrecorded = len(names) * len(hpatches.IMAGES) - len(records)
        s = summarize(records) if records else {}
        # a copy of the set may live elsewhere, so another root is reported, not refused
        results[label] = {"folder": folder, "extracted_from": summary.get("data_root"),
                          "settings": summary["settings"],
                          "group": setting_group(summary["settings"]),
                          "macs_per_image": s.get("macs_mean"),
                          "level_fractions_mean": s.get("level_fractions_mean"),
                          "time_per_image_s_median": s.get("time_per_image_s_median"),
                          "timed_on": s.get("timed_on"),
                          "timings_by_setup": s.get("timings_by_setup"),
                          "extraction_complete": bool(summary.get("complete")) and not unrecorded,
                          "images_without_record": unrecorded, **res}
    report = {"format": FORMAT, "data_root": os.path.abspath(data_root),
              "thresholds": list(THRESHOLDS),
              "descriptors": "l2-normalised" if normalize else "as stored (raw dot products)",
              "num_sequences": {g: sum(s.kind == g for s in sequences) for g in ("i", "v")},
              "high_resolution_sequences": sorted(s.name for s in sequences
                                                  if s.name in hpatches.HIGH_RESOLUTION),
              "features": results}
    write_json_atomic(out, report, compact_depth=3)
    if plot is not None:
        plot_mma(plot, results, title or "MMA@3 vs multiply-adds (HPatches)")
        report["plot"] = plot
    return report


GROUP_STYLE = {"dense": ("s", "black"), "adaptive 4->8": ("o", "tab:blue"),
               "adaptive 2->8": ("o", "tab:orange"), "adaptive 1->8": ("o", "tab:green"),
               "random": ("D", "tab:gray"), "inverted": ("v", "tab:purple")}


def report_notes(report: dict) -> list[str]:
    """The notes a report of :func:`run_evaluate` needs printed under its table (``note: ...``
    lines, for ``cad-spconv keypoints evaluate`` and ``experiments.keypoints`` alike): times of
    several setups, images without a record, features extracted from another data root and
    high-resolution sequences."""
    notes = []
    for label, r in report["features"].items():
        if r["timings_by_setup"]:
            notes.append(f"note: {label}: its images were timed on {len(r['timings_by_setup'])} "
                         f"setups ({'; '.join(r['timings_by_setup'])}): no pooled time is "
                         "reported, see timings_by_setup")
        if r["images_without_record"]:
            summary = os.path.join(r["folder"], "summary.json")
            notes.append(f"note: {label}: {r['images_without_record']} of the images evaluated "
                         f"have no record in {summary} (an interrupted extraction), so its "
                         "multiply-adds and times are means over the others; rerun its "
                         "`cad-spconv keypoints extract` command to complete it")
    for label, r in report["features"].items():
        if r["extracted_from"] not in (None, report["data_root"]):
            notes.append(f"note: {label} was extracted from {r['extracted_from']}, evaluated "
                         f"against {report['data_root']}: the homographies are the latter's "
                         "(fine for a copy of the same set)")
    if report["high_resolution_sequences"]:
        notes.append(f"note: {len(report['high_resolution_sequences'])} high-resolution "
                     "sequences are included; the paper's numbers (D2-Net's benchmark) leave "
                     "them out: " + " ".join(report["high_resolution_sequences"]))
    return notes


def plot_mma(path: str, results: dict, title: str, group: str = "all") -> None:
    """MMA@3 (over ``group``: ``i``, ``v`` or ``all``) vs multiply-adds per image (Fig. 6)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.6), dpi=120)
    groups: dict[str, list] = {}
    for label, r in results.items():
        if r["macs_per_image"] is not None and r["mma@3"][group] is not None:
            groups.setdefault(r["group"], []).append((r["macs_per_image"] / 1e9, r["mma@3"][group],
                                                      setting_label(r["settings"])))
    for g, pts in sorted(groups.items(), key=lambda kv: (kv[0] != "dense", kv[0])):
        marker, color = GROUP_STYLE.get(g, GROUP_STYLE.get(g.split()[0], ("o", None)))
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=g,
                linestyle="-" if g == "dense" or g.startswith("adaptive") else "", markersize=6)
        for x, y, text in pts:
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6,
                        color=color or "black")
    ax.set_xscale("log")
    ax.set_xlabel("multiply-adds per image (G, log scale)")
    names = {"all": "all sequences", "i": "illumination", "v": "viewpoint"}
    ax.set_ylabel(f"MMA@3 ({names[group]})")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fmt = _plot_format(path)[1:]  # the temporary file's name has no usable extension
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt))
    plt.close(fig)
