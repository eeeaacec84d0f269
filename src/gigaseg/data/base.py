"""What every dataset format shares: lazy samples, the segmentation dataset base class, file matching.

A segmentation dataset is a list of pairs (name, image file, mask file or None) plus what
the labels mean: ``classes``, ``palette``, the ``encoding`` that turns a mask file into class
ids, ``ignore_index`` and the classes ``exclude_from_miou``. Indexing opens a pair lazily as a
``Sample`` (an ``ImageSource`` and a ``LabelSource``); nothing is decoded until a window is
read, so a dataset of gigapixel scenes costs only file handles. Datasets hold only paths, so
they pickle into DataLoader workers.

Construction checks from file headers (cheap) that every image has its mask, that their
sizes match and that every image of the split has the same channels and dtype (a model and its
normalisation are made for one kind of image); ``validate(full=True)`` also decodes every mask
band by band and reports unknown colours and out-of-range ids. Problems are ``DatasetError``\\ s naming the file.

The formats (``folder``, ``deepglobe``, ``inria``, ``cityscapes``, ``classification``) import
this module; it imports none of them. ``gigaseg.data.loader.load_dataset`` recognises them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from torch.utils.data import Dataset

from ..errors import DatasetError, GigasegError, SplitNotFound
from ..geometry import Window
from ..io.base import ImageSource, broken_link_problem
from ..io.palette import as_palette, default_palette
from ..io.resample import band_edges
from ..io.sources import open_image
from .labels import LabelEncoding, LabelSource

#: file extensions read as images or masks (case-insensitive)
IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

#: bytes of raw mask decoded at once by ``validate(full=True)``
VALIDATE_BAND_BYTES = 64 * 2**20

#: how many problems a DatasetError lists before summarising
_LISTED = 5


def stem(path: str | os.PathLike) -> str:
    """File name without its extension (``a.ome.tif`` -> ``a``).

    Args:
        path: a file path; only its last component is used.

    Returns:
        The name without its directory and extension (``.ome.tif`` / ``.ome.tiff`` count as one extension).
    """
    name = os.path.basename(path)
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def list_images(folder: Path, suffix: str = "") -> list[Path]:
    """Image files in ``folder`` whose stem ends with ``suffix``, sorted; hidden files skipped.

    Args:
        folder: the folder to list (not recursive).
        suffix: the end every stem must have (``"_sat"``); ``""`` accepts every image.

    Returns:
        The files with an extension of ``IMAGE_EXTENSIONS`` (any case), sorted by path.

    Raises:
        DatasetError: an entry named like an image is not a file (a symbolic link that leads
            nowhere, or a folder): skipping it would shrink the dataset without a word.
    """
    found = []
    for p in sorted(folder.iterdir()):  # the first bad entry by name, whatever the directory's order
        if p.name.startswith(".") or p.suffix.lower() not in IMAGE_EXTENSIONS or not stem(p).endswith(suffix):
            continue
        if not p.is_file():
            problem = "is a folder, not an image file" if p.is_dir() else "is not a regular file"
            raise DatasetError(p, broken_link_problem(p) or problem)
        found.append(p)
    return found


def require_images(folder: Path) -> list[Path]:
    """``list_images(folder)``; a folder without images is an error.

    Args:
        folder: the folder to list.

    Returns:
        The image files of ``folder``, sorted (never empty).

    Raises:
        DatasetError: ``folder`` holds no image file.
    """
    files = list_images(folder)
    if not files:
        raise DatasetError(folder, f"no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def row_bands(source: ImageSource) -> Iterator[Window]:
    """Full-width windows of ``source``, top to bottom, each about ``VALIDATE_BAND_BYTES`` decoded.

    Args:
        source: the image the bands cover.

    Yields:
        ``Window``\\ s of whole rows, covering the image once, top to bottom.
    """
    row_bytes = source.width * source.channels * source.dtype.itemsize
    for top, bottom in band_edges(0, source.height, VALIDATE_BAND_BYTES // max(1, row_bytes)):
        yield Window(top, 0, bottom - top, source.width)


def require_folder(folder: Path, what: str) -> Path:
    """``folder``, checked to be an existing folder.

    Args:
        folder: the path to check.
        what: what the folder is, for the error message (``"dataset folder"``).

    Returns:
        ``folder`` unchanged.

    Raises:
        DatasetError: ``folder`` does not exist or is not a folder.
    """
    if not folder.is_dir():
        raise DatasetError(folder, f"{what} does not exist" if not folder.exists() else f"{what} is not a folder")
    return folder


def listing(names: Sequence[str], limit: int = _LISTED) -> str:
    """``a, b, c`` (and ``... and N more`` past ``limit``), for error messages.

    Args:
        names: the items to list.
        limit: how many are shown.

    Returns:
        The first ``limit`` names joined by commas, plus how many more there are.
    """
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def index_files(files: Iterable[Path], folder: Path, suffix: str = "") -> dict[str, Path]:
    """``{name: file}`` where name is the stem without ``suffix``.

    Args:
        files: the files to index; every stem is assumed to end with ``suffix``.
        folder: where the files are, named by the error.
        suffix: removed from the end of every stem (``"_mask"``).

    Returns:
        The files by name.

    Raises:
        DatasetError: two files have the same name.
    """
    found: dict[str, Path] = {}
    for path in files:
        name = stem(path)
        name = name[: len(name) - len(suffix)]
        if name in found:
            raise DatasetError(folder, f"two files have the name {name!r}: {found[name].name} and {path.name}")
        found[name] = path
    return found


def image_layout(channels: int, dtype) -> str:
    """``"3 channels of uint8"``: an image's channels and dtype, for messages.

    Args:
        channels: the image's channel count.
        dtype: its sample type (anything ``np.dtype`` reads).

    Returns:
        The description.
    """
    return f"{channels} channel{'' if channels == 1 else 's'} of {np.dtype(dtype).name}"


def mixed_layouts(layouts: Sequence[tuple[Path, int, np.dtype]]) -> DatasetError | None:
    """The error for images whose channels or dtype differ from the first image's, if any do.

    Args:
        layouts: ``(file, channels, dtype)`` of every image, in dataset order (from headers).

    Returns:
        A ``DatasetError`` naming the first file that differs, what it has and what the first
        image has (plus how many more differ), or None when all agree.
    """
    if not layouts:
        return None
    first, channels, dtype = layouts[0]
    differ = [(path, c, d) for path, c, d in layouts[1:] if (c, np.dtype(d)) != (channels, np.dtype(dtype))]
    if not differ:
        return None
    path, c, d = differ[0]
    more = ""
    if len(differ) > 1:
        more = f"; {len(differ) - 1} more differ: {listing([p.name for p, _, _ in differ[1:]])}"
    return DatasetError(
        path,
        f"has {image_layout(c, d)} but {first.name}, the split's first image, has {image_layout(channels, dtype)}; "
        f"every image of a dataset needs the same channels and dtype{more}",
    )


@dataclass(frozen=True)
class Pair:
    """Where one sample lives on disk."""

    name: str
    image: Path
    mask: Path | None


def match_pairs(
    images: dict[str, Path],
    masks: dict[str, Path],
    image_folder: Path,
    mask_folder: Path,
) -> list[Pair]:
    """Image and mask files paired by name.

    Args:
        images: image files by name (``index_files``).
        masks: mask files by name.
        image_folder: named by the error about masks without an image.
        mask_folder: named by the error about images without a mask.

    Returns:
        One ``Pair`` per name, in name order.

    Raises:
        DatasetError: an image has no mask or a mask has no image.
    """
    no_mask = sorted(set(images) - set(masks))
    if no_mask:
        raise DatasetError(
            mask_folder,
            f"{len(no_mask)} image(s) have no mask here: {listing([images[n].name for n in no_mask])}",
        )
    no_image = sorted(set(masks) - set(images))
    if no_image:
        raise DatasetError(
            image_folder,
            f"{len(no_image)} mask(s) have no image here: {listing([masks[n].name for n in no_image])}",
        )
    return [Pair(name, images[name], masks[name]) for name in sorted(images)]


def unlabelled_pairs(images: dict[str, Path]) -> list[Pair]:
    """Image files without masks (a test split), as pairs in name order.

    Args:
        images: image files by name.

    Returns:
        One ``Pair`` per name with ``mask`` None.
    """
    return [Pair(name, images[name], None) for name in sorted(images)]


def check_split(root: Path, dataset: str, split: str, splits: Sequence[str]) -> None:
    """Check that ``split`` is one of the fixed ``splits`` of a published dataset.

    Args:
        root: the dataset folder, named by the error.
        dataset: the dataset's name, for the message (``"Inria"``).
        split: the requested split.
        splits: the dataset's splits.

    Raises:
        DatasetError: ``split`` is not in ``splits``.
    """
    if split not in splits:
        raise SplitNotFound(root, f"{dataset} has no split {split!r} (splits: {', '.join(splits)})")


def select_split(
    split: str,
    splits: dict[str, list[str]] | None,
    names: Sequence[str],
    source: Path,
    image_folder: Path,
) -> list[str]:
    """The image names of ``split``, from the ``splits`` a dataset.yaml (``source``) defines.

    ``"all"`` is every name (unless ``splits`` defines its own ``"all"``); without
    ``splits`` every name is in ``"train"``.

    Args:
        split: the requested split.
        splits: split name -> image names, or None when the dataset defines no splits.
        names: the names of every image found.
        source: the file that defines the splits, named by the errors.
        image_folder: where the images are, named by the error about missing images.

    Returns:
        The names of the split (in the order ``splits`` lists them, else the order of ``names``).

    Raises:
        DatasetError: the split is unknown, lists a name with no image in ``image_folder``, or is empty.
    """
    if split == "all" and not (splits and "all" in splits):
        chosen = list(names)
    elif splits is None:
        if split != "train":
            raise SplitNotFound(
                source, f"no split {split!r}: no splits are defined, so every image is in 'train' (or 'all')"
            )
        chosen = list(names)
    else:
        if split not in splits:
            raise SplitNotFound(source, f"no split {split!r} (splits: {', '.join(splits)})")
        chosen = splits[split]
        available = set(names)
        missing = [name for name in chosen if name not in available]
        if missing:
            raise DatasetError(
                source,
                f"split {split!r} lists {len(missing)} stem(s) with no image in {image_folder}: {listing(missing)}",
            )
    if not chosen:
        raise SplitNotFound(source, f"no images for split {split!r}")
    return chosen


@dataclass
class Sample:
    """One dataset item, opened lazily: nothing is decoded until a window is read."""

    name: str
    image: ImageSource
    mask: LabelSource | None

    def close(self) -> None:
        """Close the image and the mask (samples are also context managers)."""
        self.image.close()
        if self.mask is not None:
            self.mask.close()

    def __enter__(self) -> Sample:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SegmentationDataset(Dataset):
    """Base class: a list of ``Pair``\\ s plus the meaning of their labels.

    ``dataset[i]`` is a ``Sample`` (lazy). Subclasses find the pairs and call
    ``__init__`` with them.

    Args:
        root: the dataset folder (named by errors and ``repr``).
        split: the split's name.
        pairs: the samples on disk.
        classes: one name per class id.
        encoding: how the mask files store class ids; its ``num_classes`` must equal ``len(classes)``.
        palette: one RGB colour per class (anything ``as_palette`` reads); None: ``default_palette``.
        exclude_from_miou: class ids that mIoU leaves out.
        max_memory: bytes (or a size like ``"2GB"``) a reader may decode at once, passed to ``open_image``;
            None: no bound.
        check: run ``validate()`` (headers only) at construction.

    Raises:
        DatasetError: the classes, encoding and palette disagree, there are no pairs, or (with ``check``)
            a pair is broken.
        ImageReadError: with ``check``, when the only problem found is a file that does not open.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        pairs: Sequence[Pair],
        *,
        classes: Sequence[str],
        encoding: LabelEncoding,
        palette=None,
        exclude_from_miou: Iterable[int] = (),
        max_memory: int | str | None = None,
        check: bool = True,
    ):
        self.root = Path(root)
        self.split = split
        self.pairs = list(pairs)
        self.classes = [str(c) for c in classes]
        self.encoding = encoding
        self.palette = default_palette(len(self.classes)) if palette is None else as_palette(palette)
        self.exclude_from_miou = tuple(int(c) for c in exclude_from_miou)
        self.max_memory = max_memory
        if len(self.classes) != encoding.num_classes:
            raise DatasetError(
                self.root, f"{len(self.classes)} class names but the label encoding has {encoding.num_classes} classes"
            )
        if len(self.palette) != len(self.classes):
            raise DatasetError(self.root, f"{len(self.palette)} palette colours for {len(self.classes)} classes")
        if not self.pairs:
            raise SplitNotFound(self.root, f"no images for split {split!r}")
        if check:
            self.validate()

    # --- what the labels mean -------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes (ids ``0..num_classes-1``)."""
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        """The label value of pixels that are not scored (the encoding's)."""
        return self.encoding.ignore_index

    @property
    def labelled(self) -> bool:
        """Whether every sample has a mask (False for test splits)."""
        return all(p.mask is not None for p in self.pairs)

    # --- the samples --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The sample names, in index order."""
        return [p.name for p in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        pair = self.pairs[index]
        image = open_image(pair.image, max_memory=self.max_memory)
        try:
            mask = None if pair.mask is None else self._open_mask(pair.mask)
        except BaseException:
            image.close()
            raise
        return Sample(pair.name, image, mask)

    def _open_mask(self, path: Path) -> LabelSource:
        raw = open_image(path, max_memory=self.max_memory, palette="indices")
        try:
            return LabelSource(raw, self.encoding)
        except BaseException:
            raw.close()
            raise

    # --- checks ---------------------------------------------------------------------------
    def validate(self, full: bool = False) -> None:
        """Check every pair; raise one ``DatasetError`` listing the problems found.

        Always: files open, the mask suits the encoding (channels), image and mask sizes
        agree, and every image has the channels and dtype of the first (headers only). With
        ``full``, every mask is also decoded, a band of rows at a time, so unknown colours and
        out-of-range ids are found.

        Args:
            full: also decode every mask (slow: reads every pixel).

        Raises:
            GigasegError: the one problem found (a ``DatasetError``, or an ``ImageReadError`` for a
                file that does not open).
            DatasetError: several problems, listed in one message.
        """
        problems: list[GigasegError] = []
        layouts = []
        for pair in self.pairs:
            try:
                layouts.append((pair.image, *self._check_pair(pair, full)))
            except GigasegError as error:
                problems.append(error)
        mixed = mixed_layouts(layouts)
        if mixed is not None:
            problems.append(mixed)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            shown = "; ".join(str(p) for p in problems[:_LISTED])
            more = f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
            raise DatasetError(self.root, f"{len(problems)} problems in split {self.split!r}: {shown}{more}")

    def _check_pair(self, pair: Pair, full: bool) -> tuple[int, np.dtype]:
        """Check one pair; return its image's channels and dtype."""
        with open_image(pair.image, max_memory=self.max_memory) as image:
            if pair.mask is None:
                return image.channels, image.dtype
            with self._open_mask(pair.mask) as mask:
                if mask.shape[:2] != image.shape[:2]:
                    raise DatasetError(
                        pair.mask,
                        f"mask is {mask.height}x{mask.width} (HxW) but its image {pair.image} "
                        f"is {image.height}x{image.width}",
                    )
                if full:
                    for band in row_bands(mask.raw):
                        mask.read(band)
            return image.channels, image.dtype

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, "
            f"{len(self)} samples, {self.num_classes} classes)"
        )


def read_pair(
    sample: Sample, window: Window | None = None, out_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """The image ``(h, w, C)`` and labels ``(h, w)`` uint8 of one window, aligned.

    The image is resampled with area averaging, the labels with nearest neighbour.

    Args:
        sample: the opened sample.
        window: the region to read; None: the whole image.
        out_size: ``(h, w)`` to resample to; None: the window's own size.

    Returns:
        ``(image, labels)``: the image in its source dtype, and the class ids, or None for a sample
        without mask.
    """
    window = sample.image.bounds if window is None else window
    image = sample.image.read(window, out_size, resample="area")
    labels = None if sample.mask is None else sample.mask.read(window, out_size, resample="nearest")[:, :, 0]
    return image, labels


# --- gigaseg's dataset.yaml -------------------------------------------------------------

YAML_NAME = "dataset.yaml"


def yaml_dataset_folder(root: str | os.PathLike, why: str) -> Path:
    """The folder holding a dataset.yaml: ``root`` itself, or the folder of ``root`` when it is the yaml.

    Args:
        root: a dataset folder or its ``dataset.yaml``.
        why: why the dataset needs a dataset.yaml, for the error message.

    Returns:
        The dataset folder.

    Raises:
        DatasetError: the folder does not exist or holds no dataset.yaml.
    """
    root = Path(root)
    if root.is_file() and root.name == YAML_NAME:
        root = root.parent
    require_folder(root, "dataset folder")
    if not (root / YAML_NAME).is_file():
        raise DatasetError(root, f"no {YAML_NAME} here ({why})")
    return root


class DatasetYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` / ``false`` are booleans.

    YAML 1.1 (PyYAML's default) also reads ``yes``, ``no``, ``on``, ``off``, ``y`` and ``n`` as
    booleans, so ``classes: [yes, no]`` would name two classes ``True`` and ``False``; dataset
    files are read with this loader, where those words stay strings.
    """


DatasetYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
DatasetYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_dataset_yaml(text: str):
    """Parse a dataset file's YAML text with :class:`DatasetYamlLoader` (``yes`` / ``no`` stay strings).

    Args:
        text: the file's text.

    Returns:
        The parsed document.

    Raises:
        yaml.YAMLError: the text is not valid YAML.
    """
    return yaml.load(text, Loader=DatasetYamlLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_mapping(path: Path, keys: str) -> dict:
    """The mapping in the yaml file ``path``.

    Args:
        path: the yaml file.
        keys: what the mapping should hold, quoted by the error when it is not a mapping (``"name:, classes:"``).

    Returns:
        The parsed mapping.

    Raises:
        DatasetError: the file cannot be read, is not valid YAML, or is not a mapping.
    """
    try:
        data = load_dataset_yaml(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise DatasetError(path, f"cannot read: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise DatasetError(path, "is not valid YAML: " + " ".join(str(error).split())) from None
    if not isinstance(data, dict):
        raise DatasetError(path, f"must be a YAML mapping ({keys}, ...)")
    return data


def yaml_classes(data: dict, path: Path) -> list[str]:
    """The ``classes`` of a dataset.yaml: a non-empty list of distinct names (ids are their indices).

    Args:
        data: the parsed dataset.yaml.
        path: the yaml file, named by the errors.

    Returns:
        The class names as strings (integer names are converted).

    Raises:
        DatasetError: ``classes`` is missing, empty, not a list of names, or names a class twice.
    """
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, (str, int)) for c in classes):
        raise DatasetError(path, f"'classes' must be a non-empty list of names, got {classes!r}")
    classes = [str(c) for c in classes]
    twice = sorted({c for c in classes if classes.count(c) > 1})
    if twice:
        raise DatasetError(path, f"class names appear twice in 'classes': {', '.join(twice)}")
    return classes


def yaml_splits(data: dict, path: Path) -> dict[str, list[str]] | None:
    """The optional ``splits`` of a dataset.yaml: split name -> image stems.

    Args:
        data: the parsed dataset.yaml.
        path: the yaml file, named by the error.

    Returns:
        The splits with every stem as a string, or None when the yaml defines none.

    Raises:
        DatasetError: ``splits`` is not a mapping of names to lists.
    """
    splits = data.get("splits")
    if splits is None:
        return None
    if not isinstance(splits, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in splits.items()):
        raise DatasetError(path, "'splits' must map split names to lists of image stems")
    return {k: [str(s) for s in v] for k, v in splits.items()}


def yaml_folder(data: dict, key: str, path: Path) -> str:
    """A folder name of a dataset.yaml (``images``, ``masks``), defaulting to ``key`` itself.

    Args:
        data: the parsed dataset.yaml.
        key: the entry to read; also its default value.
        path: the yaml file, named by the error.

    Returns:
        The folder name, relative to the dataset folder.

    Raises:
        DatasetError: the entry is not a non-empty string.
    """
    value = data.get(key, key)
    if not isinstance(value, str) or not value:
        raise DatasetError(path, f"'{key}' must be a folder name, got {value!r}")
    return value
