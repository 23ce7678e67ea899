"""datasets.py on real on-disk formats that each test writes itself (tiny)."""
import argparse
import dataclasses
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from common.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
                 "dog", "frog", "horse", "ship", "truck"]


def data_args(**kw):
    kw.setdefault("input_size", 32)
    return datasets.default_data_args(**kw)


def cifar_rows(n, seed):
    """n random CIFAR rows (3072 uint8: 1024 R, 1024 G, 1024 B, row-major) and labels."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), [int(x) for x in rng.integers(0, 10, n)]


def dump(obj, path, protocol=2):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_jpeg(path, size=16, value=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, 128)).save(path, "JPEG")


@pytest.fixture
def cifar10_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        data, labels = cifar_rows(4, i)
        dump({b"batch_label": b"training batch", b"labels": labels, b"data": data,
              b"filenames": [b"x.png"] * 4}, folder / f"data_batch_{i}", protocol=2 + i % 3)
    data, labels = cifar_rows(3, 99)
    dump({b"batch_label": b"testing batch", b"labels": labels, b"data": data}, folder / "test_batch")
    dump({b"num_cases_per_batch": 4, b"label_names": [n.encode() for n in CIFAR10_NAMES],
          b"num_vis": 3072}, folder / "batches.meta")
    return tmp_path


def test_cifar10_pickles_parent_or_folder(cifar10_pickles):
    for path in (cifar10_pickles, cifar10_pickles / "cifar-10-batches-py"):
        train, n = datasets.build_dataset(True, data_args(data_set="CIFAR10", data_path=str(path)))
        val, n_val = datasets.build_dataset(False, data_args(data_set="CIFAR10", data_path=str(path)))
        assert (len(train), len(val), n, n_val) == (20, 3, 10, 10)
        assert train.classes == CIFAR10_NAMES
        x, y = train[0]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
        assert val[2][0].shape == (3, 32, 32)
    names = datasets.class_names(data_args(data_set="CIFAR10", data_path=str(cifar10_pickles)))
    assert names == CIFAR10_NAMES


def test_cifar10_pixel_layout(cifar10_pickles):
    """Row layout R plane, G plane, B plane, row-major: pixel (x=5, y=2) comes back exactly."""
    data, labels = cifar_rows(3, 99)
    val, _ = datasets.build_dataset(False, data_args(data_set="CIFAR10", data_path=str(cifar10_pickles)))
    val.transform = None
    img, label = val[1]
    expected = tuple(int(data[1, c * 1024 + 2 * 32 + 5]) for c in range(3))
    assert img.size == (32, 32) and img.getpixel((5, 2)) == expected and label == labels[1]


def test_cifar100_pickles(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        data, _ = cifar_rows(n, n)
        dump({b"data": data, b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, folder / name)
    names = [f"class{i:03d}" for i in range(100)]
    dump({b"fine_label_names": [s.encode() for s in names], b"coarse_label_names": [b"a"]},
         folder / "meta")
    args = data_args(data_set="CIFAR100", data_path=str(tmp_path), input_size=48)
    train, n = datasets.build_dataset(True, args)
    val, _ = datasets.build_dataset(False, args)
    assert (len(train), len(val), n, train.targets) == (6, 2, 100, list(range(6)))
    assert train[0][0].shape == val[0][0].shape == (3, 48, 48)
    assert datasets.class_names(args) == names


def test_cifar_pickle_that_runs_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))
    dump({b"data": Evil(), b"labels": [0]}, folder / "test_batch")
    with pytest.raises(UserError, match="os.mkdir|posix.mkdir"):
        datasets.build_dataset(False, data_args(data_set="CIFAR10", data_path=str(tmp_path)))
    assert not marker.exists()


def make_class_folders(root, classes, per_class=2):
    for i, name in enumerate(classes):
        for j in range(per_class):
            write_jpeg(str(root / name / f"{j}.jpg"), 32, 20 * i + j)


@pytest.mark.parametrize("val_name", ["val", "test"])
def test_cifar_image_folders(tmp_path, val_name):
    make_class_folders(tmp_path / "train", CIFAR10_NAMES, 2)
    make_class_folders(tmp_path / val_name, CIFAR10_NAMES, 1)
    args = data_args(data_set="CIFAR10", data_path=str(tmp_path))
    train, n = datasets.build_dataset(True, args)
    val, _ = datasets.build_dataset(False, args)
    assert (len(train), len(val), n) == (20, 10, 10)
    assert train.classes == val.classes == CIFAR10_NAMES == datasets.class_names(args)
    assert train[3][0].shape == val[9][0].shape == (3, 32, 32)


def test_cifar_eval_data_path_is_the_eval_folder(tmp_path):
    make_class_folders(tmp_path / "train", CIFAR10_NAMES, 1)
    make_class_folders(tmp_path / "elsewhere", CIFAR10_NAMES, 3)
    args = data_args(data_set="CIFAR10", data_path=str(tmp_path),
                     eval_data_path=str(tmp_path / "elsewhere"))
    assert len(datasets.build_dataset(False, args)[0]) == 30


def test_cifar_folder_with_wrong_class_count(tmp_path):
    make_class_folders(tmp_path / "train", ["a", "b"], 1)
    with pytest.raises(UserError, match="holds 2 class folders, expected 10"):
        datasets.build_dataset(True, data_args(data_set="CIFAR10", data_path=str(tmp_path)))


WNIDS = ["n02124075", "n01443537", "n09999999"]  # not sorted on purpose


@pytest.fixture
def tiny_imagenet(tmp_path):
    """A raw tiny-imagenet-200 tree as distributed: 3 wnids, 2 train and 1-2 val images each."""
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS))
    for w in WNIDS:
        for j in range(2):
            write_jpeg(str(root / "train" / w / "images" / f"{w}_{j}.JPEG"))
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t8\t8\n")
    lines = []
    for k, w in enumerate(WNIDS + WNIDS[:2]):
        write_jpeg(str(root / "val" / "images" / f"val_{k}.JPEG"), value=k)
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t8\t8\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    write_jpeg(str(root / "test" / "images" / "test_0.JPEG"))
    return tmp_path


def test_tiny_imagenet_raw_tree(tiny_imagenet):
    for path in (tiny_imagenet, tiny_imagenet / "tiny-imagenet-200"):
        args = data_args(data_set="TINY_IMAGENET", data_path=str(path), input_size=64)
        train, n = datasets.build_dataset(True, args)
        val, _ = datasets.build_dataset(False, args)
        assert (len(train), len(val), n) == (6, 5, 3)
        assert train.classes == val.classes == sorted(WNIDS) == datasets.class_names(args)
        order = sorted(WNIDS)
        assert val.targets == [order.index(w) for w in WNIDS + WNIDS[:2]]
        assert sorted(train.targets) == [0, 0, 1, 1, 2, 2]
        assert train[0][0].shape == val[4][0].shape == (3, 64, 64)


def test_tiny_imagenet_class_sorted_val(tiny_imagenet, tmp_path):
    val_dir = tmp_path / "sorted_val"
    for w in WNIDS:
        write_jpeg(str(val_dir / w / "a.JPEG"))
    args = data_args(data_set="TINY_IMAGENET", data_path=str(tiny_imagenet), eval_data_path=str(val_dir))
    val, n = datasets.build_dataset(False, args)
    assert (len(val), n, val.targets) == (3, 3, [0, 1, 2])


def test_evaluating_alone_needs_only_the_val_folder(tiny_imagenet, tmp_path):
    """main.py --eval builds only the eval split: --data_path may be elsewhere."""
    val_dir = tiny_imagenet / "tiny-imagenet-200" / "val"
    args = data_args(data_set="TINY_IMAGENET", data_path=str(tmp_path / "nowhere"),
                     eval_data_path=str(val_dir))
    val, n = datasets.build_dataset(False, args)
    assert (len(val), n) == (5, 3)
    make_class_folders(tmp_path / "imnet_val", ["cat", "dog"], 1)
    args = data_args(data_set="IMNET", data_path=str(tmp_path / "nowhere"),
                     eval_data_path=str(tmp_path / "imnet_val"))
    assert datasets.build_dataset(False, args)[1] == 2
    args = args.replace(data_set="TINY_IMAGENET", eval_data_path=str(val_dir))
    with pytest.raises(UserError, match="no data set under"):  # training never guesses the root
        datasets.build_dataset(True, args)


def test_tiny_imagenet_unknown_val_class(tiny_imagenet):
    ann = tiny_imagenet / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_0.JPEG\tn00000001\t0\t0\t8\t8\n")
    with pytest.raises(UserError, match="n00000001"):
        datasets.build_dataset(False, data_args(data_set="TINY_IMAGENET", data_path=str(tiny_imagenet)))


def test_imnet_and_image_folder(tmp_path):
    make_class_folders(tmp_path / "train", ["cat", "dog", "eel"], 2)
    make_class_folders(tmp_path / "val", ["cat", "dog", "eel"], 1)
    args = data_args(data_set="IMNET", data_path=str(tmp_path), input_size=224)
    train, n = datasets.build_dataset(True, args)
    val, _ = datasets.build_dataset(False, args)
    assert (len(train), len(val), n) == (6, 3, 3) and val[0][0].shape == (3, 224, 224)
    args = data_args(data_set="image_folder", data_path=str(tmp_path / "train"),
                     eval_data_path=str(tmp_path / "val"), nb_classes=3)
    assert datasets.build_dataset(False, args)[1] == 3
    assert datasets.class_names(args) == ["cat", "dog", "eel"]


def test_imnet_val_class_that_train_lacks_is_refused(tmp_path):
    make_class_folders(tmp_path / "train", ["cat", "dog"], 1)
    make_class_folders(tmp_path / "val", ["cat", "dog", "eel"], 1)
    args = data_args(data_set="IMNET", data_path=str(tmp_path), input_size=32)
    with pytest.raises(UserError, match="class folders the training split lacks: eel"):
        datasets.build_dataset(False, args)


def test_corrupt_image_names_the_file_also_from_a_loader_worker(tmp_path):
    make_class_folders(tmp_path / "train", ["cat", "dog"], 2)
    bad = sorted((tmp_path / "train" / "dog").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:40])       # a cut-off JPEG
    args = data_args(data_set="image_folder", data_path=str(tmp_path / "train"), nb_classes=2)
    train, _ = datasets.build_dataset(True, args)
    loader = torch.utils.data.DataLoader(train, batch_size=4, num_workers=1)
    with pytest.raises(UserError) as err:
        next(iter(loader))
    assert str(err.value).startswith(f"cannot read image {bad}") and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["fewer labels", "label out of range"])
def test_cifar_labels_must_match_the_images(cifar10_pickles, damage):
    path = cifar10_pickles / "cifar-10-batches-py" / "data_batch_2"
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch[b"labels"] = batch[b"labels"][:-1] if damage == "fewer labels" else [10] + batch[b"labels"][1:]
    dump(batch, path)
    expected = "holds 4 images but 3 labels" if damage == "fewer labels" else "label 10 is outside 0..9"
    with pytest.raises(UserError, match=expected):
        datasets.build_dataset(True, data_args(data_set="CIFAR10", data_path=str(cifar10_pickles)))


def test_image_folder_errors(tmp_path):
    make_class_folders(tmp_path / "train", ["cat", "dog"], 1)
    args = data_args(data_set="image_folder", data_path=str(tmp_path / "train"), nb_classes=5)
    with pytest.raises(UserError, match="--nb_classes is 5 but .* holds 2 class folders"):
        datasets.build_dataset(True, args)
    args = args.replace(nb_classes=2)
    with pytest.raises(UserError, match="needs --eval_data_path"):
        datasets.build_dataset(False, args)


def test_digits_split():
    train, n = datasets.build_dataset(True, data_args(data_set="DIGITS"))
    val, _ = datasets.build_dataset(False, data_args(data_set="DIGITS"))
    assert (len(train), len(val), n) == (1437, 360, 10)
    assert train.classes == [str(i) for i in range(10)]
    assert np.bincount(val.targets).min() >= 35          # stratified: every digit present
    # the two splits partition the 1,797 images exactly: together they are the full set
    from sklearn.datasets import load_digits
    full = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    both = np.concatenate([train.images, val.images])[..., 0]
    assert sorted(x.tobytes() for x in both) == sorted(x.tobytes() for x in full)
    assert train.images.max() == 255 and train.images.shape[1:] == (8, 8, 3)
    x, y = train[0]
    assert x.shape == (3, 32, 32) and val[0][0].shape == (3, 32, 32)
    datasets._digits_split.cache_clear()                 # a fresh load gives the same split
    again, _ = datasets.build_dataset(False, data_args(data_set="DIGITS"))
    assert np.array_equal(again.images, val.images) and again.targets == val.targets


def test_transforms_follow_the_official_rules():
    small = datasets.build_transform(True, data_args(data_set="CIFAR10", input_size=32))
    first = small.transforms[0].transforms[-1]
    assert type(first).__name__ == "RandomCrop" and first.padding == 4
    big = datasets.build_transform(True, data_args(data_set="CIFAR10", input_size=64, aa="none"))
    assert type(big.transforms[0]).__name__ == "RandomResizedCropAndInterpolation"
    assert any(type(t).__name__ == "RandomErasing" for t in big.transforms)
    eval224 = datasets.build_transform(False, data_args(input_size=224))
    assert eval224.transforms[0].size == 256 and eval224.transforms[1].size == (224, 224)
    eval384 = datasets.build_transform(False, data_args(input_size=384, crop_pct=0.5))
    assert eval384.transforms[0].size == (384, 384)
    inception = datasets.build_transform(False, data_args(imagenet_default_mean_and_std=False))
    assert tuple(inception.transforms[-1].mean) == (0.5, 0.5, 0.5)
    digits = datasets.build_transform(True, data_args(data_set="DIGITS"))
    assert not any(type(t).__name__ == "RandomHorizontalFlip" for t in digits.transforms)


@pytest.mark.parametrize("data_set", ["CIFAR10", "CIFAR100", "TINY_IMAGENET", "IMNET"])
def test_missing_data_path(tmp_path, data_set):
    args = data_args(data_set=data_set, data_path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError) as err:
        datasets.build_dataset(True, args)
    assert "nowhere" in str(err.value) and "\n" not in str(err.value)
    if data_set.startswith("CIFAR"):
        assert "pickle" in str(err.value) and "train/ and val/ (or test/)" in str(err.value)


def test_unknown_data_set_names_the_field_and_the_command_line_its_flag():
    with pytest.raises(UserError, match="DataConfig.data_set must be one of CIFAR10, .*, got 'MNIST'") as e:
        data_args(data_set="MNIST")
    assert e.value.for_command_line().startswith("--data_set must be one of CIFAR10")
    official = argparse.Namespace(**{**dataclasses.asdict(data_args()), "data_set": "MNIST"})  # the official call
    with pytest.raises(UserError, match="DataConfig.data_set must be one of"):
        datasets.class_names(official)


def test_randaugment_posterize_to_zero_bits_works_on_any_pillow():
    """RandAugment at magnitude 10 keeps 0 bits: a black image, not Pillow 13's ValueError."""
    t = datasets.build_transform(True, data_args(data_set="CIFAR10", aa="rand-m10-mstd0-inc1"))
    rand_augment = next(s for s in t.transforms if type(s).__name__ == "RandAugment")
    op = next(o for o in rand_augment.ops if o.name == "PosterizeIncreasing")
    op.prob = 1.0
    out = op(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert out.size == (8, 8) and out.getextrema() == ((0, 0), (0, 0), (0, 0))
    for _ in range(200):  # the whole pipeline, with posterize drawn many times
        assert t(Image.new("RGB", (32, 32), (200, 100, 50))).shape == (3, 32, 32)
