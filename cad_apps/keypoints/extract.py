"""``cad-spconv keypoints extract``: SIFT keypoints described by D2-Net, dense or content-adaptive
(Hesse et al., CVPRW 2023, Sec. 4.3; the protocol of D2-Net's HPatches evaluation).

Per image ``k`` of every sequence: read, prepare (:mod:`.preprocess`), detect 512 SIFT keypoints
(:mod:`.sift`), run the network (:mod:`.network`; the adaptive one with the keypoint plan of
:mod:`.levels`, or its random / inverted counterpart at the same budget), take each keypoint's
descriptor at the nearest feature cell, and write ``<out>/<sequence>/<k>.npz``:

- ``keypoints`` float32 ``[N, 3]``: ``(x, y, 1)`` in pixels of the image as read;
- ``scores`` float32 ``[N]``: the SIFT responses (the paper's code stored ones);
- ``descriptors`` float32 ``[N, C]`` (C = 512 for VGG16), not normalised.

``<out>/summary.json`` holds the settings, per-image records (multiply-adds of the network, its
time, SIFT time, the setup that timed them, keypoints, level fractions) and their means (times
pooled only over one setup; :func:`summarize`). Re-running the same command
resumes (images with both a record and a readable ``.npz`` holding the three arrays are skipped;
a damaged ``.npz`` is named on stderr and extracted again); other settings are refused, naming
the setting. Under ``torchrun`` the sequences are sharded over the processes and rank 0
writes the summary after every step (a sequence per process). An error on one process (a bad
image) stops every process with its one-line message, after the records of the images finished
in that step, its own before the error included, are written.

Descriptor sampling (the paper's code): the feature grid of ``h' x w'`` cells covers the
``h x w`` network input "align-corners" style, cell ``i`` sitting at pixel
``i * (h - 1) / (h' - 1)``; a keypoint ``(x, y)`` takes cell
``(round(y * (h' - 1) / (h - 1)), round(x * (w' - 1) / (w - 1)))``. (Ties cannot occur when
``h = F * h'`` with ``F`` = 1 or even, so the rounding mode does not matter.)
"""
from __future__ import annotations

import math
import os
import sys
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..distributed import init_distributed, resolve_device
from ..io import (OutputLock, check_output_path, read_json, settings_difference, write_atomic,
                  write_json_atomic)
from . import hpatches
from .levels import MASKS, check_dilations, num_levels
from .preprocess import MAX_SUM_EDGES, SEMANTICS

__all__ = ["FORMAT", "ARRAYS", "ExtractConfig", "Extractor", "sample_descriptors", "run_extract",
           "feature_path", "feature_file_problem", "summarize", "timed_on"]

FORMAT = "cad-spconv-keypoints/1"
SUMMARY = "summary.json"
ARRAYS = ("keypoints", "scores", "descriptors")
# what reading a damaged .npz raises: truncated (BadZipFile), empty (EOFError), a bad header or
# an array cut short (ValueError), an unreadable file (OSError), a damaged member (zlib.error)
DAMAGED = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error)


def feature_path(out: str, sequence: str, k: int) -> str:
    return os.path.join(out, sequence, f"{k}.npz")


def feature_file_problem(path: str) -> Optional[str]:
    """Why ``path`` is not a complete features file as :func:`run_extract` writes it, or ``None``
    if it is (also ``"missing"``). Cheap: the zip directory and the three arrays' ``.npy`` headers
    are read, not the arrays; the sizes the headers imply must be those stored, and the shapes
    ``[N, 3]`` / ``[N]`` / ``[N, C]``."""
    if not os.path.isfile(path):
        return "missing"
    fmt = np.lib.format
    shapes = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in ARRAYS:
                try:
                    info = zf.getinfo(f"{name}.npy")
                except KeyError:
                    return f"no {name!r} array"
                with zf.open(info) as f:
                    version = fmt.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        return f"{name}: .npy format version {version}"
                    read = (fmt.read_array_header_1_0 if version == (1, 0)
                            else fmt.read_array_header_2_0)
                    shape, _, dtype = read(f)
                    if info.file_size != f.tell() + math.prod(shape) * dtype.itemsize:
                        return (f"{name}: {info.file_size} bytes stored, not those of "
                                f"{shape} {dtype}")
                shapes[name] = shape
    except DAMAGED as e:
        return f"{type(e).__name__}: {e}"
    kp, sc, de = (shapes[n] for n in ARRAYS)
    if len(kp) != 2 or kp[1] != 3 or sc != kp[:1] or len(de) != 2 or de[0] != kp[0]:
        return f"shapes {kp} / {sc} / {de} are not [N, 3] / [N] / [N, C]"
    return None


@dataclass
class ExtractConfig:
    """Settings of one extraction (the command-line options)."""

    data_root: str
    out: str
    finest_stride: int
    dilations: tuple = ()
    weights: Optional[str] = None
    random_weights: bool = False
    seed: int = 0
    mask: str = "keypoints"
    semantics: str = "paper"
    num_points: int = 512
    max_sum_edges: int = MAX_SUM_EDGES
    device: Optional[str] = None
    dtype: str = "float32"
    engine: str = "auto"
    progress: bool = True
    _weights_sha256: Optional[str] = field(default=None, repr=False)

    @property
    def adaptive(self) -> bool:
        return len(self.dilations) > 0

    def validate(self) -> "ExtractConfig":
        self.dilations = tuple(self.dilations or ())
        num_levels(self.finest_stride)
        if self.adaptive:
            self.dilations = check_dilations(self.dilations, self.finest_stride)
        if self.mask not in MASKS:
            raise ValueError(f"--mask must be one of {MASKS}, got {self.mask!r}")
        if isinstance(self.max_sum_edges, bool) or self.max_sum_edges < 16:
            # the network needs 8 pixels a side: a smaller budget shrinks every image to nothing
            raise ValueError(f"--max-sum-edges must be >= 16 (height + width after resizing; "
                             f"each side needs 8 pixels), got {self.max_sum_edges}; the default "
                             f"{MAX_SUM_EDGES} is D2-Net's")
        if self.mask != "keypoints" and not self.adaptive:
            raise ValueError(f"--mask {self.mask} is an adaptive-network ablation: give --dilations "
                             "(the keypoint plan whose budget it matches) and --finest-stride 1, 2 or 4")
        if self.semantics not in SEMANTICS:
            raise ValueError(f"--semantics must be one of {SEMANTICS}, got {self.semantics!r}")
        from cad_spconv.engines import check_engine
        check_engine(self.engine)  # also where a dense run never uses it: a typo is not ignored
        if (self.weights is None) == (not self.random_weights):
            raise ValueError("give exactly one of --weights d2_tf.pth and --random-weights")
        if self.weights is not None and not os.path.isfile(self.weights):
            raise FileNotFoundError(f"--weights {self.weights} does not exist; download D2-Net's "
                                    "d2_tf.pth or use --random-weights")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or \
                not 0 <= self.seed < 2 ** 64:  # what numpy's and torch's generators take
            raise ValueError(f"--seed must be a non-negative integer below 2**64, got "
                             f"{self.seed!r}")
        if self.num_points < 1:
            raise ValueError(f"--num-keypoints must be >= 1, got {self.num_points}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        return self

    def settings(self) -> dict:
        """What changes the results; a resumed run must match it."""
        if self.weights is not None and self._weights_sha256 is None:
            from ..io import file_sha256
            self._weights_sha256 = file_sha256(self.weights)
        seeded = self.random_weights or self.mask != "keypoints"
        return {"finest_stride": self.finest_stride, "dilations": list(self.dilations),
                "mask": self.mask, "semantics": self.semantics,
                "weights": "random" if self.random_weights else f"sha256:{self._weights_sha256}",
                "seed": self.seed if seeded else None, "num_keypoints": self.num_points,
                "max_sum_edges": self.max_sum_edges, "dtype": self.dtype}


def sample_descriptors(features, xy: np.ndarray, image_size, dtype=np.float32) -> np.ndarray:
    """Descriptors ``[N, C]`` (``dtype``) of keypoints ``xy`` (int ``[N, 2]``, network-input
    pixels) from a feature map ``[C, h', w']`` covering an ``image_size`` image (module
    docstring)."""
    import torch

    h, w = (int(v) for v in image_size)
    hf, wf = features.shape[-2:]
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    iy = np.rint(xy[:, 1] * (hf - 1) / max(h - 1, 1)).astype(np.int64)
    ix = np.rint(xy[:, 0] * (wf - 1) / max(w - 1, 1)).astype(np.int64)
    iy_t = torch.from_numpy(iy).to(features.device)
    ix_t = torch.from_numpy(ix).to(features.device)
    return features[:, iy_t, ix_t].t().cpu().numpy().astype(dtype)


class Extractor:
    """The per-image work of an extraction (network built once)."""

    def __init__(self, cfg: ExtractConfig, stack=None, device=None):
        import torch

        from .network import DescriptorNetwork, load_d2_weights, random_features

        self.cfg = cfg
        self.device = torch.device(resolve_device(device or cfg.device or "cpu"))
        self.dtype = getattr(torch, cfg.dtype)
        if stack is None:
            stack = (random_features(cfg.seed) if cfg.random_weights
                     else load_d2_weights(cfg.weights))
        stack = stack.to(device=self.device, dtype=self.dtype).eval()
        self.net = DescriptorNetwork(stack, cfg.finest_stride, cfg.adaptive, cfg.engine,
                                     cfg.semantics).eval()
        self.num_levels = self.net.num_levels
        self._dense_macs: dict = {}  # input size -> count of the dense network

    def plan(self, xy: np.ndarray, size, sequence: str = "", k: int = 0):
        """The level plan of one image (``None`` for dense networks)."""
        import torch

        from cad_spconv import LevelPlan

        from .levels import inverted_levels, keypoint_plan, random_levels

        cfg = self.cfg
        if not cfg.adaptive:
            return None
        plan = keypoint_plan(xy, size, cfg.dilations, cfg.finest_stride, cfg.semantics, self.device)
        if cfg.mask == "keypoints":
            return plan
        rng = np.random.default_rng([cfg.seed, zlib.crc32(sequence.encode()), int(k)])
        levels = plan.levels[0].cpu().numpy()
        if cfg.mask == "random":
            new = random_levels(levels, self.num_levels, rng)
        else:
            cells = np.asarray(xy, dtype=np.int64).reshape(-1, 2)[:, ::-1] // cfg.finest_stride
            new = inverted_levels(levels, self.num_levels, cells, rng)
        return LevelPlan.from_level_map(torch.from_numpy(new)[None].to(self.device), self.num_levels)

    def run(self, rgb: np.ndarray, sequence: str = "", k: int = 0) -> dict:
        """Everything about one RGB ``uint8`` image: ``prepared`` (:class:`Prepared`), ``xy``
        and ``responses`` (SIFT, network-input pixels), ``plan``, ``features`` (the network's
        output, ``[1, C, h / F, w / F]`` in the run's dtype), ``macs`` (a ``count_macs``-style
        dict, :meth:`macs`), ``time_s`` (network, a forward without the counter's hooks) and
        ``sift_time_s``."""
        import torch

        from .preprocess import caffe_tensor, prepare_image
        from .sift import detect

        cfg = self.cfg
        prep = prepare_image(rgb, cfg.max_sum_edges, cfg.semantics)
        h, w = prep.rgb.shape[:2]
        t0 = time.perf_counter()
        xy, responses = detect(prep.rgb, cfg.num_points,
                               "reference" if cfg.semantics == "reference" else "luminance")
        sift_s = time.perf_counter() - t0
        x = caffe_tensor(prep.rgb, self.dtype, self.device)
        plan = self.plan(xy, (h, w), sequence, k)
        with torch.no_grad():
            self._sync()
            t0 = time.perf_counter()
            features = self.net(x, plan)
            self._sync()
            net_s = time.perf_counter() - t0
        return {"prepared": prep, "xy": xy, "responses": responses, "plan": plan,
                "features": features, "macs": self.macs(x, plan), "time_s": net_s,
                "sift_time_s": sift_s}

    def macs(self, x, plan) -> dict:
        """Multiply-adds of the network on ``x`` (with ``plan``), ``count_macs``-style, from a
        counted forward apart from the timed one: the counter's hooks (on CUDA a device-to-host
        copy in every adaptive layer) would be timed too. A dense network's count depends only
        on the input size and is counted once per size."""
        import torch

        from cad_spconv.macs import MacCounter

        size = tuple(x.shape[-2:])
        if plan is None and size in self._dense_macs:
            return self._dense_macs[size]
        with torch.no_grad(), MacCounter(self.net.net, 1) as counter:
            self.net(x, plan)
        macs = counter.result()
        if plan is None:
            self._dense_macs[size] = macs
        return macs

    def __call__(self, rgb: np.ndarray, sequence: str = "", k: int = 0) -> tuple[dict, dict]:
        """``(arrays for the .npz, record for the summary)`` of one RGB ``uint8`` image."""
        r = self.run(rgb, sequence, k)
        prep, xy, macs = r["prepared"], r["xy"], r["macs"]
        h, w = prep.rgb.shape[:2]
        descriptors = sample_descriptors(r["features"][0], xy, (h, w))
        keypoints = np.concatenate([prep.to_original(xy), np.ones((len(xy), 1))], 1)
        record = {"size": list(prep.original_size), "network_size": [h, w],
                  "num_keypoints": int(len(xy)), "macs": int(macs["total"]),
                  "macs_parts": ({p: int(v) for p, v in macs["parts"].items()} if self.cfg.adaptive
                                 else {"dense": int(macs["total"])}),
                  "time_s": r["time_s"], "sift_time_s": r["sift_time_s"]}
        if r["plan"] is not None:
            record["level_fractions"] = [float(v) for v in r["plan"].level_fractions()[0]]
        arrays = {"keypoints": keypoints.astype(np.float32),
                  "scores": r["responses"].astype(np.float32), "descriptors": descriptors}
        return arrays, record

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _save_npz(path: str, arrays: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def timed_on(device, engine: Optional[str] = None, processes: int = 1) -> str:
    """What an image's times depend on besides the settings, as recorded per image
    (``timed_on``): the device as :func:`cad_apps.distributed.device_name` names it (the GPU's
    model, or the CPU's model and its threads), the engine of an adaptive network (``None``:
    dense) and the processes sharing the machine (``torchrun``)."""
    import torch

    from ..distributed import device_name

    parts = [device_name(torch.device(device))]
    if engine is not None:
        parts.append(f"engine {engine}")
    if processes > 1:
        parts.append(f"{processes} processes")
    return ", ".join(parts)


def _times(recs: list) -> dict:
    return {"time_per_image_s_mean": float(np.mean([r["time_s"] for r in recs])),
            "time_per_image_s_median": float(np.median([r["time_s"] for r in recs])),
            "sift_time_per_image_s_mean": float(np.mean([r["sift_time_s"] for r in recs]))}


def summarize(images: dict) -> dict:
    """Means over the per-image records. Times are pooled only over records of one setup
    (``timed_on``): records timed on several (a resume on another device or engine) leave the
    pooled times ``None`` and give them per setup in ``timings_by_setup``."""
    recs = list(images.values())
    if not recs:
        return {"num_images": 0}
    setups: dict = {}
    for r in recs:  # records of earlier versions name no setup
        setups.setdefault(r.get("timed_on", "not recorded"), []).append(r)
    mixed = len(setups) > 1
    out = {"num_images": len(recs),
           "macs_mean": float(np.mean([r["macs"] for r in recs])),
           "macs_parts_mean": {p: float(np.mean([r["macs_parts"].get(p, 0) for r in recs]))
                               for p in sorted({p for r in recs for p in r["macs_parts"]})},
           **(dict.fromkeys(_times(recs)) if mixed else _times(recs)),
           "timed_on": None if mixed else next(iter(setups)),
           "time_total_s": float(sum(r["total_s"] for r in recs)),
           "num_keypoints_mean": float(np.mean([r["num_keypoints"] for r in recs]))}
    if mixed:
        out["timings_by_setup"] = {k: {"num_images": len(v), **_times(v)}
                                   for k, v in sorted(setups.items())}
    if all("level_fractions" in r for r in recs):
        out["level_fractions_mean"] = [float(v) for v in
                                       np.mean([r["level_fractions"] for r in recs], axis=0)]
    return out


def _load_summary(cfg: ExtractConfig, path: str) -> dict:
    fresh = {"format": FORMAT, "settings": cfg.settings(), "weights_file": (
        os.path.abspath(cfg.weights) if cfg.weights else None),
        "data_root": os.path.abspath(cfg.data_root), "environment": {}, "summary": {},
        "complete": False, "images": {}}
    if not os.path.isfile(path):
        return fresh
    old = read_json(path, FORMAT, "a cad-spconv keypoints summary",
                    "choose another --out, or remove the file (the .npz files will be recomputed)")
    if not isinstance(old.get("settings"), dict) or not isinstance(old.get("images"), dict):
        raise ValueError(f"{path} is not a cad-spconv keypoints summary; choose another --out")
    mine = fresh["settings"]
    if old.get("data_root") and old["data_root"] != fresh["data_root"]:
        raise ValueError(f"{cfg.out} holds features of {old['data_root']}, not of --data-root "
                         f"{fresh['data_root']}; choose another --out, or give that data root")
    shown = settings_difference(old["settings"], mine, "in the folder")
    if shown:
        raise ValueError(f"{cfg.out} holds features extracted with other settings ({shown}); "
                         "choose another --out, or delete the folder to start over")
    old["settings"] = mine
    return old


def run_extract(cfg: ExtractConfig, stack=None) -> Optional[dict]:
    """Run (or resume) an extraction; returns the summary dict on rank 0, ``None`` elsewhere."""
    import torch

    cfg.validate()
    device_name = resolve_device(cfg.device)
    from cad_spconv.masks import require_opencv

    try:  # before the output folder and its lock are made
        require_opencv("cad-spconv keypoints extract")
    except ImportError as e:
        raise ValueError(str(e)) from None
    if stack is None and cfg.weights is not None:  # a bad file is refused before --out exists
        from .network import load_d2_weights
        stack = load_d2_weights(cfg.weights)
    dist = init_distributed(torch.device(device_name).type)
    if dist.active and torch.device(device_name).type == "cuda":
        device_name = f"cuda:{dist.local_rank}"
    out = os.path.abspath(cfg.out)
    summary_path = os.path.join(out, SUMMARY)
    lock, summary, todo = None, None, None
    try:
        with dist.errors_shared():  # every rank stops, none is left waiting, each with the error
            if dist.main:
                check_output_path(out, "--out", folder=True)
                lock = OutputLock(summary_path, "--out")
                lock.__enter__()
                sequences = hpatches.list_sequences(cfg.data_root)
                for seq in sequences:
                    hpatches.load_sequence(seq, homographies=False)
                summary = _load_summary(cfg, summary_path)
                summary["images"] = _kept_images(out, summary["images"])
                _check_no_stale_sequences(out, cfg.data_root, summary["images"], sequences)
                todo = [(s.name, s.folder, [k for k in hpatches.IMAGES
                                            if f"{s.name}/{k}" not in summary["images"]])
                        for s in sequences]
                todo = [t for t in todo if t[2]]
                summary["num_images_requested"] = len(sequences) * len(hpatches.IMAGES)
        todo = dist.broadcast(todo)
        with dist.errors_shared():
            extractor = Extractor(cfg, stack, device_name)
            if dist.main:
                summary["environment"] = _environment(extractor, dist, device_name)
        _loop(cfg, out, dist, extractor, summary, todo, summary_path,
              timed_on(extractor.device, cfg.engine if cfg.adaptive else None, dist.world))
        dist.on_main(lambda: _write_summary(summary_path, summary))
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
        dist.close()
    return summary if dist.main else None


def _check_no_stale_sequences(out: str, data_root: str, images: dict, sequences) -> None:
    """Refuse a folder holding features of sequences no longer in ``--data-root``: its summary
    would pool their records with this run's and call the extraction complete."""
    stale = sorted({_split(i)[0] for i in images} - {s.name for s in sequences})
    if stale:
        shown = ", ".join(stale[:5]) + (f" and {len(stale) - 5} more" if len(stale) > 5 else "")
        raise ValueError(
            f"--out {out} holds features of {len(stale)} sequence(s) no longer in --data-root "
            f"{os.path.abspath(data_root)}: {shown}; its summary would pool them with this run's. "
            f"Put them back in --data-root, delete their folders in --out (e.g. "
            f"{os.path.join(out, stale[0])}) to drop them, or choose another --out")


def _kept_images(out: str, images: dict) -> dict:
    """The records of a resumed folder whose ``.npz`` is there and readable: the others are
    extracted again (a damaged file can come from a disk problem or an interrupted copy of
    the folder; this command's own writes are atomic). Damaged files are named on stderr."""
    kept, damaged = {}, []
    for image_id, rec in images.items():
        path = feature_path(out, *_split(image_id))
        problem = feature_file_problem(path)
        if problem is None:
            kept[image_id] = rec
        elif problem != "missing":
            damaged.append(f"{path} ({problem})")
    if damaged:
        print(f"cad-spconv keypoints extract: {len(damaged)} damaged features file(s) will be "
              "extracted again: " + "; ".join(damaged), file=sys.stderr)
    return kept


def _split(image_id: str) -> tuple[str, int]:
    seq, _, k = image_id.rpartition("/")
    return seq, int(k)


def _loop(cfg, out, dist, extractor, summary, todo, summary_path, setup=None) -> None:
    shard = dist.shard(todo)
    steps = math.ceil(len(todo) / dist.world) if todo else 0
    bar = None
    if cfg.progress and dist.main and todo:
        from tqdm import tqdm
        label = ({"keypoints": "adaptive"}.get(cfg.mask, cfg.mask)
                 + f" {cfg.finest_stride}->8 [{' '.join(map(str, cfg.dilations))}]"
                 if cfg.adaptive else f"dense stride {cfg.finest_stride}")
        bar = tqdm(total=sum(len(t[2]) for t in todo), desc=label, unit="img",
                   dynamic_ncols=True)

    def write(gathered):  # rank 0, after every step with new records
        for r, part in enumerate(gathered):
            for image_id, rec in part:
                summary["images"][image_id] = rec
            if bar is not None and r > 0:
                bar.update(len(part))
        summary["images"] = dict(sorted(summary["images"].items()))
        _write_summary(summary_path, summary)
        if bar is not None:
            s = summary["summary"]
            bar.set_postfix(GMA=f"{s['macs_mean'] / 1e9:.2f}")

    for step in range(steps):
        records, error = [], None
        try:
            if step < len(shard):
                name, folder, ks = shard[step]
                for k in ks:
                    t0 = time.perf_counter()
                    rgb = hpatches.read_image(hpatches.image_path(folder, k))
                    arrays, rec = extractor(rgb, name, k)
                    _save_npz(feature_path(out, name, k), arrays)
                    rec["total_s"] = time.perf_counter() - t0
                    if setup is not None:
                        rec["timed_on"] = setup
                    records.append((f"{name}/{k}", rec))
                    if bar is not None:
                        bar.update(1)
        except Exception as e:  # raised below, after the records of this step are written
            error = e
        dist.share_step(records, error, write)
    if bar is not None:
        bar.close()


def _write_summary(path: str, summary: dict) -> None:
    """Write ``summary`` atomically with its means and ``complete`` recomputed from the records
    it holds: a resumed folder's old ``complete: true`` is never written back while images are
    missing (an interrupted resume left it on disk)."""
    summary["summary"] = summarize(summary["images"])
    summary["complete"] = len(summary["images"]) >= summary["num_images_requested"]
    write_json_atomic(path, summary)


def _environment(extractor: Extractor, dist, device_name: str) -> dict:
    import platform

    import cv2
    import torch

    env = {"torch": torch.__version__, "opencv": cv2.__version__,
           "python": platform.python_version(), "device": device_name, "world_size": dist.world,
           "engine": extractor.cfg.engine,
           "timing": "cuda synchronize + perf_counter" if extractor.device.type == "cuda"
           else "perf_counter"}
    if extractor.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(extractor.device)
    return env


def config_dict(cfg: ExtractConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if not k.startswith("_")}
