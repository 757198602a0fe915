"""Cityscapes reading, label mapping and the confusion-matrix mIoU, on a synthetic folder."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cad_apps.data import (CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, CityscapesSegmentation,
                             ConfusionMatrix, collate, colorize, label_ids_to_train_ids,
                             make_synthetic_cityscapes, normalize, read_image)

# the Cityscapes benchmark's table (cityscapesScripts labels.py), written out here: every
# labelId 0..33 -> trainId (255: not evaluated), and the 19 evaluated classes in trainId order
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
             24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
KNOWN = {i: TRAIN_IDS.get(i, 255) for i in range(34)}
NAMES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
         "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
         "train", "motorcycle", "bicycle")


def test_label_mapping_matches_cityscapes_table():
    ids = np.array(list(KNOWN), dtype=np.uint8)
    assert label_ids_to_train_ids(ids).tolist() == list(KNOWN.values())
    assert label_ids_to_train_ids(np.array([34, 250, 255], np.uint8)).tolist() == [255] * 3
    assert CLASS_NAMES == NAMES and len(CLASS_NAMES) == NUM_CLASSES == 19


def test_label_mapping_rejects_floats_and_out_of_range():
    with pytest.raises(TypeError, match="integers"):
        label_ids_to_train_ids(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="0..255"):
        label_ids_to_train_ids(np.array([300]))


def test_normalize_uses_imagenet_statistics():
    img = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(img)
    expected = [(1 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert torch.allclose(out[:, 0, 0], torch.tensor(expected), rtol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        normalize(img.float())
    # denormalize inverts it (the edge detector and the plots read its output)
    from cad_apps.data import denormalize
    every = torch.arange(256, dtype=torch.uint8).repeat(3, 1)[:, None, :]  # [3, 1, 256]
    torch.testing.assert_close(denormalize(normalize(every)), every.float() / 255,
                               rtol=0, atol=1e-6)


def test_synthetic_folder_reads_through_torchvision_layout(tmp_path):
    ids = make_synthetic_cityscapes(tmp_path, num_images=4, size=(33, 65), seed=1)
    assert os.path.isfile(tmp_path / "leftImg8bit" / "val" / "frankfurt"
                          / "frankfurt_000000_000019_leftImg8bit.png")
    ds = CityscapesSegmentation(tmp_path, "val")
    assert ds.ids == ids == sorted(ids) and len(ds) == 4
    item = ds[1]
    assert item["image"].shape == (3, 33, 65) and item["image"].dtype == torch.float32
    assert item["target"].shape == (33, 65) and item["target"].dtype == torch.int64
    # the target is exactly the labelIds on disk pushed through the table
    raw = np.asarray(Image.open(ds.targets[1]))
    lut = np.full(256, 255)
    for k, v in KNOWN.items():
        lut[k] = v
    present = np.unique(raw)
    assert set(present) <= set(KNOWN), present
    assert np.array_equal(item["target"].numpy(), lut[raw])
    assert (item["target"] == IGNORE_INDEX).any() and (item["target"] == 13).any()
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 33, 65) and batch["id"] == ids[:2]
    assert len(CityscapesSegmentation(tmp_path, "val", limit=2)) == 2


def test_missing_dataset_and_mixed_sizes_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesSegmentation(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CityscapesSegmentation(tmp_path / "nope", "val")
    a = {"image": torch.zeros(3, 4, 4), "target": torch.zeros(4, 4, dtype=torch.long), "id": "a", "index": 0}
    b = {"image": torch.zeros(3, 4, 6), "target": torch.zeros(4, 6, dtype=torch.long), "id": "b", "index": 1}
    with pytest.raises(ValueError, match="batch-size 1"):
        collate([a, b])


def test_miou_perfect_prediction_is_one():
    target = torch.tensor([[0, 0, 1], [2, 255, 1]])
    cm = ConfusionMatrix()
    cm.update(target.clone(), target)
    assert cm.miou() == 1.0
    assert cm.pixel_accuracy() == 1.0
    iou = cm.iou()
    assert iou[0] == iou[1] == iou[2] == 1.0 and np.isnan(iou[3:]).all()
    assert cm.counts.sum() == 5  # the ignore pixel is not counted


def test_miou_known_confusion_exact():
    # 4 pixels of class 0, 2 of class 1; one class-0 pixel predicted as 1, one ignored pixel
    # predicted as 2 (ignored, so class 2 never appears), class 5 predicted but absent.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 255, 3])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 5])
    cm = ConfusionMatrix()
    own = cm.update(pred, target)
    # class 0: TP 3, FN 1, FP 0 -> 3/4; class 1: TP 2, FP 1 -> 2/3; class 3: TP 0, FN 1 -> 0;
    # class 5: FP 1 -> 0; class 2: no union -> NaN (ignored pixel does not count)
    iou = cm.iou()
    assert iou[0] == 3 / 4 and iou[1] == 2 / 3 and iou[3] == 0.0 and iou[5] == 0.0
    assert np.isnan(iou[2])
    assert cm.miou() == (3 / 4 + 2 / 3 + 0 + 0) / 4
    assert cm.pixel_accuracy() == 5 / 7
    assert own[0, 1] == 1 and own[3, 5] == 1 and own.sum() == 7
    # the sparse JSON form round-trips and matrices add up
    again = ConfusionMatrix.from_triples(cm.to_triples())
    assert np.array_equal(again.counts, cm.counts)
    again.add(own)
    assert again.counts.sum() == 14 and again.miou() == cm.miou()


def test_confusion_rejects_bad_inputs():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="trainIds"):
        cm.update(torch.tensor([0]), torch.tensor([33]))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.tensor([0.5]), torch.tensor([0]))
    with pytest.raises(ValueError, match="differ"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))


def test_colorize_uses_the_cityscapes_palette():
    rgb = colorize(torch.tensor([[0, 13, 255]]))
    assert rgb.tolist() == [[[128, 64, 128], [0, 0, 142], [0, 0, 0]]]


def test_stray_files_and_wide_images(tmp_path):
    """Files that are not frames are left out (a stray notes file in a city folder was taken
    for a frame, a stray file in the split folder crashed); 16-bit images are refused, not
    clipped to 8 bits."""
    make_synthetic_cityscapes(tmp_path, num_images=2, size=(32, 48), seed=1)
    split = tmp_path / "leftImg8bit" / "val"
    city = next(p for p in split.iterdir() if p.is_dir())
    (city / "notes.txt").write_text("not a frame")
    ds = CityscapesSegmentation(str(tmp_path))
    assert len(ds) == 2 and all(i.endswith("_leftImg8bit.png") for i in ds.images)
    (split / "README").write_text("not a city")
    with pytest.raises(FileNotFoundError, match="no Cityscapes 'val' split"):
        CityscapesSegmentation(str(tmp_path))
    wide = tmp_path / "wide.png"
    Image.fromarray(np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40).save(wide)
    with pytest.raises(ValueError, match="16-bit or float.*8-bit RGB"):
        read_image(str(wide), "RGB")


def test_confusion_counts_are_checked_when_merged():
    cm = ConfusionMatrix()
    with pytest.raises(ValueError, match="counts of shape"):
        cm.add(np.ones(NUM_CLASSES, dtype=np.int64))
    with pytest.raises(ValueError, match="classes must be in 0..18"):
        ConfusionMatrix.from_triples([[-1, 0, 10]])
    assert ConfusionMatrix.from_triples([[1, 2, 3]]).counts[1, 2] == 3
