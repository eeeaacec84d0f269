"""Label encodings, LabelSource, FolderPairs / GigasegDataset (dataset.yaml) and load_dataset."""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import tifffile
import yaml
from PIL import Image

from gigaseg.data import base as datasets
from gigaseg.data.base import Sample, SegmentationDataset, read_pair
from gigaseg.data.folder import FolderPairs, GigasegDataset
from gigaseg.data.labels import (
    BinaryEncoding,
    IndexEncoding,
    LabelEncoding,
    LabelSource,
    LookupEncoding,
    PaletteEncoding,
)
from gigaseg.data.loader import load_dataset
from gigaseg.errors import DatasetError
from gigaseg.geometry import Window
from gigaseg.io.sources import open_image

H, W = 48, 64
CLASSES = ["background", "road", "water"]
PALETTE = [[0, 0, 0], [255, 255, 255], [0, 0, 255]]


def ids_mask(seed: int) -> np.ndarray:
    """Class ids in 8x8 blocks (so 2x downsampling keeps every block pure)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, len(CLASSES), size=(H // 8, W // 8), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8), dtype=np.uint8))


def image_for(mask: np.ndarray) -> np.ndarray:
    """An RGB image whose red channel is 50 * class id (so labels can be checked against it)."""
    image = np.zeros(mask.shape + (3,), dtype=np.uint8)
    image[..., 0] = mask * 50
    image[..., 1] = 100
    return image


def write_gigaseg(root, stems=("scene_000", "scene_001", "scene_002"), splits=None, **overrides):
    """gigaseg's layout: images/*.tif, masks/*.png (ids), dataset.yaml."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, stem in enumerate(stems):
        mask = ids_mask(i)
        tifffile.imwrite(root / "images" / f"{stem}.tif", image_for(mask), photometric="rgb")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    description = {
        "name": "tiny",
        "task": "segmentation",
        "images": "images",
        "masks": "masks",
        "mask_encoding": "index",
        "classes": CLASSES,
        "palette": PALETTE,
        "ignore_index": 255,
        "exclude_from_miou": [],
    }
    if splits is not None:
        description["splits"] = splits
    description.update(overrides)
    description = {k: v for k, v in description.items() if v is not None}
    (root / "dataset.yaml").write_text(yaml.safe_dump(description))
    return root


SPLITS = {"train": ["scene_000", "scene_001"], "val": ["scene_002"]}


# --- encodings -------------------------------------------------------------------------


def test_index_encoding_passes_ids_and_ignore():
    enc = IndexEncoding(3, ignore_index=255)
    raw = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    assert enc.encode(raw).tolist() == [[0, 1], [2, 255]]
    assert enc.encode(raw[:, :, None]).dtype == np.uint8


def test_index_encoding_rejects_out_of_range_id_naming_file_id_and_window():
    enc = IndexEncoding(3)
    raw = np.zeros((4, 5), dtype=np.uint16)
    raw[2, 3] = 7
    window = Window(10, 20, 4, 5)
    with pytest.raises(DatasetError, match=r"m\.png: class id 7 is out of range at row 12, col 23 .*top=10, left=20"):
        enc.encode(raw, path="m.png", window=window)


def test_palette_encoding_maps_colours_and_ignore_colour():
    enc = PaletteEncoding(PALETTE, ignore_color=(255, 0, 0), ignore_index=255)
    raw = np.array([[[0, 0, 0], [255, 255, 255], [0, 0, 255], [255, 0, 0]]], dtype=np.uint8)
    assert enc.encode(raw).tolist() == [[0, 1, 2, 255]]


def test_palette_encoding_rejects_unknown_colour_with_position():
    enc = PaletteEncoding(PALETTE)
    raw = np.zeros((3, 4, 3), dtype=np.uint8)
    raw[1, 2] = (10, 20, 30)
    with pytest.raises(DatasetError, match=r"x\.png: unknown mask colour \(10, 20, 30\) at row 1, col 2"):
        enc.encode(raw, path="x.png")


def test_palette_encoding_threshold_binarises_channels():
    enc = PaletteEncoding(PALETTE, threshold=128)
    raw = np.array([[[250, 251, 129], [127, 3, 0], [2, 1, 200]]], dtype=np.uint8)
    assert enc.encode(raw).tolist() == [[1, 0, 2]]


def test_palette_encoding_rejects_conflicting_ignore_colour():
    with pytest.raises(ValueError, match="also the colour of class 2"):
        PaletteEncoding(PALETTE, ignore_color=(0, 0, 255))


def test_lookup_and_binary_encodings():
    lut = np.full(256, 255, dtype=np.uint8)
    lut[[5, 9]] = [0, 1]
    enc = LookupEncoding(lut)
    assert enc.num_classes == 2
    assert enc.encode(np.array([[5, 9, 0]], dtype=np.uint8)).tolist() == [[0, 1, 255]]
    assert BinaryEncoding().encode(np.array([[0, 255, 127, 128]], dtype=np.uint8)).tolist() == [[0, 1, 0, 1]]


def test_binary_encoding_rejects_a_threshold_outside_the_masks_range():
    # uint8 masks hold 0..255: a threshold of 256 or more would make every pixel background
    with pytest.raises(DatasetError, match=r"m\.png: binary threshold 256 is outside the range of this uint8 mask"):
        BinaryEncoding(threshold=256).encode(np.full((2, 2), 255, np.uint8), path="m.png")
    with pytest.raises(DatasetError, match=r"threshold 2 is outside .* bool mask \(values 0\.\.1\).* in 1\.\.1"):
        BinaryEncoding(threshold=2).encode(np.ones((2, 2), bool))
    wide = np.array([[0, 255, 256, 1000]], dtype=np.uint16)
    assert BinaryEncoding(threshold=256).encode(wide).tolist() == [[0, 0, 1, 1]]
    for bad in (0, -1, True, 127.5):
        with pytest.raises(ValueError, match=rf"threshold must be an integer >= 1, got {bad!r}"):
            BinaryEncoding(threshold=bad)


@pytest.mark.parametrize(
    "encoding",
    [
        IndexEncoding(4, ignore_index=250),
        PaletteEncoding(PALETTE, ignore_color=[9, 9, 9], threshold=None),
        PaletteEncoding(PALETTE, threshold=128),
        LookupEncoding(np.arange(256) % 3, ignore_index=255),
        BinaryEncoding(threshold=100),
    ],
    ids=lambda e: e.kind,
)
def test_encodings_round_trip_through_plain_dicts(encoding):
    data = encoding.to_dict()
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain types only
    again = LabelEncoding.from_dict(data)
    assert type(again) is type(encoding) and again == encoding
    assert pickle.loads(pickle.dumps(encoding)) == encoding


def test_from_dict_rejects_unknown_type():
    with pytest.raises(ValueError, match="unknown label encoding type 'nope'"):
        LabelEncoding.from_dict({"type": "nope"})


# --- LabelSource --------------------------------------------------------------------------


def test_label_source_reads_ids_and_resamples_with_nearest_only(tmp_path):
    stripes = np.zeros((H, W), dtype=np.uint8)
    stripes[:, 1::2] = 2  # alternating 0 / 2 columns: any averaging would give 1
    Image.fromarray(stripes).save(tmp_path / "m.png")
    source = LabelSource(open_image(tmp_path / "m.png"), IndexEncoding(3))
    assert source.shape == (H, W, 1) and source.dtype == np.uint8
    assert np.array_equal(source.read()[..., 0], stripes)
    window = Window(4, 6, 20, 30)
    assert np.array_equal(source.read(window)[..., 0], stripes[window.slices])
    for resample in ("area", "bilinear", "nearest"):
        small = source.read(window, out_size=(7, 9), resample=resample)
        assert small.shape == (7, 9, 1)
        assert set(np.unique(small)) <= {0, 2}
    thumb = source.thumbnail(16, resample="area")
    assert thumb.shape == (12, 16, 1) and set(np.unique(thumb)) <= {0, 2}
    source.close()


def test_label_source_expands_paletted_png_for_rgb_encoding(tmp_path):
    indices = np.zeros((H, W), dtype=np.uint8)
    indices[:, 32:] = 1
    picture = Image.fromarray(indices, mode="P")
    picture.putpalette([0, 0, 255, 255, 255, 255] + [0, 0, 0] * 254)  # index 0 = blue, 1 = white
    picture.save(tmp_path / "m.png")
    with LabelSource(open_image(tmp_path / "m.png"), PaletteEncoding(PALETTE)) as source:
        ids = source.read()[..., 0]
    assert ids[0, 0] == 2 and ids[0, 40] == 1


def test_label_source_rejects_rgb_mask_for_index_encoding(tmp_path):
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with (
        open_image(tmp_path / "rgb.png") as raw,
        pytest.raises(DatasetError, match=r"rgb\.png: mask has 3 channels .*index encoding"),
    ):
        LabelSource(raw, IndexEncoding(3))


# --- gigaseg's dataset.yaml layout ------------------------------------------------------------


def test_gigaseg_dataset_reads_yaml_splits_and_labels(tmp_path):
    root = write_gigaseg(tmp_path / "ds", splits=SPLITS, exclude_from_miou=[0])
    train = GigasegDataset(root, "train")
    assert isinstance(train, SegmentationDataset)
    assert train.classes == CLASSES and train.num_classes == 3
    assert train.palette.dtype == np.uint8 and train.palette.tolist() == PALETTE
    assert train.ignore_index == 255 and train.exclude_from_miou == (0,)
    assert train.names == ["scene_000", "scene_001"] and len(train) == 2
    assert train.labelled and train.root == root
    val = GigasegDataset(root / "dataset.yaml", "val")
    assert val.names == ["scene_002"]
    assert len(GigasegDataset(root, "all")) == 3

    sample = train[1]
    assert isinstance(sample, Sample) and sample.name == "scene_001"
    with sample:
        assert sample.image.shape == (H, W, 3) and sample.mask.shape == (H, W, 1)
        assert np.array_equal(sample.mask.read()[..., 0], ids_mask(1))
    train.validate(full=True)


def test_yes_and_no_are_class_names_not_booleans(tmp_path):
    root = write_gigaseg(tmp_path / "ds", palette=None)
    text = (root / "dataset.yaml").read_text().replace("- background\n- road\n- water\n", "- no\n- yes\n- on\n")
    assert "- yes" in text  # unquoted, as a person writes it: YAML 1.1 would read True
    (root / "dataset.yaml").write_text(text)
    assert GigasegDataset(root, "train").classes == ["no", "yes", "on"]


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    dataset = GigasegDataset(write_gigaseg(tmp_path / "ds"), "train")
    again = pickle.loads(pickle.dumps(dataset))
    assert again.names == dataset.names and again.encoding == dataset.encoding
    with again[0] as sample:
        assert sample.mask.read().shape == (H, W, 1)


def test_read_pair_aligns_image_and_labels(tmp_path):
    dataset = GigasegDataset(write_gigaseg(tmp_path / "ds"), "train")
    with dataset[0] as sample:
        image, labels = read_pair(sample, Window(8, 16, 32, 48), out_size=(16, 24))
    assert image.shape == (16, 24, 3) and labels.shape == (16, 24) and labels.dtype == np.uint8
    assert np.array_equal(image[..., 0] // 50, labels)
    assert np.array_equal(labels, ids_mask(0)[8:40:2, 16:64:2])
    with dataset[0] as sample:
        image, labels = read_pair(sample)
    assert image.shape == (H, W, 3) and np.array_equal(labels, ids_mask(0))


def test_rgb_yaml_with_ignore_colour(tmp_path):
    root = tmp_path / "rgb"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((H, W, 3), dtype=np.uint8)
    mask[:, 20:40] = (255, 255, 255)
    mask[:, 40:] = (0, 0, 255)
    mask[0, 0] = (255, 0, 255)
    Image.fromarray(np.full((H, W, 3), 7, np.uint8)).save(root / "images" / "a.jpg")
    Image.fromarray(mask).save(root / "masks" / "a.png")
    (root / "dataset.yaml").write_text(
        yaml.safe_dump(
            {
                "classes": CLASSES,
                "palette": PALETTE,
                "mask_encoding": "rgb",
                "ignore_color": [255, 0, 255],
                "ignore_index": 200,
            }
        )
    )
    dataset = load_dataset(root)
    assert isinstance(dataset, GigasegDataset) and dataset.ignore_index == 200
    with dataset[0] as sample:
        ids = sample.mask.read()[..., 0]
    assert ids[0, 0] == 200 and ids[1, 0] == 0 and ids[5, 25] == 1 and ids[5, 50] == 2


def test_folder_pairs_with_explicit_classes_and_without_yaml(tmp_path):
    root = write_gigaseg(tmp_path / "ds")
    (root / "dataset.yaml").unlink()
    dataset = FolderPairs(root, classes=["a", "b", "c", "d"])
    assert dataset.classes == ["a", "b", "c", "d"] and dataset.encoding == IndexEncoding(4)
    assert dataset.palette.shape == (4, 3)
    with pytest.warns(UserWarning, match="inferred 3 classes"):
        inferred = load_dataset(root)
    assert isinstance(inferred, FolderPairs) and inferred.classes == ["class_0", "class_1", "class_2"]
    with pytest.raises(DatasetError, match="no split 'val': no splits are defined"):
        FolderPairs(root, "val", classes=CLASSES)


def test_inferred_classes_skip_the_shared_ignore_index(tmp_path, monkeypatch):
    # the value skipped while inferring is the IGNORE_INDEX constant, the same the encoding keeps
    from gigaseg.data import folder

    monkeypatch.setattr(folder, "IGNORE_INDEX", 250, raising=False)
    root = write_gigaseg(tmp_path / "ds", stems=("scene_000",))
    (root / "dataset.yaml").unlink()
    mask = ids_mask(0)
    mask[:8, :8] = 250
    Image.fromarray(mask).save(root / "masks" / "scene_000.png")
    with pytest.warns(UserWarning, match="inferred 3 classes"):
        dataset = FolderPairs(root)
    assert dataset.encoding == IndexEncoding(3, ignore_index=250)


def test_images_and_masks_folders_win_over_deepglobe_names(tmp_path):
    root = tmp_path / "own"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(image_for(ids_mask(0))).save(root / "images" / "tile_sat.png")
    Image.fromarray(ids_mask(0)).save(root / "masks" / "tile_sat.png")
    dataset = load_dataset(root, classes=CLASSES)
    assert type(dataset) is FolderPairs and dataset.names == ["tile_sat"]


def test_folder_pairs_reads_16bit_tiff_masks(tmp_path):
    root = tmp_path / "tif"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = ids_mask(3).astype(np.uint16)
    tifffile.imwrite(root / "images" / "s.tif", image_for(ids_mask(3)), photometric="rgb")
    tifffile.imwrite(root / "masks" / "s.tif", mask)
    with FolderPairs(root, classes=CLASSES)[0] as sample:
        assert np.array_equal(sample.mask.read()[..., 0], mask)


# --- errors --------------------------------------------------------------------------------------


def test_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "nowhere"))):
        load_dataset(tmp_path / "nowhere")
    root = write_gigaseg(tmp_path / "ds")
    for path in (root / "masks").iterdir():
        path.unlink()
    (root / "masks").rmdir()
    with pytest.raises(DatasetError, match=r"masks: masks folder 'masks' does not exist"):
        GigasegDataset(root)


def test_empty_dataset(tmp_path):
    root = write_gigaseg(tmp_path / "ds", stems=(), splits={"train": [], "val": []})
    with pytest.raises(DatasetError, match=r"images: no images"):
        GigasegDataset(root)
    root = write_gigaseg(tmp_path / "ds2", splits={"train": ["scene_000", "scene_001", "scene_002"], "val": []})
    with pytest.raises(DatasetError, match=r"dataset\.yaml: no images for split 'val'"):
        GigasegDataset(root, "val")


def test_images_without_masks_are_listed(tmp_path):
    stems = [f"s{i}" for i in range(8)]
    root = write_gigaseg(tmp_path / "ds", stems=stems)
    for stem in stems[1:]:
        (root / "masks" / f"{stem}.png").unlink()
    with pytest.raises(
        DatasetError,
        match=r"masks: 7 image\(s\) have no mask here: s1\.tif, s2\.tif, s3\.tif, "
        r"s4\.tif, s5\.tif and 2 more",
    ):
        GigasegDataset(root)


def test_mask_without_image(tmp_path):
    root = write_gigaseg(tmp_path / "ds")
    Image.fromarray(ids_mask(0)).save(root / "masks" / "stray.png")
    with pytest.raises(DatasetError, match=r"images: 1 mask\(s\) have no image here: stray\.png"):
        GigasegDataset(root)


def test_size_mismatch_names_both_files(tmp_path):
    root = write_gigaseg(tmp_path / "ds")
    Image.fromarray(ids_mask(1)[:40]).save(root / "masks" / "scene_001.png")
    with pytest.raises(
        DatasetError, match=r"scene_001\.png: mask is 40x64 \(HxW\) but its image .*scene_001\.tif is 48x64"
    ):
        GigasegDataset(root)
    assert len(GigasegDataset(root, check=False)) == 3


def test_several_problems_are_reported_together(tmp_path):
    root = write_gigaseg(tmp_path / "ds")
    for stem in ("scene_000", "scene_002"):
        Image.fromarray(ids_mask(0)[:, :50]).save(root / "masks" / f"{stem}.png")
    with pytest.raises(DatasetError, match=r"2 problems in split 'train': .*scene_000\.png.*; .*scene_002\.png"):
        GigasegDataset(root)


def test_out_of_range_id_found_by_full_validation_and_by_reading(tmp_path, monkeypatch):
    root = write_gigaseg(tmp_path / "ds")
    mask = ids_mask(2)
    mask[30, 40] = 9
    Image.fromarray(mask).save(root / "masks" / "scene_002.png")
    dataset = GigasegDataset(root)  # headers are fine
    with pytest.raises(DatasetError, match=r"scene_002\.png: class id 9 is out of range at row 30, col 40"):
        dataset.validate(full=True)
    monkeypatch.setattr(datasets, "VALIDATE_BAND_BYTES", 7 * W)  # bands of 7 rows
    with pytest.raises(DatasetError, match=r"at row 30, col 40 \(1 such pixels in window \(top=28, left=0, 7x64"):
        dataset.validate(full=True)
    with dataset[2] as sample, pytest.raises(DatasetError, match=r"scene_002\.png: class id 9 .*window"):
        sample.mask.read(Window(24, 32, 16, 16))


def test_unknown_colour_found_by_full_validation(tmp_path):
    root = write_gigaseg(tmp_path / "ds", mask_encoding="rgb")
    for i, stem in enumerate(("scene_000", "scene_001", "scene_002")):
        rgb = np.array(PALETTE, dtype=np.uint8)[ids_mask(i)]
        if i == 1:
            rgb[3, 5] = (1, 2, 3)
        Image.fromarray(rgb).save(root / "masks" / f"{stem}.png")
    dataset = GigasegDataset(root)
    with pytest.raises(DatasetError, match=r"scene_001\.png: unknown mask colour \(1, 2, 3\) at row 3, col 5"):
        dataset.validate(full=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"classes": None}, r"dataset\.yaml: missing 'classes'"),
        ({"palette": [[0, 0, 0], [1, 1, 1]]}, r"dataset\.yaml: 'palette' has 2 colours but 'classes' has 3 names"),
        ({"palette": [[0, 0, 0], [1, 1, 1], [2, 2, 300]]}, r"dataset\.yaml: palette entry 2 must be an \[R, G, B\]"),
        ({"mask_encoding": "rgb", "palette": None}, r"dataset\.yaml: mask_encoding 'rgb' needs a 'palette'"),
        ({"mask_encoding": "stripes"}, r"dataset\.yaml: mask_encoding must be 'index' or 'rgb'"),
        ({"ignore_index": 1}, r"dataset\.yaml: ignore_index must lie in 3\.\.255"),
        ({"exclude_from_miou": [5]}, r"dataset\.yaml: 'exclude_from_miou' must list class ids 0\.\.2"),
        # YAML's true loads as True, which Python counts as 1: not a class id
        (
            {"exclude_from_miou": [True]},
            r"dataset\.yaml: 'exclude_from_miou' must list class ids 0\.\.2 .*got \[True\]",
        ),
        ({"ignore_index": True}, r"dataset\.yaml: 'ignore_index' must be an integer 3\.\.255, got True"),
        ({"task": "classification"}, r"dataset\.yaml: task is 'classification'"),
        (
            {"splits": {"train": ["scene_000", "ghost"]}},
            r"dataset\.yaml: split 'train' lists 1 stem\(s\) with no image .*ghost",
        ),
        ({"splits": {"val": ["scene_000"]}}, r"dataset\.yaml: no split 'train' \(splits: val\)"),
    ],
)
def test_bad_yaml(tmp_path, overrides, message):
    root = write_gigaseg(tmp_path / "ds", **overrides)  # None drops the key
    with pytest.raises(DatasetError, match=message):
        GigasegDataset(root)


def test_unparsable_yaml(tmp_path):
    root = write_gigaseg(tmp_path / "ds")
    (root / "dataset.yaml").write_text("classes: [a, b\npalette: {")
    with pytest.raises(DatasetError, match=r"dataset\.yaml: is not valid YAML"):
        load_dataset(root)


def test_unknown_layout_lists_known_layouts(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(
        DatasetError, match=r"stuff: not a dataset layout gigaseg knows: .*DeepGlobe.*Inria.*Cityscapes"
    ):
        load_dataset(tmp_path / "stuff")
