"""Datasets: filename label conventions, image+mask pairs, and the weak-label crop source.

Conventions (label vector in the filename, classes in dataset order):

- LUAD-HistoSeg: ``...-[1 0 0 1].png``   classes TE, NEC, LYM, TAS
- BCSS-WSSS:     ``...[1101].png``       classes TUM, STR, LYM, NEC
- WSSS4LUAD:     ``...-[1, 0, 0].png``   classes tumor, stroma, normal; masks 0/1/2, 3 = ignore

Folder names vary between releases (train/training, val/valid, img/image, mask/masks/label):
:func:`find_dir` globs the variants. The weak-label source cuts crops from image+mask pairs and
keeps **only** the image-level label of each crop; the mask itself never leaves this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fprotoseg.model.errors import DatasetError


@dataclass(frozen=True)
class DatasetSpec:
    """Class names (dataset order), QuPath names/colours for checkpoints, mask ignore index."""

    name: str
    classes: tuple[str, ...]
    qupath_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int
    background_index: int | None  # mask value for background (protocol choice), None if absent


DATASETS: dict[str, DatasetSpec] = {
    "wsss4luad": DatasetSpec(
        "wsss4luad",
        ("tumor", "stroma", "normal"),
        ("Tumor", "Stroma", "Normal"),
        ((200, 0, 0), (150, 200, 150), (0, 120, 255)),
        ignore_index=3,
        background_index=None,
    ),
    "luad-histoseg": DatasetSpec(
        "luad-histoseg",
        ("TE", "NEC", "LYM", "TAS"),
        ("Tumor", "Necrosis", "Immune cells", "Stroma"),
        ((200, 0, 0), (50, 50, 50), (160, 90, 160), (150, 200, 150)),
        ignore_index=255,
        background_index=4,
    ),
    "bcss-wsss": DatasetSpec(
        "bcss-wsss",
        ("TUM", "STR", "LYM", "NEC"),
        ("Tumor", "Stroma", "Lymphocytes", "Necrosis"),
        ((200, 0, 0), (150, 200, 150), (160, 90, 160), (50, 50, 50)),
        ignore_index=255,
        background_index=4,
    ),
}

_LABEL_RE = re.compile(r"\[([0-9,\s]+)\]")


def parse_filename_label(name: str, num_classes: int | None = None) -> np.ndarray:
    """Image-level label vector from a filename in any of the three conventions.

    ``a-[1 0 0 1].png`` (spaces), ``a[1101].png`` (packed digits), ``a-[1, 0, 0].png`` (commas).
    """
    matches = list(_LABEL_RE.finditer(Path(name).name))
    if not matches:
        raise DatasetError(f"no [..] label vector in filename {name!r}")
    body = matches[-1].group(1).strip()  # the last bracket group is the label
    spaced = "," in body or " " in body
    parts = [p for p in re.split(r"[,\s]+", body) if p] if spaced else list(body)
    if not parts or any(p not in ("0", "1") for p in parts):
        raise DatasetError(f"label vector in {name!r} must hold 0/1 values, got [{body}]")
    label = np.asarray([int(p) for p in parts], dtype=np.float32)
    if num_classes is not None and label.size != num_classes:
        raise DatasetError(f"{name!r}: expected {num_classes} labels, got {label.size}")
    return label


_DIR_VARIANTS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training", "Train", "Training", "1.training"),
    "val": ("val", "valid", "validation", "Val", "Valid", "Validation", "2.validation"),
    "test": ("test", "testing", "Test", "Testing", "3.testing"),
    "img": ("img", "image", "images", "Img", "Image", "Images"),
    "mask": ("mask", "masks", "label", "labels", "gt", "Mask", "Masks", "background-mask"),
}


def find_dir(root: Path, role: str) -> Path | None:
    """The first existing sub-folder of ``root`` whose name is a variant of ``role``."""
    for name in _DIR_VARIANTS[role]:
        cand = root / name
        if cand.is_dir():
            return cand
    return None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))  # writable: torch.from_numpy refuses read-only arrays


def read_mask(path: Path) -> np.ndarray:
    """Class indices from a palette (P) or grey (L) PNG; RGB masks are refused (ambiguous)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16"):
            raise DatasetError(f"{path.name}: mask must be a palette or grey index image, got mode {im.mode}")
        return np.asarray(im).astype(np.int64)


@dataclass
class MaskedImage:
    """An image with its pixel mask (evaluation, or the source of crop-level labels)."""

    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) int64 class indices


@dataclass(frozen=True)
class PairRef:
    """An image+mask pair on disk, not decoded yet."""

    name: str
    image: Path
    mask: Path


def list_pairs(data_root: Path, names: Sequence[str] | None = None) -> list[PairRef]:
    """The image+mask pairs under ``DIR/img`` and ``DIR/mask`` (folder-name variants accepted),
    without decoding them. ``data_root`` may also be a dataset root holding test/ or val/."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DatasetError(f"data root not found: {data_root}")
    img_dir, mask_dir = find_dir(data_root, "img"), find_dir(data_root, "mask")
    if img_dir is None or mask_dir is None:
        for role in ("test", "val"):
            sub = find_dir(data_root, role)
            if sub is not None and find_dir(sub, "img") and find_dir(sub, "mask"):
                img_dir, mask_dir = find_dir(sub, "img"), find_dir(sub, "mask")
                break
    if img_dir is None or mask_dir is None:
        raise DatasetError(f"{data_root} needs img/ and mask/ folders (or test|val/img and mask)")
    wanted = set(names) if names is not None else None
    refs = []
    for img_path in list_images(img_dir):
        if wanted is not None and img_path.name not in wanted:
            continue
        cands = [mask_dir / img_path.name, *(mask_dir / (img_path.stem + s) for s in IMAGE_SUFFIXES)]
        mask_path = next((c for c in cands if c.is_file()), None)
        if mask_path is None:
            raise DatasetError(f"no mask for {img_path.name} in {mask_dir}")
        refs.append(PairRef(img_path.name, img_path, mask_path))
    if not refs:
        raise DatasetError(f"no image+mask pairs found under {data_root}")
    return refs


def read_pair(ref: PairRef) -> MaskedImage:
    rgb, mask = read_rgb(ref.image), read_mask(ref.mask)
    if rgb.shape[:2] != mask.shape:
        raise DatasetError(f"{ref.name}: image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    return MaskedImage(ref.name, rgb, mask)


def load_pairs(data_root: Path, names: Sequence[str] | None = None) -> list[MaskedImage]:
    """Image+mask pairs from ``DIR/img`` and ``DIR/mask`` (folder-name variants accepted).

    ``data_root`` may also be a dataset root holding test/ or val/ with img/ and mask/ inside.
    """
    return [read_pair(r) for r in list_pairs(data_root, names)]


def image_level_label(mask: np.ndarray, num_classes: int, min_fraction: float) -> np.ndarray:
    """Classes whose area fraction within ``mask`` exceeds ``min_fraction``: the ONLY thing a
    training crop takes from its mask."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    return (counts / float(mask.size) > min_fraction).astype(np.float32)


@dataclass
class WeakImage:
    """A training image whose supervision is image-level only.

    ``label`` labels the whole image; a mask-backed image (``_mask``) gives each crop the label of
    the classes inside it (:meth:`crop_label`), computed from a mask the caller never sees.
    """

    name: str
    rgb: np.ndarray
    label: np.ndarray
    _mask: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])

    def crop_label(self, y: int, x: int, size: int, num_classes: int, min_fraction: float) -> np.ndarray:
        if self._mask is None:
            return self.label
        return image_level_label(self._mask[y : y + size, x : x + size], num_classes, min_fraction)


@dataclass(frozen=True)
class WeakImageRef:
    """A training image on disk, not decoded yet (the data loader's workers decode it on use).

    ``shape`` is (h, w) after ``scale``, read from the file header; ``mask`` (image+mask pairs)
    yields crop-level labels, otherwise ``label`` labels the whole image.
    """

    name: str
    path: Path
    shape: tuple[int, int]
    label: np.ndarray | None
    mask: Path | None = None
    scale: float = 1.0
    num_classes: int = 0
    min_fraction: float = 0.0

    def load(self) -> WeakImage:
        if self.mask is not None:
            pair = read_pair(PairRef(self.name, self.path, self.mask))
            label = image_level_label(pair.mask, self.num_classes, self.min_fraction)
            mask = pair.mask.astype(np.uint8) if pair.mask.max() < 256 else pair.mask  # 1/8 the cache
            return WeakImage(self.name, pair.rgb, label, mask)
        assert self.label is not None
        with Image.open(self.path) as opened:
            im: Image.Image = opened.convert("RGB")
            if self.scale != 1.0:
                size = (self.shape[1], self.shape[0])
                im = im.resize(size, Image.Resampling.BOX if self.scale < 1 else Image.Resampling.BICUBIC)
            return WeakImage(self.name, np.array(im), self.label.copy())


def _image_size(path: Path, scale: float = 1.0) -> tuple[int, int]:
    """(h, w) from the file header only, after ``scale`` (at least 8 px a side)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except OSError as exc:
        raise DatasetError(f"{path.name} is not a readable image ({exc})") from None
    if scale != 1.0:
        return max(8, round(h * scale)), max(8, round(w * scale))
    return h, w


def weak_refs_from_pairs(
    refs: Sequence[PairRef], num_classes: int, min_fraction: float
) -> list[WeakImageRef]:
    """Image+mask pairs as crop sources: each crop is labelled with the classes it holds."""
    return [
        WeakImageRef(
            r.name, r.image, _image_size(r.image), None, r.mask,
            num_classes=num_classes, min_fraction=min_fraction,
        )
        for r in refs
    ]


def weak_images_from_pairs(
    pairs: Sequence[MaskedImage], num_classes: int, min_fraction: float
) -> list[WeakImage]:
    return [
        WeakImage(p.name, p.rgb, image_level_label(p.mask, num_classes, min_fraction), p.mask) for p in pairs
    ]


def check_partial_label(label: Sequence[int]) -> np.ndarray:
    vec = np.asarray(label, dtype=np.float32)
    if vec.ndim != 1 or not np.isin(vec, (-1.0, 0.0, 1.0)).all() or not (vec == 1).any():
        raise DatasetError(f"class-folder label must hold 1/0/-1 with one 1 at least, got {list(label)}")
    return vec


def weak_refs_from_class_folder(
    folder: Path, label: Sequence[int], scale: float = 1.0, limit: int | None = None
) -> list[WeakImageRef]:
    """Every image of a one-class-per-folder dataset (LC25000) with one, possibly partial, label.

    ``label`` holds 1 (present), 0 (absent) or -1 (unknown: masked out of the loss); an
    adenocarcinoma image says "tumour present, normal absent" and nothing about stroma.
    ``scale`` resizes on load so the tissue matches the training µm/px.
    """
    vec = check_partial_label(label)
    out = [
        WeakImageRef(p.name, p, _image_size(p, scale), vec, scale=scale)
        for p in list_images(Path(folder))[:limit]
    ]
    if not out:
        raise DatasetError(f"no images in {folder}")
    return out


def weak_images_from_class_folder(
    folder: Path, label: Sequence[int], scale: float = 1.0, limit: int | None = None
) -> list[WeakImage]:
    """:func:`weak_refs_from_class_folder`, decoded."""
    return [r.load() for r in weak_refs_from_class_folder(folder, label, scale, limit)]


def weak_refs_from_labelled_folder(folder: Path, num_classes: int) -> list[WeakImageRef]:
    """Patches whose filename carries the label (no mask at all)."""
    return [
        WeakImageRef(p.name, p, _image_size(p), parse_filename_label(p.name, num_classes))
        for p in list_images(Path(folder))
    ]


def weak_images_from_labelled_folder(folder: Path, num_classes: int) -> list[WeakImage]:
    """Patches whose filename carries the label (no mask at all), decoded."""
    return [r.load() for r in weak_refs_from_labelled_folder(folder, num_classes)]


def area_cdf(shapes: Sequence[tuple[int, int]], crop_px: int) -> np.ndarray:
    """Images are drawn in proportion to their area (big images hold more distinct crops):
    the cumulative distribution :func:`draw_weak_crop` searches (as ``Generator.choice`` does)."""
    areas = np.asarray([max(h * w, crop_px * crop_px) for h, w in shapes], float)
    cdf = (areas / areas.sum()).cumsum()
    cdf /= cdf[-1]
    return cdf


def glass_cover(rng: np.random.Generator, n: int) -> np.ndarray:
    """A band of glass along one or two edges of an n x n crop (15-60 % of its width each)."""
    cover = np.zeros((n, n), bool)
    for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
        k = int(n * rng.uniform(0.15, 0.6))
        if side == 0:
            cover[:k] = True
        elif side == 1:
            cover[-k:] = True
        elif side == 2:
            cover[:, :k] = True
        else:
            cover[:, -k:] = True
    return cover


def put_glass(
    rng: np.random.Generator, rgb: np.ndarray, mask: np.ndarray, not_tissue: int
) -> tuple[np.ndarray, np.ndarray]:
    """Copies of a crop and its mask with a band of empty glass (:func:`glass_cover`) in place of
    tissue; covered mask pixels become ``not_tissue``. The glass is light grey with a slight tint
    per crop and sensor noise, as scanners render empty slide; the crop's label must then come
    from the tissue left visible."""
    n = max(rgb.shape[0], rgb.shape[1])
    cover = glass_cover(rng, n)[: rgb.shape[0], : rgb.shape[1]]
    rgb, mask = rgb.copy(), mask.copy()
    base = 244.0 + rng.uniform(-10.0, 6.0) + rng.uniform(-3.0, 3.0, size=3)
    noise = rng.normal(0.0, 3.0, size=(int(cover.sum()), 3))
    rgb[cover] = np.clip(base + noise, 0, 255).astype(np.uint8)
    mask[cover] = not_tissue
    return rgb, mask


def draw_weak_crop(
    rng: np.random.Generator,
    shapes: Sequence[tuple[int, int]],
    cdf: np.ndarray,
    get: Callable[[int], WeakImage],
    crop_px: int,
    num_classes: int,
    min_fraction: float,
    glass_prob: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One random crop and its image-level label (crops of all-ignore are skipped; images smaller
    than the crop are reflect-padded, padding labelled as nothing).

    With ``glass_prob`` a band of empty glass replaces part of a mask-backed crop, and the label is
    that of the tissue left visible: slides put glass beside tissue in many tiles, and a network
    that never saw it paints it (and the tissue near it) as a class. ``get(i)`` decodes image i
    (only once its crop box is drawn from ``shapes``).
    """
    for _ in range(50):
        i = int(np.searchsorted(cdf, rng.random(), side="right"))
        h, w = shapes[i]
        y = int(rng.integers(0, max(1, h - crop_px + 1)))
        x = int(rng.integers(0, max(1, w - crop_px + 1)))
        im = get(i)
        crop = im.rgb[y : y + crop_px, x : x + crop_px]
        if glass_prob > 0 and im._mask is not None and rng.random() < glass_prob:
            sub = im._mask[y : y + crop_px, x : x + crop_px]
            crop, sub = put_glass(rng, crop, sub, num_classes)
            label = image_level_label(sub, num_classes, min_fraction)
        else:
            label = im.crop_label(y, x, crop_px, num_classes, min_fraction)
        if not (label > 0).any():
            continue
        if crop.shape[0] < crop_px or crop.shape[1] < crop_px:
            pad = ((0, crop_px - crop.shape[0]), (0, crop_px - crop.shape[1]), (0, 0))
            crop = np.pad(crop, pad, mode="reflect")
        return crop, label
    raise DatasetError("could not sample a labelled crop in 50 tries (are all masks ignore?)")


def stratified_holdout(
    pairs: Sequence[MaskedImage], num_classes: int, n_holdout: int, seed: int
) -> list[str]:
    """A fixed held-out subset stratified by the set of classes present (documented split).

    Every class combination with >= 2 images contributes in proportion; singletons stay in training.
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, ...], list[str]] = {}
    for p in pairs:
        key = tuple(int(v) for v in image_level_label(p.mask, num_classes, 0.02))
        groups.setdefault(key, []).append(p.name)
    total = len(pairs)
    chosen: list[str] = []
    for key in sorted(groups):
        names = sorted(groups[key])
        if len(names) < 2:
            continue
        k = max(1, round(n_holdout * len(names) / total))
        chosen += sorted(rng.choice(names, size=min(k, len(names) - 1), replace=False).tolist())
    return sorted(chosen)
