"""Dataset indexes and reading: layouts, pairing by name, resizing, and the errors for broken trees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adbench.datasets import AnomalyDataset, list_datasets, open_family
from adbench.datasets.mtd import index_mtd, published_train_names
from adbench.errors import ConfigError, DatasetError
from conftest import make_btad, make_mvtec, write_image, write_mask


def test_registry_lists_and_rejects_unknown():
    assert {"mvtec", "btad", "mtd", "folder", "synthetic"} <= set(list_datasets())
    with pytest.raises(ConfigError, match="valid: btad, folder, mtd, mvtec, synthetic"):
        open_family("nope")


def test_mvtec_index_pairs_masks_by_stem(tmp_path):
    make_mvtec(tmp_path / "mvtec", categories=("bottle", "grid"))
    fam = open_family("mvtec", data_root=tmp_path)
    test = AnomalyDataset(fam, "bottle", "test", 24)
    idx = test.index
    assert list(idx.label) == [1, 1, 1, 0, 0, 0]  # crack sorts before good
    for img, mask in zip(idx.image_path[idx.label == 1], idx.mask_path[idx.label == 1], strict=True):
        assert mask.endswith(img.rsplit("/", 1)[1].replace(".png", "_mask.png"))
    assert idx.mask_path[idx.label == 0].isna().all()
    s = test[0]
    assert s.image.shape == (3, 24, 24) and s.image.dtype == torch.uint8
    assert s.mask.dtype == torch.bool and s.mask.any() and s.label == 1 and s.defect == "crack"
    good = test[5]
    assert not good.mask.any() and good.label == 0


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    make_mvtec(tmp_path / "mvtec", categories=("grid",))
    write_image(tmp_path / "mvtec" / "grid" / "train" / "good" / "000.png", mode="L", value=77)
    fam = open_family("mvtec", data_root=tmp_path)
    s = AnomalyDataset(fam, "grid", "train", 16)[0]
    assert s.image.shape == (3, 16, 16) and (s.image == 77).all()


def test_mask_resized_nearest_then_binarised(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    write_mask(tmp_path / "mvtec/bottle/ground_truth/crack/000_mask.png", box=(0, 0, 16, 32), value=200)
    s = AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "test", 8)[0]
    expected = np.zeros((8, 8), bool)
    expected[:4] = True
    assert (s.mask.numpy() == expected).all()


def test_jpeg_masks_are_binarised_past_their_ringing(tmp_path):
    """JPEG leaves small non-zero values around a 0/255 mask's edges; > 0 would count them as defect pixels."""
    from PIL import Image

    make_mvtec(tmp_path / "mvtec")
    arr = np.zeros((32, 32), np.uint8)  # the images' size
    arr[10:18, 4:20] = 255
    path = tmp_path / "mvtec/bottle/ground_truth/crack/000_mask.png"
    path.unlink()
    Image.fromarray(arr).save(path.with_suffix(".jpg"), quality=90)
    assert (np.array(Image.open(path.with_suffix(".jpg"))) > 0).sum() > arr.astype(bool).sum()  # it rings
    ds = AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "test", 32)
    (s,) = [ds[i] for i in range(len(ds)) if ds[i].path.endswith("crack/000.png")]
    assert (s.mask.numpy() == arr.astype(bool)).all()
    assert ds.mask_binarisation() == "> 0 after resizing (JPEG masks > 127)"  # what result.json records


def test_missing_mask_names_the_image(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    (tmp_path / "mvtec/bottle/ground_truth/crack/001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"mask of .*crack/001\.png"):
        AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "test", 16)


def test_orphan_mask_is_an_error(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    write_mask(tmp_path / "mvtec/bottle/ground_truth/crack/099_mask.png")
    with pytest.raises(DatasetError, match="099_mask.png"):
        AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "test", 16)


def test_mask_of_another_size_is_an_error(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    write_mask(tmp_path / "mvtec/bottle/ground_truth/crack/000_mask.png", size=20)
    ds = AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "test", 16)
    with pytest.raises(DatasetError, match="000_mask.png is 20x20 but its image is 32x32"):
        ds[0]


def test_corrupt_image_is_named(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    bad = tmp_path / "mvtec/bottle/train/good/002.png"
    bad.write_bytes(b"not a png at all")
    ds = AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "train", 16)
    with pytest.raises(DatasetError, match=r"cannot read image .*002\.png"):
        list(ds.batches(4))


@pytest.mark.parametrize("array", [np.full((16, 16), 300, np.uint16), np.full((16, 16), 0.5, np.float32)])
def test_wide_images_are_refused_not_clipped(tmp_path, array):
    """PIL would clip a 16-bit or float image to 0-255 on its way to RGB: a silently wrong image. It is refused."""
    from PIL import Image

    make_mvtec(tmp_path / "mvtec")
    Image.fromarray(array).save(tmp_path / "mvtec/bottle/train/good/001.tiff")
    (tmp_path / "mvtec/bottle/train/good/001.png").unlink()
    ds = AnomalyDataset(open_family("mvtec", data_root=tmp_path), "bottle", "train", 16)
    with pytest.raises(DatasetError, match=r"image .*001\.tiff is (16-bit|floating point) .*convert it to 8 bits"):
        list(ds.batches(4))


def test_missing_root_says_how_to_download(tmp_path):
    with pytest.raises(DatasetError, match="adbench download mvtec"):
        open_family("mvtec", data_root=tmp_path)


def test_unknown_category_and_empty_split(tmp_path):
    make_mvtec(tmp_path / "mvtec")
    fam = open_family("mvtec", data_root=tmp_path)
    with pytest.raises(DatasetError, match="valid: bottle, cable"):
        AnomalyDataset(fam, "bottel", "train", 16)
    for p in (tmp_path / "mvtec/bottle/train/good").iterdir():
        p.unlink()
    with pytest.raises(DatasetError, match="no train images"):
        AnomalyDataset(fam, "bottle", "train", 16)


def test_folder_dataset_finds_categories_and_needs_root(tmp_path):
    make_mvtec(tmp_path / "mine", categories=("widget", "gadget"))
    fam = open_family("folder", root=tmp_path / "mine")
    assert fam.categories() == ["gadget", "widget"]
    assert len(AnomalyDataset(fam, "widget", "train", 16)) == 6
    with pytest.raises(DatasetError, match="needs --root"):
        open_family("folder")


@pytest.mark.parametrize("product,mask_ext", [("01", ".png"), ("03", ".bmp")])
def test_btad_masks_by_stem_png_or_bmp(tmp_path, product, mask_ext):
    make_btad(tmp_path / "btad", product)
    fam = open_family("btad", data_root=tmp_path)
    test = AnomalyDataset(fam, product, "test", 16)
    assert (test.labels == [0] * 4 + [1] * 4).all()
    assert test.index.mask_path.dropna().str.endswith(mask_ext).all()
    assert test[7].mask.any()
    (tmp_path / f"btad/{product}/ground_truth/ko/0002{mask_ext}").unlink()
    with pytest.raises(DatasetError, match=r"mask of .*ko/0002\.bmp"):
        AnomalyDataset(fam, product, "test", 16)


def test_mtd_tree_split_and_soft_masks(tmp_path):
    root = tmp_path / "mtd"
    names = published_train_names()
    assert len(names) == 761 and len(set(names)) == 761
    for i, n in enumerate(names[:3]):
        write_image(root / "MT_Free/Imgs" / n, seed=i, mode="L")
    write_image(root / "MT_Free/Imgs/extra_free.jpg", mode="L")
    for d in ("Blowhole", "Break", "Crack", "Fray", "Uneven"):
        write_image(root / f"MT_{d}/Imgs/x_{d}.jpg", mode="L")
        write_mask(root / f"MT_{d}/Imgs/x_{d}.png", value=100 if d == "Fray" else 255)
    train = index_mtd(root, "train", names[:3])
    assert len(train) == 3 and (train.label == 0).all()
    test = index_mtd(root, "test", names[:3])
    assert len(test) == 6 and test.label.sum() == 5
    fam = open_family("mtd", data_root=tmp_path)
    fam.index = lambda category, split: index_mtd(root, split, names[:3])
    ds = AnomalyDataset(fam, "mtd", "test", 32)
    by_defect = {ds[i].defect: ds[i] for i in range(len(ds))}
    assert by_defect["Blowhole"].mask.sum() == 64
    assert not by_defect["Fray"].mask.any() and by_defect["Fray"].label == 1  # soft value 100 <= 127
    with pytest.raises(DatasetError, match="training files of the split are not in"):
        index_mtd(root, "train")
    (root / "MT_Crack/Imgs/x_Crack.png").unlink()
    with pytest.raises(DatasetError, match="mask of .*x_Crack.jpg is missing"):
        index_mtd(root, "test", names[:3])


def test_real_mtd_published_split(real_data_root):
    fam = open_family("mtd", data_root=real_data_root)
    train = AnomalyDataset(fam, "mtd", "train", 64)
    test = AnomalyDataset(fam, "mtd", "test", 64)
    assert len(train) == 761 and len(test) == 583 and test.labels.sum() == 392
    assert set(train.index.image_path).isdisjoint(test.index.image_path)
    assert test.index.defect.value_counts().to_dict() == {
        "good": 191, "Blowhole": 115, "Uneven": 103, "Break": 85, "Crack": 57, "Fray": 32}


def test_stems_with_glob_characters_pair(tmp_path):
    make_mvtec(tmp_path / "mine", categories=("w",), n_bad=0)
    write_image(tmp_path / "mine/w/test/crack/a[1].png")
    write_mask(tmp_path / "mine/w/ground_truth/crack/a[1]_mask.png")
    ds = AnomalyDataset(open_family("folder", root=tmp_path / "mine"), "w", "test", 16)
    assert ds.index.mask_path.dropna().str.endswith("a[1]_mask.png").all()
