"""Data sets and transforms: the official ConvNeXt `build_dataset` / `build_transform`, plus
CIFAR-10/100 (python pickle batches or image folders), raw Tiny ImageNet and the
handwritten digits that ship with scikit-learn. Nothing is ever downloaded.

`--data_set` choices (see `DATA_SETS`):
  CIFAR10, CIFAR100  `cifar-10-batches-py/` or `cifar-100-python/` (that folder or its parent),
                     or image folders `train/` + `val/` (or `test/`)
  TINY_IMAGENET      the `tiny-imagenet-200/` tree as distributed (that folder or its parent)
  IMNET              `data_path/train` + `data_path/val`
  image_folder       `data_path` (train) + `eval_data_path` (val), `--nb_classes` checked
  DIGITS             sklearn's 8x8 digits, a fixed seeded 80/20 stratified split, in memory
`--eval_data_path`, when given, is the evaluation folder itself (for the CIFAR pickles: the
folder holding them or its parent).
"""
import functools
import logging
import os
import pickle
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import default_loader

from common.config import Choice, Config, Range, ranged
from common.errors import UserError
from cli.flags import DATA_SETS

logger = logging.getLogger(__name__)

DIGITS_SEED = 0          # fixes the DIGITS train/val split: the same on every run
DIGITS_VAL_SHARE = 0.2


@dataclass(frozen=True)
class DataConfig(Config):
    """The data flags (main.py's names and official defaults), checked when made."""
    data_set: str = ranged("DIGITS", Choice(DATA_SETS))
    data_path: str | None = None
    eval_data_path: str | None = None
    nb_classes: int = ranged(1000, Range(1, integer=True))
    input_size: int = ranged(224, Range(1, integer=True))
    color_jitter: float = ranged(0.4, Range(0))
    aa: str | None = "rand-m9-mstd0.5-inc1"
    train_interpolation: str = "bicubic"
    reprob: float = ranged(0.25, Range(0, 1))
    remode: str = "pixel"
    recount: int = ranged(1, Range(1, integer=True))
    crop_pct: float | None = ranged(None, Range(0, 1, lo_open=True))
    imagenet_default_mean_and_std: bool = True

    @classmethod
    def of(cls, value):
        """A DataConfig as it is, or one read from a namespace with the data flags."""
        return value if isinstance(value, cls) else cls.from_args(value)


def default_data_args(**overrides):
    """The official defaults of the data flags (a DataConfig), for scripts and tests that do
    not parse main.py.

    Args:
        **overrides: fields to set instead (e.g. data_set="DIGITS", input_size=32).
    """
    return DataConfig(**overrides)


# ----------------------------------------------------------------------------- datasets

class ArrayImages(Dataset):
    """In-memory images (uint8, N x H x W x 3) served as PIL images, like torchvision's CIFAR.

    Args:
        images: uint8 array of shape (N, H, W, 3).
        targets: N class indices.
        classes: class names, index i names class i.
        transform: applied to each PIL image.
    """

    def __init__(self, images, targets, classes, transform=None):
        self.images, self.targets = images, [int(t) for t in targets]
        self.classes, self.transform = list(classes), transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), self.targets[index]


def read_image(path):
    """An RGB PIL image; an unreadable file is a UserError naming it (also from a worker)."""
    try:
        return default_loader(path)
    except Image.DecompressionBombError:
        raise UserError(f"image {path} has more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels (PIL's "
                        "limit against decompression bombs): not read") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for damaged files
        raise UserError(f"cannot read image {path}: {e}") from None


class ImageList(Dataset):
    """Image files on disk with known labels (the raw Tiny ImageNet val split).

    Args:
        samples: (path, class index) pairs.
        classes: class names, index i names class i.
        transform: applied to each PIL image.
    """

    def __init__(self, samples, classes, transform=None):
        self.samples, self.classes, self.transform = samples, list(classes), transform
        self.targets = [t for _, t in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, target = self.samples[index]
        img = read_image(path)
        return (self.transform(img) if self.transform else img), target


class FixedClassFolder(datasets.ImageFolder):
    """ImageFolder with a given class order, so train and val agree even if a folder differs.

    Args:
        root: folder with one sub-folder per class (searched recursively).
        classes: class names in label order; each must be a sub-folder of root.
        transform: applied to each PIL image.
    """

    def __init__(self, root, classes, transform=None):
        self._fixed_classes = list(classes)
        super().__init__(root, transform=transform, loader=read_image)

    def find_classes(self, directory):
        return self._fixed_classes, {c: i for i, c in enumerate(self._fixed_classes)}


# ----------------------------------------------------------------------------- folder helpers

def _require_dir(path, what):
    """Return `path` if it is a folder, else raise a UserError naming `what` it should hold."""
    if not path or not os.path.isdir(path):
        raise UserError(f"{what} not found: {path}")
    return path


def _folder_classes(root):
    """Sorted class sub-folder names of an image folder (ImageFolder's rule)."""
    classes = sorted(e.name for e in os.scandir(_require_dir(root, "image folder")) if e.is_dir())
    if not classes:
        raise UserError(f"image folder {root} has no class sub-folders")
    return classes


def _image_folder(root, transform, classes=None):
    """ImageFolder over `root` (class order `classes`, default: its sorted sub-folders)."""
    found = _folder_classes(root)
    unknown = sorted(set(found) - set(classes or found))
    if unknown:
        raise UserError(f"image folder {root} has class folders the training split lacks: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    classes = classes or found
    try:
        return FixedClassFolder(root, classes, transform)
    except FileNotFoundError as e:  # a class sub-folder missing or empty
        raise UserError(f"image folder {root}: {str(e).splitlines()[0]}") from None


def _eval_folder(data):
    """The evaluation folder: --eval_data_path itself, else data_path/val."""
    if data.eval_data_path:
        return _require_dir(data.eval_data_path, "--eval_data_path folder")
    base = _require_dir(data.data_path, "--data_path folder")
    return _require_dir(os.path.join(base, "val"), "val folder (or give --eval_data_path)")


# ----------------------------------------------------------------------------- CIFAR

_CIFAR = {  # folder, train files, eval files, label key, meta file, names key
    "CIFAR10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "labels", "batches.meta", "label_names"),
    "CIFAR100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}
# Globals a CIFAR pickle needs (numpy arrays, py2/py3 bytes); nothing that can run code.
_PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                   ("numpy.core.multiarray", "_reconstruct"),
                   ("numpy._core.multiarray", "_reconstruct"),
                   ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals a CIFAR batch needs."""

    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        with warnings.catch_warnings():  # numpy 2 warns on the numpy.core alias
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def _read_pickle(path):
    """Load one CIFAR pickle file as a dict with str keys; UserError if unreadable or unsafe."""
    try:
        with open(path, "rb") as f:
            data = _SafeUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a CIFAR batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


def _cifar_pickle_dir(path, data_set):
    """The CIFAR pickle folder at `path` (the folder itself or its parent), or None."""
    if not path:
        return None
    folder, train_files, eval_files = _CIFAR[data_set][:3]
    for candidate in (path, os.path.join(path, folder)):
        if any(os.path.isfile(os.path.join(candidate, f)) for f in (train_files[0], eval_files[0])):
            return candidate
    return None


def _cifar_missing(data_set, path):
    folder = _CIFAR[data_set][0]
    return UserError(f"{data_set}: no data set under {path}: expected {folder}/ (python pickle "
                     f"batches; the folder itself or its parent) or train/ and val/ (or test/) "
                     f"image folders")


def _cifar_names(pickle_dir, data_set):
    """Class names from the batches' meta file."""
    meta, key = _CIFAR[data_set][4:]
    path = os.path.join(pickle_dir, meta)
    if not os.path.isfile(path):
        raise UserError(f"{data_set}: {path} is missing (it holds the class names)")
    names = _read_pickle(path).get(key)
    if not names:
        raise UserError(f"{data_set}: {path} has no {key} list")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar_arrays(pickle_dir, data_set, is_train):
    """(images N x 32 x 32 x 3 uint8, labels) of one split from the pickle batches."""
    files, label_key = _CIFAR[data_set][1 if is_train else 2], _CIFAR[data_set][3]
    images, labels = [], []
    for name in files:
        path = os.path.join(pickle_dir, name)
        if not os.path.isfile(path):
            raise UserError(f"{data_set}: {path} is missing")
        batch = _read_pickle(path)
        try:
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[label_key])
        except (KeyError, ValueError) as e:
            raise UserError(f"{data_set}: {path} is not a CIFAR batch (bad or missing {e})") from None
        if len(labels) != sum(len(i) for i in images):
            raise UserError(f"{data_set}: {path} holds {len(images[-1])} images but "
                            f"{len(labels) - sum(len(i) for i in images[:-1])} labels")
    classes = 10 if data_set == "CIFAR10" else 100
    bad = [label for label in labels if not 0 <= int(label) < classes]
    if bad:
        raise UserError(f"{data_set}: label {bad[0]} is outside 0..{classes - 1} ({len(bad)} such labels)")
    # (N, 3, H, W) -> (N, H, W, 3) for PIL
    return np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1)), labels


def _cifar_image_folder(is_train, data):
    """The split's image folder: --eval_data_path, data_path/train, data_path/val|test; or None."""
    if not is_train and data.eval_data_path:
        return data.eval_data_path if os.path.isdir(data.eval_data_path) else None
    for name in ("train",) if is_train else ("val", "test"):
        if data.data_path and os.path.isdir(os.path.join(data.data_path, name)):
            return os.path.join(data.data_path, name)
    return None


def _cifar_source(is_train, data):
    """('pickle', dir) or ('folder', dir) for the CIFAR split; UserError if neither exists."""
    path = data.eval_data_path if not is_train and data.eval_data_path else data.data_path
    pickle_dir = _cifar_pickle_dir(path, data.data_set)
    if pickle_dir:
        return "pickle", pickle_dir
    folder = _cifar_image_folder(is_train, data)
    if folder:
        return "folder", folder
    raise _cifar_missing(data.data_set, path)


def _cifar_classes(data):
    kind, path = _cifar_source(True, data)
    return _cifar_names(path, data.data_set) if kind == "pickle" else _folder_classes(path)


def _load_cifar(is_train, data, transform):
    kind, path = _cifar_source(is_train, data)
    if kind == "pickle":
        images, labels = _cifar_arrays(path, data.data_set, is_train)
        return ArrayImages(images, labels, _cifar_names(path, data.data_set), transform)
    dataset = _image_folder(path, transform)
    expected = 10 if data.data_set == "CIFAR10" else 100
    if len(dataset.classes) != expected:
        raise UserError(f"{data.data_set}: {path} holds {len(dataset.classes)} class folders, "
                        f"expected {expected}")
    return dataset


# ----------------------------------------------------------------------------- Tiny ImageNet

def _tiny_root(data, is_train=True):
    """The `tiny-imagenet-200` folder: --data_path itself or its child of that name; to
    evaluate only, the parent of --eval_data_path also serves (it holds wnids.txt)."""
    paths = [data.data_path]
    if not is_train and data.eval_data_path:
        paths.append(os.path.dirname(os.path.abspath(data.eval_data_path)))
    for path in filter(None, paths):
        for candidate in (path, os.path.join(path, "tiny-imagenet-200")):
            if (os.path.isfile(os.path.join(candidate, "wnids.txt"))
                    or os.path.isdir(os.path.join(candidate, "train"))):
                return candidate
    raise UserError(f"TINY_IMAGENET: no data set under {data.data_path}: expected tiny-imagenet-200/ "
                    f"(wnids.txt, train/<wnid>/images/, val/images/ + val/val_annotations.txt; "
                    f"the folder itself or its parent)")


def _tiny_classes(data, is_train=True):
    """The 200 wnids, sorted: from wnids.txt, else the train sub-folders."""
    root = _tiny_root(data, is_train)
    wnids_file = os.path.join(root, "wnids.txt")
    if not os.path.isfile(wnids_file):
        return _folder_classes(os.path.join(root, "train"))
    with open(wnids_file) as f:
        return sorted({line.strip() for line in f if line.strip()})


def _tiny_raw_val(val_dir, classes, transform):
    """The val split as distributed: val/images/*.JPEG labelled by val/val_annotations.txt."""
    index = {c: i for i, c in enumerate(classes)}
    samples = []
    with open(os.path.join(val_dir, "val_annotations.txt")) as f:
        for line in f:
            fields = line.strip().split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise UserError(f"TINY_IMAGENET: val class {fields[1]} is not among the train classes")
            samples.append((os.path.join(val_dir, "images", fields[0]), index[fields[1]]))
    return ImageList(samples, classes, transform)


def _load_tiny(is_train, data, transform):
    classes = _tiny_classes(data, is_train)
    root = _tiny_root(data, is_train)
    if is_train:
        # train/<wnid>/images/*.JPEG: ImageFolder searches each class folder recursively
        return _image_folder(os.path.join(root, "train"), transform, classes)
    val_dir = data.eval_data_path or os.path.join(root, "val")
    _require_dir(val_dir, "TINY_IMAGENET val folder")
    if os.path.isfile(os.path.join(val_dir, "val_annotations.txt")):
        return _tiny_raw_val(val_dir, classes, transform)
    return _image_folder(val_dir, transform, classes)  # already sorted into val/<wnid>/


# ----------------------------------------------------------------------------- ImageNet, folders

def _imnet_classes(data):
    return _folder_classes(os.path.join(_require_dir(data.data_path, "--data_path folder"), "train"))


def _load_imnet(is_train, data, transform):
    """data_path/train; eval: --eval_data_path or data_path/val, in the train folder's class
    order when there is one (evaluating alone needs only the val folder)."""
    if is_train:
        base = _require_dir(data.data_path, "--data_path folder")
        return _image_folder(os.path.join(base, "train"), transform)
    has_train = data.data_path and os.path.isdir(os.path.join(data.data_path, "train"))
    return _image_folder(_eval_folder(data), transform, _imnet_classes(data) if has_train else None)


def _folder_root(is_train, data):
    if is_train:
        return _require_dir(data.data_path, "image_folder --data_path (train) folder")
    if not data.eval_data_path:
        raise UserError("--data_set image_folder needs --eval_data_path (the val folder) to evaluate")
    return _require_dir(data.eval_data_path, "image_folder --eval_data_path (val) folder")


def _image_folder_classes(data):
    return _folder_classes(_folder_root(True, data))


def _load_image_folder(is_train, data, transform):
    root = _folder_root(is_train, data)
    dataset = _image_folder(root, transform)
    if len(dataset.classes) != data.nb_classes:
        raise UserError(f"--nb_classes is {data.nb_classes} but {root} holds "
                        f"{len(dataset.classes)} class folders")
    return dataset


# ----------------------------------------------------------------------------- DIGITS

@functools.lru_cache(maxsize=1)
def _digits_split():
    """(train_x, train_y, val_x, val_y): sklearn's digits as uint8 RGB, a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    gray = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)   # 0..16 -> 0..255
    rgb = np.repeat(gray[..., None], 3, axis=-1)                        # (N, 8, 8) -> (N, 8, 8, 3)
    tr_x, va_x, tr_y, va_y = train_test_split(rgb, digits.target, test_size=DIGITS_VAL_SHARE,
                                              random_state=DIGITS_SEED, stratify=digits.target)
    return tr_x, tr_y, va_x, va_y


def _digits_classes(data):
    return [str(i) for i in range(10)]


def _load_digits(is_train, data, transform):
    tr_x, tr_y, va_x, va_y = _digits_split()
    images, labels = (tr_x, tr_y) if is_train else (va_x, va_y)
    return ArrayImages(images, labels, _digits_classes(data), transform)


# ----------------------------------------------------------------------------- public API

_SOURCES = {  # data_set -> (class-name function, loader)
    "CIFAR10": (_cifar_classes, _load_cifar),
    "CIFAR100": (_cifar_classes, _load_cifar),
    "TINY_IMAGENET": (_tiny_classes, _load_tiny),
    "IMNET": (_imnet_classes, _load_imnet),
    "image_folder": (_image_folder_classes, _load_image_folder),
    "DIGITS": (_digits_classes, _load_digits),
}


def _source(data):
    if data.data_set not in _SOURCES:
        raise UserError(f"unknown --data_set {data.data_set!r}; choose from {', '.join(DATA_SETS)}")
    return _SOURCES[data.data_set]


def class_names(args):
    """Class names in label order (wnids, CIFAR names, folder names, '0'..'9').

    Args:
        args: DataConfig (or a namespace with its fields).
    """
    data = DataConfig.of(args)
    return _source(data)[0](data)


def build_dataset(is_train, args, augment=None):
    """Build the train or eval split of `args.data_set`; returns (dataset, nb_classes).

    Args:
        is_train: True for the training split, False for evaluation.
        args: DataConfig (or the official flags' namespace, read into one).
        augment: use the training transform (default: is_train); False gives the training
            images through the deterministic evaluation transform (pruning calibration).
    """
    data = DataConfig.of(args)
    loader = _source(data)[1]
    dataset = loader(is_train, data, build_transform(is_train if augment is None else augment, data))
    if len(dataset) == 0:
        raise UserError(f"{data.data_set}: the {'train' if is_train else 'eval'} split has no images")
    nb_classes = len(dataset.classes)
    logger.info("%s %s split: %d images, %d classes", data.data_set,
                "train" if is_train else "eval", len(dataset), nb_classes)
    return dataset, nb_classes


def _posterize(img, bits_to_keep, **_):
    """timm's posterize for every Pillow: keeping 0 bits gives a black image, as Pillow < 13 did
    (Pillow 13 refuses bits < 1, which RandAugment draws at magnitude 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _pillow_safe(transform):
    """Swap timm's posterize for `_posterize` in the auto-augment ops of `transform`."""
    for t in transform.transforms:
        ops = list(getattr(t, "ops", ())) + [op for sub in getattr(t, "policy", ()) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize
    return transform


def _train_transform(data, mean, std):
    """timm's training pipeline; small inputs get the official random crop with padding."""
    aa = data.aa if data.aa and str(data.aa).lower() != "none" else None
    transform = create_transform(
        input_size=data.input_size, is_training=True, color_jitter=data.color_jitter,
        auto_augment=aa, interpolation=data.train_interpolation, re_prob=data.reprob,
        re_mode=data.remode, re_count=data.recount, mean=mean, std=std,
        hflip=0.0 if data.data_set == "DIGITS" else 0.5)  # a mirrored digit is another glyph
    if data.input_size <= 32:
        # official rule: RandomCrop(padding=4) replaces RandomResizedCrop; the resize first
        # brings smaller images (the 8x8 digits) to input_size and leaves 32-px CIFAR as is
        transform.transforms[0] = transforms.Compose([
            transforms.Resize(data.input_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomCrop(data.input_size, padding=4)])
    return _pillow_safe(transform)


def _eval_resize(data):
    """Resize steps of the eval pipeline (official: warp at >= 384, else resize by crop_pct)."""
    size, bicubic = data.input_size, transforms.InterpolationMode.BICUBIC
    if size >= 384:
        return [transforms.Resize((size, size), interpolation=bicubic)]
    if size <= 32:  # no crop margin at CIFAR size; upscales the 8x8 digits
        return [transforms.Resize(size, interpolation=bicubic), transforms.CenterCrop(size)]
    crop_pct = data.crop_pct if data.crop_pct is not None else 224 / 256
    return [transforms.Resize(int(size / crop_pct), interpolation=bicubic), transforms.CenterCrop(size)]


def build_transform(is_train, args):
    """The official ConvNeXt transforms.

    Args:
        is_train: training pipeline (timm create_transform: RandAugment `aa`, color jitter,
            random erasing `reprob/remode/recount`) or evaluation (resize + center crop).
        args: DataConfig (or a namespace with its fields).
    """
    data = DataConfig.of(args)
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if data.imagenet_default_mean_and_std
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    if is_train:
        return _train_transform(data, mean, std)
    return transforms.Compose(_eval_resize(data) + [transforms.ToTensor(),
                                                    transforms.Normalize(mean, std)])
