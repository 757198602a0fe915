"""Inputs of the keypoint study: the HPatches reader and its errors, the synthetic writer's
homographies, preprocessing (resize, multiples of 8, caffe), the grey image and SIFT's
ordering / de-duplication."""
import os

import cv2
import numpy as np
import pytest

from cad_apps.keypoints import hpatches, sift
from cad_apps.keypoints.preprocess import CAFFE_MEAN_BGR, caffe_tensor, prepare_image
from tests.support.hpatches import make_hpatches
from tests.support.hpatches import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpatches")
    make_hpatches(root, image_size=(48, 64), num_scenes=1, seed=1)
    return str(root)


def test_reader_lists_sequences_and_reads_them(root):
    seqs = hpatches.list_sequences(root)
    assert [s.name for s in seqs] == ["i_synth0", "v_synth0"]
    assert [s.kind for s in seqs] == ["i", "v"]
    for s in seqs:
        hpatches.load_sequence(s)
        img = hpatches.read_image(s.image(1))
        assert img.shape == (48, 64, 3) and img.dtype == np.uint8
        h = hpatches.read_homography(s.homography(4))
        assert h.shape == (3, 3)
    np.testing.assert_allclose(hpatches.read_homography(seqs[0].homography(2)), np.eye(3), atol=1e-12)
    # the image as read is RGB: cv2 writes BGR, the reader flips it back
    bgr = cv2.imread(seqs[1].image(1))
    np.testing.assert_array_equal(hpatches.read_image(seqs[1].image(1)), bgr[:, :, ::-1])


def test_synthetic_homographies_are_exact(root):
    """Warping image 1 by the stored H_1_k reproduces image k (up to bilinear resampling and
    the mild brightness change), far better than the identity does."""
    seq = hpatches.list_sequences(root)[1]
    one = hpatches.read_image(seq.image(1)).astype(np.float64)
    for k in (2, 6):
        img = hpatches.read_image(seq.image(k)).astype(np.float64)
        hom = hpatches.read_homography(seq.homography(k))
        warped = cv2.warpPerspective(one, hom, (64, 48), flags=cv2.INTER_LINEAR, borderValue=-1)
        valid = (warped >= 0).all(2)
        valid[:4], valid[-4:], valid[:, :4], valid[:, -4:] = False, False, False, False
        scale = img[valid].mean() / warped[valid].mean()
        err = np.abs(warped[valid] * scale - img[valid]).mean()
        err_identity = np.abs(one[valid] * scale - img[valid]).mean()
        assert valid.mean() > 0.3 and err < 0.35 * err_identity, (k, err, err_identity)


def _copy(root, tmp_path):
    import shutil
    dst = tmp_path / "data"
    shutil.copytree(root, dst)
    return dst


def test_reader_errors_name_the_file_and_the_fix(root, tmp_path):
    data = _copy(root, tmp_path)
    seq = hpatches.HPatchesSequence("v_synth0", str(data / "v_synth0"))
    os.remove(data / "v_synth0" / "4.ppm")
    with pytest.raises(FileNotFoundError, match=r"v_synth0/4.ppm is missing.*1.ppm ... 6.ppm"):
        hpatches.load_sequence(seq)
    (data / "v_synth0" / "H_1_3").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(ValueError, match=r"H_1_3 is malformed: expected 3 lines of 3 numbers"):
        hpatches.read_homography(str(data / "v_synth0" / "H_1_3"))
    (data / "v_synth0" / "H_1_3").write_text("1 0 x\n0 1 0\n0 0 1\n")
    with pytest.raises(ValueError, match="H_1_3 is malformed"):
        hpatches.read_homography(str(data / "v_synth0" / "H_1_3"))
    (data / "v_synth0" / "H_1_3").write_text("0 0 0\n0 0 0\n0 0 0\n")
    with pytest.raises(ValueError, match="not a finite invertible"):
        hpatches.read_homography(str(data / "v_synth0" / "H_1_3"))
    os.remove(data / "v_synth0" / "H_1_5")
    with pytest.raises(FileNotFoundError, match="H_1_5 is missing"):
        hpatches.read_homography(str(data / "v_synth0" / "H_1_5"))
    (data / "v_synth0" / "2.ppm").write_bytes(b"P6 garbage")
    with pytest.raises(ValueError, match=r"2.ppm cannot be decoded"):
        hpatches.read_image(str(data / "v_synth0" / "2.ppm"))
    os.makedirs(data / "notes")
    with pytest.raises(ValueError, match="'notes' is not an HPatches sequence"):
        hpatches.list_sequences(str(data))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hpatches.list_sequences(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds no sequence folders"):
        hpatches.list_sequences(str(tmp_path / "empty"))


def _image_files(folder, good):
    """Files named .ppm that OpenCV decodes or not: whole and cut binary PNMs, headers with
    comments, 16-bit, grey and bitmap images, a PNG under a .ppm name, garbage."""
    rgb = cv2.imread(good)
    raw = open(good, "rb").read()
    header = raw[:len(raw) - rgb.size]  # OpenCV writes "P6\n<w> <h>\n255\n"
    files = {"good": raw, "cut": raw[:-1], "header only": header, "no data": header[:-1],
             "garbage": b"P6 garbage", "empty": b"", "P6": b"P6", "comment":
             b"P6 # made by hand\n64 48\n# maxval\n255\n" + raw[len(header):],
             # comments glued to a number and a comment ended by CR: OpenCV refuses the
             # first and reads the other two (review of the PNM check)
             "comment after number": b"P6\n64 48# c\n255\n" + raw[len(header):],
             "comment after maxval": b"P6\n64 48\n255# c\n" + raw[len(header):],
             "comment ended by CR": b"P6\n# c\r64 48\n255\n" + raw[len(header):],
             "maxval 0": b"P6\n64 48\n0\n" + raw[len(header):],
             "no space after maxval": b"P6\n64 48\n255" + raw[len(header):],
             "width 0": b"P6\n0 48\n255\n", "P5": b"P5\n8 4\n255\n" + bytes(range(32)),
             "P5 cut": b"P5\n8 4\n255\n" + bytes(range(31)),
             "P4": b"P4\n9 2\n" + bytes(4), "P4 cut": b"P4\n9 2\n" + bytes(3),
             "16 bit": b"P6\n2 2\n65535\n" + bytes(24),
             "16 bit cut": b"P6\n2 2\n65535\n" + bytes(12),
             "png": cv2.imencode(".png", rgb)[1].tobytes(),
             "png cut": cv2.imencode(".png", rgb)[1].tobytes()[:100], "text": b"hello\n"}
    for name, data in files.items():
        path = os.path.join(folder, f"{name}.ppm")
        with open(path, "wb") as f:
            f.write(data)
        yield name, path


def test_images_are_checked_to_decode_without_reading_their_pixels(root, tmp_path):
    """load_sequence checked images only to exist: an undecodable one was found when the
    extraction reached it. On each of these files, check_image refuses the file if and only if
    read_image refuses it, with the same error (headers with ``#`` or ``\\r`` are decoded)."""
    seen = set()
    for name, path in _image_files(str(tmp_path), os.path.join(root, "v_synth0", "1.ppm")):
        try:
            hpatches.read_image(path)
            decodes = True
        except ValueError as e:
            decodes, message = False, str(e)
        if decodes:
            hpatches.check_image(path)
        else:
            with pytest.raises(ValueError) as e:
                hpatches.check_image(path)
            assert str(e.value) == message and "cannot be decoded" in message
        seen.add(decodes)
    assert seen == {True, False}
    data = _copy(root, tmp_path)
    (data / "v_synth0" / "6.ppm").write_bytes(open(data / "v_synth0" / "6.ppm", "rb").read()[:-5])
    with pytest.raises(ValueError, match=r"v_synth0/6.ppm cannot be decoded"):
        hpatches.load_sequence(hpatches.HPatchesSequence("v_synth0", str(data / "v_synth0")),
                               homographies=False)


# ---------------------------------------------------------------------------- preprocessing
def test_small_images_are_cropped_to_multiples_of_8():
    rgb = np.random.default_rng(0).integers(0, 256, (53, 70, 3), dtype=np.uint8)
    p = prepare_image(rgb)
    assert p.rgb.shape == (48, 64, 3)
    np.testing.assert_array_equal(p.rgb, rgb[:48, :64])
    np.testing.assert_array_equal(p.to_original(np.array([[3, 40]])), [[3, 40]])
    x = caffe_tensor(p.rgb, dtype=None)
    assert x.shape == (1, 3, 48, 64)
    b, g, r = (rgb[:48, :64, c].astype(np.float64) for c in (2, 1, 0))
    for ch, (plane, mean) in enumerate(zip((b, g, r), CAFFE_MEAN_BGR)):  # BGR, mean off, no scale
        np.testing.assert_allclose(x[0, ch].numpy(), (plane - mean).astype(np.float32), rtol=0, atol=0)


def test_large_images_are_area_resized_and_keypoints_map_back():
    """A horizontal ramp I(x) = x through the 2800-rule (here with a smaller limit): after the
    area resize, pixel x' holds the mean of the original pixels it covers, whose centre is
    ``to_original(x')`` (paper); the reference maps ``x' * W / W'``."""
    W, H = 250, 90
    rgb = np.repeat(np.repeat(np.arange(W, dtype=np.uint8)[None, :, None], H, 0), 3, 2)
    p = prepare_image(rgb, max_sum_edges=200)
    factor = 200 / (W + H)
    assert p.scaled_size == (int(H * factor), int(W * factor))
    assert p.rgb.shape[:2] == (int(H * factor) // 8 * 8, int(W * factor) // 8 * 8)
    xs = np.arange(p.rgb.shape[1])
    centres = p.to_original(np.stack([xs, np.zeros_like(xs)], 1))[:, 0]
    assert np.abs(p.rgb[0, :, 0].astype(np.float64) - centres).max() <= 0.5 + 1e-9
    ref = prepare_image(rgb, max_sum_edges=200, semantics="reference")
    assert ref.rgb.shape[:2] == ref.scaled_size == p.rgb.shape[:2]
    np.testing.assert_allclose(ref.to_original(np.array([[8, 4]])),
                               [[8 * W / ref.rgb.shape[1], 4 * H / ref.rgb.shape[0]]])


def test_tiny_images_are_refused():
    with pytest.raises(ValueError, match="too small"):
        prepare_image(np.zeros((7, 40, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------- grey and SIFT
def test_grey_modes():
    rgb = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 0, 255)      # pure blue
    rgb[0, 1] = (255, 255, 255)
    rgb[0, 2] = (0, 0, 0)
    lum = sift.gray_image(rgb, "luminance")
    np.testing.assert_array_equal(lum, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    ref = sift.gray_image(rgb, "reference")
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    slipped = 0.299 * b + 0.587 * g + 0.114 * r   # weights on the BGR channels
    assert np.abs(ref - np.floor(slipped + 1e-6)).max() <= 1
    assert (ref == np.floor(slipped + 1e-6)).mean() > 0.9
    assert ref[0, 0] == 76 and lum[0, 0] == 29       # 0.299 * 255 vs 0.114 * 255
    assert ref[0, 2] == 0


class _KP:
    def __init__(self, x, y, response):
        self.pt, self.response = (x, y), response


def test_sift_sorts_by_response_and_deduplicates_rounded_positions(monkeypatch):
    fake = [_KP(10.4, 5.2, 0.5), _KP(10.0, 5.0, 0.9), _KP(3.5, 2.5, 0.7),   # (10, 5) twice
            _KP(4.5, 2.5, 0.7), _KP(20.2, 7.7, 0.1), _KP(9.6, 4.6, 0.8),    # halves to even
            _KP(30.0, 1.0, 0.6), _KP(29.5, 1.4, 0.6)]

    class Detector:
        def detect(self, img, mask):
            return list(fake)

    monkeypatch.setattr(cv2, "SIFT_create", lambda *a, **k: Detector())
    img = np.zeros((16, 40, 3), dtype=np.uint8)
    xy, resp = sift.detect(img, num_points=512)
    # strongest first; (9.6, 4.6) rounds to (10, 5) as the stronger (10.0, 5.0) did: dropped;
    # (3.5, 2.5) -> (4, 2) and (4.5, 2.5) -> (4, 2): the first of the tie kept;
    # (29.5, 1.4) -> (30, 1) duplicates (30, 1)
    np.testing.assert_array_equal(xy, [[10, 5], [4, 2], [30, 1], [20, 8]])
    np.testing.assert_allclose(resp, [0.9, 0.7, 0.6, 0.1])
    xy2, _ = sift.detect(img, num_points=2)
    np.testing.assert_array_equal(xy2, xy[:2])


def test_sift_on_a_real_image_against_a_brute_force_selection():
    from tests.support.hpatches import frame_scenes
    from cad_apps.keypoints.hpatches import synthetic_scene

    scenes = frame_scenes(1, (192, 256)) or [synthetic_scene((192, 256), 2)]
    rgb = scenes[0]
    xy, resp = sift.detect(rgb, num_points=60)
    kps = cv2.SIFT_create().detect(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), None)
    assert len(kps) > 60
    # brute force: repeatedly take the strongest remaining keypoint whose rounded position is new
    remaining = list(range(len(kps)))
    chosen, taken = [], set()
    while remaining and len(chosen) < 60:
        best = max(remaining, key=lambda i: (kps[i].response, -i))
        remaining.remove(best)
        pos = (round(kps[best].pt[0]), round(kps[best].pt[1]))
        if pos not in taken:
            taken.add(pos)
            chosen.append(pos)
    np.testing.assert_array_equal(xy, chosen)
    assert len({tuple(p) for p in xy}) == len(xy) and (np.diff(resp) <= 0).all()
