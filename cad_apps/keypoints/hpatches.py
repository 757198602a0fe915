"""HPatches sequences (Balntas et al., CVPR 2017): reading them, and writing small synthetic
sets in the same layout for tests and demos.

Layout (as distributed, and as the D2-Net / CAD evaluation reads it)::

    <root>/<sequence>/1.ppm ... 6.ppm        # the six images of a sequence
    <root>/<sequence>/H_1_2 ... H_1_6        # 3x3 homographies, image 1 -> image k (text)

``i_*`` sequences change illumination (homographies close to the identity), ``v_*`` sequences
change viewpoint. Homographies act on pixel coordinates with pixel centres at integers (OpenCV's
convention): ``p_k ~ H_1_k @ (x_1, y_1, 1)``.

Anything missing or malformed is an error naming the file and the fix; nothing is skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["IMAGES", "PAIRS", "HIGH_RESOLUTION", "HPatchesSequence", "list_sequences", "load_sequence",
           "read_image", "check_image", "read_homography", "image_path", "homography_path",
           "synthetic_scene", "write_synthetic"]

#: image numbers of a sequence; image 1 is the reference of every pair
IMAGES = (1, 2, 3, 4, 5, 6)
#: the evaluated pairs (1, k)
PAIRS = tuple((1, k) for k in IMAGES[1:])
KINDS = {"i": "illumination", "v": "viewpoint"}
#: sequences with images larger than 1600x1200 that D2-Net's benchmark (and the paper's
#: numbers: 52 illumination + 56 viewpoint sequences) leave out; delete them from the data root
HIGH_RESOLUTION = ("i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
                   "v_artisans", "v_astronautis", "v_talent")
_LAYOUT = ("HPatches layout: <root>/<sequence>/{1..6}.ppm and <root>/<sequence>/H_1_{2..6}, "
           "sequence names starting with i_ (illumination) or v_ (viewpoint)")


@dataclass(frozen=True)
class HPatchesSequence:
    """One sequence: its name, folder and kind (``"i"`` or ``"v"``)."""

    name: str
    folder: str

    @property
    def kind(self) -> str:
        return self.name[0]

    def image(self, k: int) -> str:
        return image_path(self.folder, k)

    def homography(self, k: int) -> str:
        return homography_path(self.folder, k)


def image_path(folder: str, k: int) -> str:
    return os.path.join(folder, f"{k}.ppm")


def homography_path(folder: str, k: int) -> str:
    return os.path.join(folder, f"H_1_{k}")


def list_sequences(root: str) -> list[HPatchesSequence]:
    """The sequences under ``root``, sorted by name (hidden entries and files are ignored).

    Raises ``FileNotFoundError`` for a missing root and ``ValueError`` for a root without
    sequences or with a folder whose name is not ``i_*`` / ``v_*``."""
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root} does not exist or is not a folder; point it at "
                                f"the unpacked hpatches-sequences-release folder ({_LAYOUT})")
    names = sorted(n for n in os.listdir(root)
                   if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
    if not names:
        raise ValueError(f"--data-root {root} holds no sequence folders ({_LAYOUT})")
    bad = [n for n in names if n[:2] not in ("i_", "v_")]
    if bad:
        raise ValueError(f"--data-root {root}: folder {bad[0]!r} is not an HPatches sequence (names "
                         f"start with i_ or v_); move it out of the data root ({_LAYOUT})")
    return [HPatchesSequence(n, os.path.join(root, n)) for n in names]


def load_sequence(seq: HPatchesSequence, homographies: bool = True) -> None:
    """Check that every image (and, with ``homographies``, every homography) of ``seq`` exists
    and parses; raises the error :func:`read_image` / :func:`read_homography` would. Cheap: a
    binary PPM / PGM / PBM (HPatches' format) is checked by its header and the size of its pixel
    data, any other file is decoded (:func:`check_image`)."""
    for k in IMAGES:
        path = seq.image(k)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"sequence {seq.name}: image {path} is missing; every sequence "
                                    f"needs 1.ppm ... 6.ppm ({_LAYOUT})")
        check_image(path)
    if homographies:
        for _, k in PAIRS:
            read_homography(seq.homography(k))


def read_image(path: str) -> np.ndarray:
    """The image as read: RGB ``uint8 [H, W, 3]`` (grey images are repeated to 3 channels, as
    the reference does)."""
    import cv2

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} is missing ({_LAYOUT})")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or min(bgr.shape[:2]) < 1:
        raise ValueError(_undecodable(path))
    return np.ascontiguousarray(bgr[:, :, ::-1])


def _undecodable(path: str) -> str:
    return (f"image {path} cannot be decoded as an 8-bit image; replace it with the file from "
            "the HPatches release")


def check_image(path: str) -> None:
    """Raise the error :func:`read_image` would for the existing file ``path``, without decoding
    a binary PPM / PGM / PBM (``P6`` / ``P5`` / ``P4``, HPatches' format) whose header has no
    comment (``#``) and no carriage return: its header must be whole (width, height and, but
    for ``P4``, a maxval of 1 ... 65535) and the file must hold all the pixel data the header
    promises. Any other file, a PNM with ``#`` or ``\\r`` in its header included (OpenCV's
    rules for those differ in edge cases), is decoded."""
    complete = _pnm_complete(path)
    if complete is None:
        read_image(path)
    elif not complete:
        raise ValueError(_undecodable(path))


def _pnm_complete(path: str):
    """Whether a binary PNM file has a whole header and all its pixel data (``None``: the file
    is not a binary PNM, or its header has a ``#`` or a ``\\r``, so it is to be decoded)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(2)
        if magic not in (b"P4", b"P5", b"P6"):
            return None
        fields, c = [], f.read(1)
        if c in (b"#", b"\r"):
            return None
        if not c.isspace():
            return False
        while len(fields) < (2 if magic == b"P4" else 3):
            if c in (b"#", b"\r"):  # a comment or CR: decode (OpenCV's rules differ at edges)
                return None
            elif c.isspace():
                c = f.read(1)
            elif c.isdigit():
                digits = b""
                while c.isdigit():
                    digits += c
                    c = f.read(1)
                fields.append(int(digits))
            else:  # another character, or the end of the file
                return False
        if c in (b"#", b"\r"):
            return None
        if not c.isspace():  # one whitespace character ends the header
            return False
        width, height, maxval = (*fields, 1)[:3]
        if width < 1 or height < 1 or not 1 <= maxval <= 65535:
            return False
        row = ((width + 7) // 8 if magic == b"P4"
               else width * (3 if magic == b"P6" else 1) * (1 if maxval < 256 else 2))
        return size - f.tell() >= row * height


def read_homography(path: str) -> np.ndarray:
    """A 3x3 homography (float64) from a whitespace-separated text file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"homography {path} is missing; every sequence needs H_1_2 ... "
                                f"H_1_6 ({_LAYOUT})")
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
        values = np.array([[float(v) for v in row] for row in rows], dtype=np.float64)
    except ValueError:
        raise ValueError(f"homography {path} is malformed: expected 3 lines of 3 numbers; replace "
                         "it with the file from the HPatches release") from None
    if values.shape != (3, 3):
        raise ValueError(f"homography {path} is malformed: expected 3 lines of 3 numbers, got "
                         f"{[len(r) for r in rows]} numbers per line; replace it with the file "
                         "from the HPatches release")
    scale = float(np.abs(values).max()) if np.isfinite(values).all() else 0.0
    if scale == 0.0 or abs(np.linalg.det(values)) <= 1e-12 * scale ** 3:
        raise ValueError(f"homography {path} is not a finite invertible 3x3 matrix; replace it "
                         "with the file from the HPatches release")
    return values


# ---------------------------------------------------------------------------------- synthetic
def synthetic_scene(size: Sequence[int] = (256, 384), seed: int = 0) -> np.ndarray:
    """A procedural RGB ``uint8`` scene with corners and blobs (SIFT finds keypoints on it):
    random rectangles, ellipses and lines over a smooth background, lightly blurred."""
    import cv2

    rng = np.random.default_rng(seed)
    h, w = int(size[0]), int(size[1])
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([90 + 60 * np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in (0.0, 1.3, 2.6)], -1)
    img = np.clip(base, 0, 255).astype(np.uint8)
    n = max(8, h * w // 900)
    for _ in range(n):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        kind = rng.integers(0, 3)
        if kind == 0:
            x1, y1 = x0 + int(rng.integers(4, 30)), y0 + int(rng.integers(4, 30))
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        elif kind == 1:
            axes = (int(rng.integers(3, 16)), int(rng.integers(3, 16)))
            cv2.ellipse(img, (x0, y0), axes, float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            x1, y1 = int(rng.integers(0, w)), int(rng.integers(0, h))
            cv2.line(img, (x0, y0), (x1, y1), color, int(rng.integers(1, 4)))
    img = img.astype(np.float64) + rng.normal(0, 4, img.shape)
    img = cv2.GaussianBlur(np.clip(img, 0, 255).astype(np.uint8), (3, 3), 0.8)
    return img


def _crop_transform(scene_size, image_size) -> np.ndarray:
    """Image 1 pixel -> scene pixel: the image sits at the scene's centre, scale 1."""
    (sh, sw), (h, w) = scene_size, image_size
    return np.array([[1.0, 0, (sw - w) / 2], [0, 1.0, (sh - h) / 2], [0, 0, 1.0]])


def _random_view(rng, image_size, strength: float) -> np.ndarray:
    """A random homography about the image centre: rotation, scale, shear, perspective."""
    h, w = image_size
    c = np.array([[1.0, 0, (w - 1) / 2], [0, 1.0, (h - 1) / 2], [0, 0, 1]])
    a = rng.uniform(-0.25, 0.25) * strength
    s = np.exp(rng.uniform(-0.2, 0.2) * strength)
    sh = rng.uniform(-0.1, 0.1) * strength
    p = rng.uniform(-0.6, 0.6, 2) * strength / max(h, w)
    t = rng.uniform(-0.08, 0.08, 2) * strength * np.array([w, h])
    m = np.array([[s * np.cos(a), -s * np.sin(a) + sh, t[0]],
                  [s * np.sin(a), s * np.cos(a), t[1]],
                  [p[0], p[1], 1.0]])
    return c @ m @ np.linalg.inv(c)


def _photometric(img: np.ndarray, gain: float, gamma: float, tint) -> np.ndarray:
    x = img.astype(np.float64) / 255.0
    x = np.clip(gain * np.asarray(tint)[None, None, :] * x ** gamma, 0, 1)
    return np.round(x * 255).astype(np.uint8)


def write_synthetic(root: str, scenes: Sequence[np.ndarray], image_size: Sequence[int] = (64, 96),
                    kinds: Sequence[str] = ("i", "v"), seed: int = 0,
                    view_strength: float = 1.0) -> list[str]:
    """Write a small HPatches-format set under ``root``: for every scene (RGB ``uint8``, at
    least twice the image size in each dimension) and every kind one sequence
    ``<kind>_synth<n>`` with six ``image_size`` images and exact homographies.

    - viewpoint (``v``): image ``k`` samples the scene through ``A_k = A_1 @ V_k`` (``A_1``: a
      central crop, ``V_k``: a random rotation / scale / shear / perspective), bilinear;
      ``H_1_k = inv(A_k) @ A_1`` (maps image-1 pixels to image-``k`` pixels exactly), plus a
      mild brightness change;
    - illumination (``i``): the same crop (``H_1_k`` = identity) under a random gain, gamma
      and colour tint per image.

    Returns the sequence names. Deterministic for a given ``seed``.
    """
    import cv2

    h, w = (int(v) for v in image_size)
    names = []
    rng = np.random.default_rng(seed)
    for n, scene in enumerate(scenes):
        scene = np.asarray(scene)
        if scene.dtype != np.uint8 or scene.ndim != 3 or scene.shape[2] != 3:
            raise ValueError("scenes must be RGB uint8 arrays [H, W, 3]")
        if scene.shape[0] < 2 * h or scene.shape[1] < 2 * w:
            raise ValueError(f"scene {n} ({scene.shape[0]}x{scene.shape[1]}) must be at least twice "
                             f"the image size {h}x{w} in each dimension")
        a1 = _crop_transform(scene.shape[:2], (h, w))
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"kinds must be 'i' or 'v', got {kind!r}")
            name = f"{kind}_synth{n}"
            folder = os.path.join(root, name)
            os.makedirs(folder, exist_ok=True)
            for k in IMAGES:
                if kind == "v" and k > 1:
                    ak = a1 @ _random_view(rng, (h, w), view_strength * (0.4 + 0.15 * k))
                    gain, gamma, tint = rng.uniform(0.85, 1.15), 1.0, (1.0, 1.0, 1.0)
                elif kind == "i" and k > 1:
                    ak = a1
                    gain, gamma = rng.uniform(0.45, 1.4), rng.uniform(0.7, 1.4)
                    tint = rng.uniform(0.85, 1.15, 3)
                else:
                    ak, gain, gamma, tint = a1, 1.0, 1.0, (1.0, 1.0, 1.0)
                img = cv2.warpPerspective(scene, ak, (w, h),
                                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                          borderMode=cv2.BORDER_REFLECT)
                img = _photometric(img, gain, gamma, tint)
                if not cv2.imwrite(image_path(folder, k), np.ascontiguousarray(img[:, :, ::-1])):
                    raise OSError(f"cannot write {image_path(folder, k)}")
                if k > 1:
                    hom = np.linalg.inv(ak) @ a1
                    np.savetxt(homography_path(folder, k), hom / hom[2, 2], fmt="%.17g")
            names.append(name)
    return names
