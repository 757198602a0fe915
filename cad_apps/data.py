"""Cityscapes for the paper's segmentation experiments (Hesse et al., CVPRW 2023, Sec. 4).

Reading goes through ``torchvision.datasets.Cityscapes`` (fine annotations, ``labelIds``);
labels are mapped to the 19 evaluation classes ("trainIds", everything else 255 = ignored) with
the class table torchvision ships, images are normalised with the ImageNet statistics the
torchvision backbones expect. Scores come from a confusion matrix (rows: ground truth, columns:
prediction), IoU per class and their mean over classes that occur (the standard Cityscapes mIoU).

:func:`make_synthetic_cityscapes` writes a tiny folder in the same layout (real label ids), so the
evaluation and experiment scripts can be run and tested without the real dataset.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from cad_spconv.images import IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize

from .io import file_sha256

__all__ = ["NUM_CLASSES", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "CLASS_NAMES",
           "read_image",
           "TRAIN_ID_COLORS", "label_ids_to_train_ids", "normalize", "denormalize",
           "CityscapesSegmentation", "collate", "ConfusionMatrix", "colorize",
           "make_synthetic_cityscapes"]

NUM_CLASSES = 19
IGNORE_INDEX = 255


def _classes():
    from torchvision.datasets import Cityscapes
    return Cityscapes.classes


def _train_id_lut() -> np.ndarray:
    """``[256]`` uint8: labelId -> trainId (255 for ignored and unknown ids)."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for c in _classes():
        if 0 <= c.id < 256 and 0 <= c.train_id < NUM_CLASSES:
            lut[c.id] = c.train_id
    return lut


_LUT = _train_id_lut()
CLASS_NAMES: tuple[str, ...] = tuple(
    c.name for c in sorted((c for c in _classes() if 0 <= c.train_id < NUM_CLASSES),
                           key=lambda c: c.train_id))
TRAIN_ID_COLORS = np.array(
    [c.color for c in sorted((c for c in _classes() if 0 <= c.train_id < NUM_CLASSES),
                             key=lambda c: c.train_id)], dtype=np.uint8)
assert len(CLASS_NAMES) == NUM_CLASSES


def label_ids_to_train_ids(label_ids) -> torch.Tensor:
    """Map Cityscapes ``labelIds`` (array or tensor of ints in 0..255) to trainIds (int64)."""
    arr = np.asarray(label_ids)
    if arr.dtype.kind not in "ui":
        raise TypeError(f"label ids must be integers, got {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"label ids must lie in 0..255, got {arr.min()}..{arr.max()}")
    return torch.from_numpy(_LUT[arr.astype(np.int64)].astype(np.int64))


class CityscapesSegmentation(torch.utils.data.Dataset):
    """Cityscapes fine annotations of one split, in a fixed (sorted) order.

    Items are dicts: ``image`` float32 ``[3, H, W]`` (ImageNet-normalised), ``target`` int64
    ``[H, W]`` trainIds (255 = ignore), ``id`` ``"<city>/<frame name>"`` (unique, used to resume
    and merge evaluations). ``root`` is the folder holding ``leftImg8bit/`` and ``gtFine/``.
    With ``sha256``, items also hold ``input_sha256`` (:meth:`input_sha256`: which files a
    result was computed from).
    """

    def __init__(self, root: str, split: str = "val", limit: int | None = None,
                 sha256: bool = False):
        from torchvision.datasets import Cityscapes
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"Cityscapes root {root!r} does not exist; pass the folder that "
                                    "contains leftImg8bit/ and gtFine/")
        try:
            ds = Cityscapes(root, split=split, mode="fine", target_type="semantic")
        except (RuntimeError, OSError) as e:  # OSError: e.g. a stray file where a city folder is
            raise FileNotFoundError(
                f"no Cityscapes {split!r} split under {root!r}: expected "
                f"{root}/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png and "
                f"{root}/gtFine/{split}/<city>/<name>_gtFine_labelIds.png ({e})") from None
        # torchvision lists folders in os.listdir order: sort so every process sees one order;
        # it takes every file of a city folder for a frame: only *_leftImg8bit.png are
        pairs = sorted((i, t[0]) for i, t in zip(ds.images, ds.targets)
                       if i.endswith("_leftImg8bit.png"))
        if not pairs:
            raise FileNotFoundError(f"the Cityscapes {split!r} split under {root!r} holds no images")
        missing = [t for _, t in pairs if not os.path.isfile(t)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} label files are missing, e.g. {missing[0]}")
        if limit is not None:
            if limit < 1:
                raise ValueError(f"limit must be >= 1, got {limit}")
            pairs = pairs[:limit]
        self.root, self.split, self.sha256 = root, split, sha256
        self.images = [p for p, _ in pairs]
        self.targets = [t for _, t in pairs]
        self.ids = [_frame_id(p) for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, index: int) -> torch.Tensor:
        """uint8 RGB ``[3, H, W]``."""
        arr = read_image(self.images[index], "RGB")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def load_target(self, index: int) -> torch.Tensor:
        arr = read_image(self.targets[index])
        problem = (f"{arr.shape[-1]} channels" if arr.ndim == 3 else
                   "1-bit pixels" if arr.dtype == bool else
                   f"{arr.dtype} pixels" if arr.dtype.kind not in "ui" else
                   f"values {arr.min()}..{arr.max()}" if arr.size and (
                       arr.min() < 0 or arr.max() > 255) else None)
        if problem:  # refused, not converted: a thresholded or rescaled map is not label ids
            raise ValueError(f"{self.targets[index]} has {problem}; labels must be an 8-bit "
                             "single-channel PNG of Cityscapes labelIds (0..255, as gtFine's "
                             "*_labelIds.png)")
        return label_ids_to_train_ids(arr)

    def __getitem__(self, index: int) -> dict:
        image = self.load_image(index)
        target = self.load_target(index)
        if image.shape[-2:] != target.shape:
            raise ValueError(f"{self.ids[index]}: image {tuple(image.shape[-2:])} and labels "
                             f"{tuple(target.shape)} differ in size")
        item = {"image": normalize(image), "target": target, "id": self.ids[index],
                "index": index}
        if self.sha256:  # in the loader's workers, after decoding (the bytes are cached)
            item["input_sha256"] = self.input_sha256(index)
        return item

    def input_sha256(self, index: int) -> dict:
        """``{"image": ..., "labels": ...}``: SHA-256 of the two files' bytes, which tell another
        copy of the data (the same frame ids, other pixels) from a moved copy of the same."""
        return {"image": file_sha256(self.images[index]),
                "labels": file_sha256(self.targets[index])}


def read_image(path: str, mode: str | None = None) -> np.ndarray:
    """An image file as an array (converted to ``mode`` if given); a file that is not an image,
    or is truncated, raises a ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            if mode == "RGB" and im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                # PIL would clip 16-bit / float values to 8 bits (a saturated image)
                raise ValueError(f"{path} is a {im.mode} image (16-bit or float); the models "
                                 "take 8-bit RGB: convert it first")
            return np.asarray(im.convert(mode) if mode else im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read the image {path} ({type(e).__name__}: {e}); replace the "
                         "file (a truncated download or copy?)") from None


def _frame_id(image_path: str) -> str:
    city = os.path.basename(os.path.dirname(image_path))
    name = os.path.basename(image_path).split("_leftImg8bit")[0]
    return f"{city}/{name}"


def collate(items: Sequence[dict]) -> dict:
    """Stack a batch; images of one batch must share a size (Cityscapes: all 1024x2048)."""
    sizes = {tuple(it["image"].shape[-2:]) for it in items}
    if len(sizes) > 1:
        raise ValueError(f"images of one batch differ in size {sorted(sizes)}: use --batch-size 1")
    batch = {"image": torch.stack([it["image"] for it in items]),
             "target": torch.stack([it["target"] for it in items]),
             "id": [it["id"] for it in items], "index": [it["index"] for it in items]}
    if items and "input_sha256" in items[0]:
        batch["input_sha256"] = [it["input_sha256"] for it in items]
    return batch


@dataclass
class ConfusionMatrix:
    """``counts[t, p]``: pixels of ground-truth class ``t`` predicted as ``p`` (ignore skipped).

    IoU of class ``c`` = TP / (TP + FP + FN) = ``counts[c,c] / (row_c + col_c - counts[c,c])``;
    classes with an empty union (absent from ground truth and prediction) have no IoU (NaN) and
    are left out of the mean, as in the Cityscapes benchmark scripts.
    """

    num_classes: int = NUM_CLASSES
    counts: np.ndarray | None = None

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.shape != (self.num_classes, self.num_classes):
            raise ValueError(f"counts must be {self.num_classes}x{self.num_classes}, "
                             f"got {self.counts.shape}")

    @staticmethod
    def compute(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """``[num_classes, num_classes]`` int64 counts for one prediction (on its device)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if pred.dtype.is_floating_point or target.dtype.is_floating_point:
            raise TypeError("prediction and target must be integer class maps (argmax the logits)")
        t = target.reshape(-1).to(torch.int64)
        p = pred.reshape(-1).to(torch.int64)
        valid = t != ignore_index
        t, p = t[valid], p[valid]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
            raise ValueError(f"target holds ids outside 0..{num_classes - 1} other than "
                             f"{ignore_index}: map labelIds to trainIds first")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= num_classes):
            raise ValueError(f"prediction holds ids outside 0..{num_classes - 1}")
        return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(
            num_classes, num_classes)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """Add one prediction; returns its own counts (numpy int64)."""
        c = self.compute(pred, target, self.num_classes).cpu().numpy()
        self.counts += c
        return c

    def add(self, counts) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != self.counts.shape:  # numpy would broadcast a row or a scalar
            raise ValueError(f"counts of shape {counts.shape}, this matrix is "
                             f"{self.counts.shape}")
        self.counts += counts

    def iou(self) -> np.ndarray:
        """``[num_classes]`` float64 IoU per class, NaN where the class is in neither map."""
        tp = np.diag(self.counts).astype(np.float64)
        union = self.counts.sum(0) + self.counts.sum(1) - np.diag(self.counts)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def miou(self) -> float:
        iou = self.iou()
        valid = ~np.isnan(iou)
        return float(iou[valid].mean()) if valid.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts) / total) if total else float("nan")

    # Sparse (true, pred, count) triples keep per-image matrices small in JSON files.
    def to_triples(self) -> list[list[int]]:
        return counts_to_triples(self.counts)

    @classmethod
    def from_triples(cls, triples: Iterable[Sequence[int]], num_classes: int = NUM_CLASSES):
        cm = cls(num_classes)
        cm.add(triples_to_counts(triples, num_classes))
        return cm


def counts_to_triples(counts) -> list[list[int]]:
    counts = np.asarray(counts)
    t, p = np.nonzero(counts)
    return [[int(a), int(b), int(counts[a, b])] for a, b in zip(t, p)]


def triples_to_counts(triples: Iterable[Sequence[int]], num_classes: int = NUM_CLASSES) -> np.ndarray:
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    for t, p, n in triples:
        if not (0 <= t < num_classes and 0 <= p < num_classes) or n < 0:
            # a negative index would count into another class silently
            raise ValueError(f"confusion triple {[t, p, n]}: classes must be in 0.."
                             f"{num_classes - 1} and the count >= 0")
        counts[t, p] += n
    return counts


def colorize(train_ids: torch.Tensor | np.ndarray) -> np.ndarray:
    """trainId map ``[H, W]`` -> uint8 RGB ``[H, W, 3]`` in the Cityscapes palette (ignore: black)."""
    ids = np.asarray(train_ids.cpu() if isinstance(train_ids, torch.Tensor) else train_ids)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:NUM_CLASSES] = TRAIN_ID_COLORS
    return palette[ids.astype(np.int64).clip(0, 255)]


# --------------------------------------------------------------------------- synthetic fixture
_CITIES = ("frankfurt", "lindau", "munster")


def make_synthetic_cityscapes(root: str, split: str = "val", num_images: int = 4,
                              size: tuple[int, int] = (64, 128), seed: int = 0) -> list[str]:
    """Write a tiny street-like dataset in the Cityscapes layout; returns the frame ids (sorted).

    Each image has sky, buildings, road, sidewalk, a few cars, people and poles drawn with their
    Cityscapes colours plus noise, and labelIds with the real ids (including ignored ones:
    ``unlabeled`` 0, ``ego vehicle`` 1, ``parking`` 9), so label mapping, mIoU and the edge masks
    all have something to work on. Images are spread over a few cities.
    """
    from PIL import Image
    H, W = int(size[0]), int(size[1])
    if H < 16 or W < 16:
        raise ValueError(f"synthetic images must be at least 16x16, got {H}x{W}")
    rng = np.random.default_rng(seed)
    palette = np.zeros((256, 3), dtype=np.int16)
    for c in _classes():
        if c.id >= 0:
            palette[c.id] = c.color
    ids = []
    for i in range(num_images):
        city = _CITIES[i % len(_CITIES)]
        name = f"{city}_{i:06d}_{19 + i:06d}"
        labels = _street_scene(rng, H, W)
        # mild noise: flat regions stay below the paper's edge thresholds, boundaries do not
        rgb = np.clip(palette[labels] + rng.integers(-3, 4, size=(H, W, 3)), 0, 255)
        img_dir = os.path.join(root, "leftImg8bit", split, city)
        gt_dir = os.path.join(root, "gtFine", split, city)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(gt_dir, exist_ok=True)
        Image.fromarray(rgb.astype(np.uint8)).save(os.path.join(img_dir, f"{name}_leftImg8bit.png"))
        Image.fromarray(labels.astype(np.uint8)).save(os.path.join(gt_dir, f"{name}_gtFine_labelIds.png"))
        ids.append(f"{city}/{name}")
    return sorted(ids)


def _street_scene(rng, H, W) -> np.ndarray:
    """labelIds of one synthetic street scene."""
    lab = np.full((H, W), 23, dtype=np.uint8)                       # sky
    horizon = int(H * rng.uniform(0.4, 0.55))
    x = 0
    while x < W:                                                    # buildings of varying height
        w = int(rng.integers(W // 8, W // 3))
        top = int(rng.uniform(0.05, 0.35) * H)
        lab[top:horizon, x:x + w] = rng.choice([11, 11, 21])        # building or vegetation
        x += w
    lab[horizon:] = 7                                               # road
    side = horizon + max(2, (H - horizon) // 5)
    lab[horizon:side, : W // 3] = 8                                 # sidewalk
    lab[horizon:side, W - W // 4:] = 9                              # parking (ignored)
    for _ in range(int(rng.integers(1, 4))):                        # cars
        ch, cw = max(3, H // 8), max(6, W // 8)
        cy = int(rng.integers(horizon - ch // 2, max(horizon - ch // 2 + 1, H - ch - H // 8)))
        cx = int(rng.integers(0, W - cw))
        lab[cy:cy + ch, cx:cx + cw] = 26
    for _ in range(int(rng.integers(1, 3))):                        # people
        ph, pw = max(4, H // 6), max(2, W // 40)
        py = int(rng.integers(max(0, horizon - ph), horizon))
        px = int(rng.integers(0, W - pw))
        lab[py:py + ph, px:px + pw] = 24
    px = int(rng.integers(0, W - 2))                                # a pole
    lab[H // 6:horizon + 2, px:px + max(1, W // 64)] = 17
    lab[H - max(1, H // 16):] = 1                                   # ego vehicle (ignored)
    lab[:1, :] = 0                                                  # unlabeled border row
    return lab
