"""The data set-up on real folders a test writes and then changes or damages: train/val class lists,
the --cache-dataset file list, and the image policy both loaders share (size limit, 16-bit PNGs)."""
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from conftest import TINY_IMAGES, run_script

from classification import data, devices, distributed, fast_jpeg, loaders
import main as googlenet
import train
from classification.cli import UsageError

CROP, RESIZE, VAL_CROP = 32, 40, 32  # TINY_IMAGES


ONE_RANK = distributed.Ranks(rank=0, world_size=1, local_rank=0, distributed=False)


def parsed_args(root, *extra, parser=train.get_args_parser):
    return parser().parse_args(['--data-path', root, '--device', 'cpu', '--workers', '0', '--dl-worker-type', 'MP',
                                *extra])


def load(root, *extra):
    """train.py's datasets (no loaders) with its flags: (train dataset, val dataset)."""
    args = parsed_args(root, *TINY_IMAGES, *extra)
    cache_dir = data.dataset_cache_dir(args.output_dir) if args.cache_dataset else None
    return loaders.load_datasets(root, train_crop_size=args.train_crop_size, val_resize_size=args.val_resize_size,
                                 val_crop_size=args.val_crop_size, cache_dir=cache_dir)


def labels_by_class(dataset):
    """Class folder name -> the set of labels its samples get."""
    result = {}
    for path, label in dataset.samples:
        result.setdefault(os.path.basename(os.path.dirname(path)), set()).add(label)
    return result


def add_class(split_dir, name, source_image):
    os.makedirs(os.path.join(split_dir, name))
    shutil.copy(source_image, os.path.join(split_dir, name, 'copied.JPEG'))


# --- item: train and val class lists -------------------------------------------------------------------------------

def test_val_missing_a_train_class_keeps_the_training_labels_and_says_so(fresh_dataset, capsys):
    root = fresh_dataset(classes=3, train_per_class=2, val_per_class=2)
    shutil.rmtree(os.path.join(root, 'val', 'class_00'))
    dataset, dataset_test = load(root)
    assert labels_by_class(dataset_test) == {'class_01': {1}, 'class_02': {2}} == \
        {c: {dataset.class_to_idx[c]} for c in ('class_01', 'class_02')}
    assert dataset_test[0][1] == dataset.class_to_idx['class_01']
    assert dataset_test.classes == dataset.classes and dataset_test.class_to_idx == dataset.class_to_idx
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and 'class_00' in notes[0] and 'not evaluated' in notes[0], notes


@pytest.mark.parametrize('trainer', ['train.py', 'main.py'])
def test_val_class_unknown_to_train_is_refused_before_any_scan(fresh_dataset, capsys, trainer):
    root = fresh_dataset(classes=3, train_per_class=2, val_per_class=2)
    val_dir, train_dir = os.path.join(root, 'val'), os.path.join(root, 'train')
    add_class(val_dir, 'class_zz', os.path.join(val_dir, 'class_00', 'val_00_00000.JPEG'))
    with pytest.raises(UsageError) as raised:
        if trainer == 'train.py':
            train.load_data(root, parsed_args(root, *TINY_IMAGES), devices.create('cpu'), ONE_RANK)
        else:
            googlenet.load_data(parsed_args(root, parser=googlenet.get_args_parser), devices.create('cpu'), ONE_RANK)
    message = str(raised.value)
    assert "'class_zz'" in message and val_dir in message and train_dir in message and '\n' not in message
    assert 'Loading training data' not in capsys.readouterr().out  # refused before the (long) file scan


# --- item: --cache-dataset -----------------------------------------------------------------------------------------

def test_cache_is_written_under_the_output_dir_and_never_in_home(fresh_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    out = tmp_path / 'out'
    first, _ = load(root, '--cache-dataset', '--output-dir', str(out))
    assert len(os.listdir(out / '.dataset-cache')) == 2
    assert not (tmp_path / 'home').exists()
    capsys.readouterr()
    again, again_test = load(root, '--cache-dataset', '--output-dir', str(out))
    log = capsys.readouterr().out
    assert log.count('Loading file list of') == 2 and 'stale' not in log
    assert again.samples == first.samples and again.class_to_idx == first.class_to_idx


def test_cache_without_an_output_dir_is_skipped_with_a_note(fresh_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    dataset, _ = load(root, '--cache-dataset', '--output-dir', '')
    assert len(dataset) == 4 and not (tmp_path / 'home').exists()
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 1 and '--cache-dataset' in notes[0] and '--output-dir' in notes[0], notes


def test_unwritable_cache_is_a_note_not_a_crash(fresh_dataset, tmp_path, capsys):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    out = tmp_path / 'out'
    out.mkdir()
    (out / '.dataset-cache').write_text('a file where the cache folder would go')  # root ignores chmod
    dataset, dataset_test = load(root, '--cache-dataset', '--output-dir', str(out))
    assert len(dataset) == 4 and len(dataset_test) == 4
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith('note:')]
    assert len(notes) == 2 and all('cannot write' in note for note in notes), notes


def test_damaged_cache_is_rescanned(fresh_dataset, tmp_path, capsys):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=2)
    out = tmp_path / 'out'
    load(root, '--cache-dataset', '--output-dir', str(out))
    for name in os.listdir(out / '.dataset-cache'):
        (out / '.dataset-cache' / name).write_bytes(b'PK\x03\x04' + b'\0' * 40)
    capsys.readouterr()
    dataset, _ = load(root, '--cache-dataset', '--output-dir', str(out))
    assert len(dataset) == 4
    assert capsys.readouterr().out.count('is unreadable') == 2


def rename_a_file(root):
    folder = os.path.join(root, 'train', 'class_01')
    os.rename(os.path.join(folder, 'train_01_00000.JPEG'), os.path.join(folder, 'renamed.JPEG'))


CHANGES = {
    'class added': (lambda root: add_class(os.path.join(root, 'train'), 'class_07',
                                           os.path.join(root, 'train', 'class_00', 'train_00_00000.JPEG')),
                    "class folder 'class_07' added"),
    'class removed': (lambda root: [shutil.rmtree(os.path.join(root, split, 'class_02')) for split in ('train', 'val')],
                      "class folder 'class_02' removed"),
    'file removed': (lambda root: os.remove(os.path.join(root, 'train', 'class_01', 'train_01_00001.JPEG')),
                     "class folder 'class_01' changed"),
    'file renamed': (rename_a_file, "class folder 'class_01' changed"),
    'file added': (lambda root: shutil.copy(os.path.join(root, 'train', 'class_00', 'train_00_00000.JPEG'),
                                            os.path.join(root, 'train', 'class_01', 'added.JPEG')),
                   "class folder 'class_01' changed"),
}


@pytest.mark.parametrize('change', list(CHANGES))
def test_cache_is_rescanned_when_the_folders_change_and_says_why(fresh_dataset, tmp_path, capsys, change):
    root = fresh_dataset(classes=3, train_per_class=3, val_per_class=1)
    out = str(tmp_path / 'out')
    load(root, '--cache-dataset', '--output-dir', out)
    make_change, reason = CHANGES[change]
    make_change(root)
    capsys.readouterr()
    dataset, _ = load(root, '--cache-dataset', '--output-dir', out)
    log = capsys.readouterr().out
    assert f"cache of {os.path.join(root, 'train')} is stale ({reason}): rescanning" in log, log
    on_disk = sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(root, 'train')) for f in files)
    assert sorted(path for path, _ in dataset.samples) == on_disk
    assert all(os.path.exists(path) for path, _ in dataset.samples)
    capsys.readouterr()
    load(root, '--cache-dataset', '--output-dir', out)
    assert 'stale' not in capsys.readouterr().out  # the rescan was cached


def test_val_cache_follows_a_change_of_the_training_classes(fresh_dataset, tmp_path, capsys):
    root = fresh_dataset(classes=3, train_per_class=2, val_per_class=2)
    out = str(tmp_path / 'out')
    load(root, '--cache-dataset', '--output-dir', out)
    # a training class that sorts first shifts every training label; val's folders do not change
    add_class(os.path.join(root, 'train'), 'aaa_new', os.path.join(root, 'train', 'class_00', 'train_00_00000.JPEG'))
    dataset, dataset_test = load(root, '--cache-dataset', '--output-dir', out)
    assert labels_by_class(dataset_test) == {c: {dataset.class_to_idx[c]} for c in ('class_00', 'class_01', 'class_02')}
    assert dataset.class_to_idx['class_00'] == 1


# --- item: one image policy for both loaders -----------------------------------------------------------------------

def claim_size(jpeg_bytes, width, height):
    """The JPEG with its frame header (SOF) claiming width x height: enough for any header-only check."""
    for marker in (b'\xff\xc0', b'\xff\xc1', b'\xff\xc2'):
        at = jpeg_bytes.find(marker)
        if at >= 0:
            return jpeg_bytes[:at + 5] + struct.pack('>HH', height, width) + jpeg_bytes[at + 9:]
    raise AssertionError('no SOF marker')


def png_claiming(width, height):
    """A PNG whose header (IHDR, valid CRC) claims width x height (8-bit RGB); the pixel data is short."""
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    header = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(b'\0' * 64))
            + chunk(b'IEND', b''))


def one_val_image_replaced(root, name, content):
    """Replace the val folder's only image with `content` under `name`; return the new path."""
    folder = os.path.join(root, 'val', 'class_00')
    for old in os.listdir(folder):
        os.remove(os.path.join(folder, old))
    path = os.path.join(folder, name)
    with open(path, 'wb') as f:
        f.write(content)
    return path


def mp_pixels(path):
    """The reference (MP) validation pipeline's pixels before ToTensor's scaling and normalisation."""
    to_pixels = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(VAL_CROP),
                                    transforms.PILToTensor()])
    return to_pixels(data.checked_pil_loader(path))


def fast_pixels(path):
    batch, _ = fast_jpeg.EvalBatches([(path, 0)], RESIZE, VAL_CROP)[[0]]
    return batch[0]


SIZES = {  # name: (width, height, file maker)
    'JPEG 14000x14000': (14000, 14000, 'jpeg'),
    'JPEG just above the limit': (9460, 9459, 'jpeg'),  # 89,482,140 pixels: PIL alone only warns
    'PNG 14000x14000': (14000, 14000, 'png'),
}


@pytest.mark.parametrize('size', list(SIZES))
def test_huge_image_is_refused_from_its_header_the_same_way_by_both_loaders(fresh_dataset, size, recwarn):
    width, height, kind = SIZES[size]
    root = fresh_dataset(classes=1, train_per_class=1, val_per_class=1)
    source = os.path.join(root, 'val', 'class_00', 'val_00_00000.JPEG')
    with open(source, 'rb') as f:
        content = claim_size(f.read(), width, height) if kind == 'jpeg' else png_claiming(width, height)
    path = one_val_image_replaced(root, f'huge.{kind}', content)
    expected = (f"--data-path: image '{path}' is {width}x{height} ({width * height:,} pixels), more than the "
                f"limit of 89,478,485 pixels; shrink or remove it")
    messages = []
    for decode in (mp_pixels, fast_pixels, lambda p: fast_jpeg.TrainBatches([(p, 0)], CROP, seed=0)[(0, [0])]):
        with pytest.raises(data.ImageTooLarge) as raised:
            decode(path)
        messages.append(str(raised.value))
    assert messages == [expected] * 3
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_image_at_the_limit_is_accepted():
    data.check_image_size('x.JPEG', 89_478_485, 1)
    with pytest.raises(data.ImageTooLarge):
        data.check_image_size('x.JPEG', 89_478_486, 1)


def test_16_bit_png_is_scaled_to_8_bits_by_both_loaders(fresh_dataset):
    root = fresh_dataset(classes=1, train_per_class=1, val_per_class=1)
    mid_grey = np.full((48, 64), 0x8080, dtype=np.uint16)  # 32896 of 65535: 128 of 255
    path = one_val_image_replaced(root, 'grey16.png', b'')
    Image.fromarray(mid_grey).save(path)
    assert Image.open(path).mode == 'I;16'
    mp, fast = mp_pixels(path), fast_pixels(path)
    assert mp.dtype == fast.dtype == torch.uint8
    assert (mp == 128).all() and (fast == 128).all(), (mp.float().mean(), fast.float().mean())


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # every 8-bit level, as 16 bits
    path = str(tmp_path / 'ramp.png')
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(data.checked_pil_loader(path))
    assert pixels.shape == (16, 16, 3) and (pixels == np.arange(256).reshape(16, 16, 1)).all()
    with open(path, 'rb') as f:
        assert (fast_jpeg.decode_with_pil(f.read(), path) == pixels).all()


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['MP', 'FAST'])
def test_huge_image_stops_either_loader_with_the_same_line_and_exit_2(fresh_dataset, tmp_path, loader):
    root = fresh_dataset(classes=2, train_per_class=2, val_per_class=1)  # the first training batch meets it
    source = os.path.join(root, 'train', 'class_01', 'train_01_00000.JPEG')
    with open(source, 'rb') as f:
        content = claim_size(f.read(), 14000, 14000)
    huge = os.path.join(root, 'train', 'class_01', 'huge.JPEG')
    with open(huge, 'wb') as f:
        f.write(content)
    result = run_script(['train.py', '--data-path', root, '--output-dir', str(tmp_path / 'out'), '--device', 'cpu',
                         '--model', 'resnet18', '--batch-size', '5', '--workers', '2', '--print-freq', '2',
                         '--dl-worker-type', loader, '--epochs', '1', *TINY_IMAGES], timeout=180)
    assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-1500:]
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if 'error:' in line]
    assert errors == [f"error: --data-path: image '{huge}' is 14000x14000 (196,000,000 pixels), more than the limit "
                      f"of 89,478,485 pixels; shrink or remove it"], result.stderr[-1500:]


def test_the_scan_lists_what_torchvision_lists_and_reads_a_folder_link_loop_once(fresh_dataset, capsys):
    import torchvision
    root = fresh_dataset(classes=2, train_per_class=3, val_per_class=1)
    train_dir = os.path.join(root, 'train')
    nested = os.path.join(train_dir, 'class_00', 'deeper')
    os.makedirs(nested)
    shutil.copy(os.path.join(train_dir, 'class_00', 'train_00_00000.JPEG'), os.path.join(nested, 'a.JPEG'))
    os.symlink(os.path.join(train_dir, 'class_01'), os.path.join(train_dir, 'class_00', 'linked'))  # not a loop
    expected = torchvision.datasets.ImageFolder(train_dir).samples
    assert data.scan(train_dir, show_progress=False)['samples'] == expected and len(expected) == 3 + 1 + 3 + 3

    os.symlink('..', os.path.join(nested, 'loop'))  # deeper/loop -> class_00: torchvision lists it ~40 times over
    assert data.scan(train_dir, show_progress=False)['samples'] == expected
    assert capsys.readouterr().err.count("links back to '") == 1


def test_a_loader_worker_does_not_report_the_broken_hand_over_to_a_trainer_that_died():
    """multiprocessing's resource sharer reports through sys.excepthook; a killed rank's worker printed a
    ConnectionResetError traceback into the job's log (seen on a CI run of the killed-rank test)."""
    seen = []
    hook = data.quiet_when_the_trainer_is_gone(lambda kind, value, tb: seen.append(kind))
    for kind in (ConnectionResetError, BrokenPipeError, EOFError, ValueError):
        hook(kind, kind(), None)
    assert seen == [ValueError]
