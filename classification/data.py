"""Dataset folders: the train/ and val/ ImageFolders (class lists checked against each other, --cache-dataset),
the reference transforms, the one policy for reading image files, and torch DataLoaders whose workers
survive stop signals. loaders.py builds the loaders of each --dl-worker-type from these.
"""
import atexit
import functools
import hashlib
import multiprocessing.resource_tracker
import os
import signal
import sys

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import transforms

from . import faults, output_folder, progress, samplers
from .cli import STOP_SIGNALS, UsageError, end_loader_workers, stop_signals_blocked

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


AUTO_AUGMENT = ('ra', 'ta_wide', 'augmix', 'imagenet')


def auto_augment_transform(name, ra_magnitude=9, augmix_severity=3):
    """torchvision's policy for --auto-augment (the names of torchvision's references)."""
    if name == 'ra':
        return transforms.RandAugment(magnitude=ra_magnitude)
    if name == 'ta_wide':
        return transforms.TrivialAugmentWide()
    if name == 'augmix':
        return transforms.AugMix(severity=augmix_severity)
    return transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET)


def train_transform(crop_size=224, auto_augment=None, random_erase=0.0, ra_magnitude=9, augmix_severity=3):
    """The reference augmentation (RandomResizedCrop + flip), plus torchvision's --auto-augment policy and
    --random-erase as its references add them."""
    steps = [transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip()]
    if auto_augment:
        steps.append(auto_augment_transform(auto_augment, ra_magnitude, augmix_severity))
    steps += [transforms.ToTensor(), transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    if random_erase > 0:
        steps.append(transforms.RandomErasing(p=random_erase))
    return transforms.Compose(steps)


def plain_crop_transform(resize_size=256, crop_size=224):
    """Training without scale/aspect augmentation (the LR-collapse recipe's last phase, spec 2.5): a random
    crop of the image resized to its validation size, and the flip."""
    return transforms.Compose([
        transforms.Resize(resize_size),
        transforms.RandomCrop(crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def eval_transform(resize_size=256, crop_size=224):
    return transforms.Compose([
        transforms.Resize(resize_size),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


class UnreadableImage(UsageError):
    """An image file that cannot be decoded; the message names the file.

    DataLoader re-raises a worker's exception as `type(exc)(long text with the worker traceback)`;
    keeping only the last line of that text gives the user the same one line either way.
    """

    def __init__(self, message):
        lines = [line for line in str(message).splitlines() if line.strip()]
        last = lines[-1] if lines else ''
        super().__init__(last.split(f'{type(self).__name__}: ', 1)[-1])

    @classmethod
    def for_file(cls, path, reason):
        return cls(f"--data-path: cannot decode image '{path}' ({reason}); remove or replace the file")


# The one size limit of both loaders, checked from the file's header before any pixel is decoded: PIL's
# default Image.MAX_IMAGE_PIXELS. Alone, PIL would only warn up to twice that and raise its own error above,
# and libjpeg-turbo (the FAST loader) decodes any size.
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(UnreadableImage):
    """An image over MAX_IMAGE_PIXELS; the one-line message names the file and its size."""


def check_image_size(path, width, height):
    pixels = width * height
    if pixels > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"--data-path: image '{path}' is {width}x{height} ({pixels:,} pixels), more than the "
                            f'limit of {MAX_IMAGE_PIXELS:,} pixels; shrink or remove it')


def open_image(fp, path):
    """PIL image of an open file, its header read and checked against MAX_IMAGE_PIXELS, pixels not yet decoded."""
    from PIL import Image
    pil_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # the check below replaces PIL's
    try:
        img = Image.open(fp)
    finally:
        Image.MAX_IMAGE_PIXELS = pil_limit
    check_image_size(path, *img.size)
    return img


def to_rgb(img):
    """RGB PIL image. 16-bit greyscale (PNG, TIFF: modes I;16*, I) keeps its high byte, as PIL does for
    16-bit colour; PIL's own convert('RGB') would clip every value above 255 to white."""
    if img.mode == 'I' or img.mode.startswith('I;16'):
        from PIL import Image
        grey = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(grey.astype(np.uint8)).convert('RGB')
    return img.convert('RGB')


def checked_pil_loader(path):
    """ImageFolder's PIL loader, with decode failures reported as UnreadableImage naming the file."""
    from PIL import UnidentifiedImageError
    try:
        with open(path, 'rb') as f:
            return to_rgb(open_image(f, path))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise UnreadableImage.for_file(path, f'{type(err).__name__}: {err}') from None


def check_split_dir(data_path, split):
    """The folder of one split, or a clear error when it is missing."""
    path = os.path.join(data_path, split)
    if not os.path.isdir(data_path):
        raise UsageError(f"--data-path: '{data_path}' does not exist; it must hold train/ and val/ "
                         'folders with one sub-folder of images per class')
    if not os.path.isdir(path):
        raise UsageError(f"--data-path: '{path}' does not exist; expected {split}/<class>/<image> "
                         f"under '{data_path}'")
    return path


def class_folders(split_dir):
    """The sorted class folder names of a split (torchvision's find_classes), or a clear error."""
    try:
        return torchvision.datasets.folder.find_classes(split_dir)[0]
    except FileNotFoundError:
        raise UsageError(f"--data-path: '{split_dir}' has no class folders; expected <class>/<image> "
                         'under it') from None


def refuse_unknown_classes(classes, known, split_dir, train_dir):
    unknown = [name for name in classes if name not in known]
    if unknown:
        more = f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''
        raise UsageError(f"--data-path: class folder '{unknown[0]}'{more} in '{split_dir}' is not a class "
                         f"of '{train_dir}'; every validation class must be a training class: remove it "
                         'or add training images for it')


def check_class_lists(train_dir, val_dir):
    """Refuse a validation class that training does not have (its labels would mean other classes); note the
    training classes that validation lacks. Lists only the class folders, so it is quick on any dataset."""
    train_classes = class_folders(train_dir)
    val_classes = class_folders(val_dir)
    refuse_unknown_classes(val_classes, set(train_classes), val_dir, train_dir)
    missing = sorted(set(train_classes) - set(val_classes))
    if missing:
        shown = ', '.join(missing[:5]) + (', ...' if len(missing) > 5 else '')
        print(f"note: {len(missing)} of {len(train_classes)} training classes have no folder in '{val_dir}' "
              f'({shown}): they are not evaluated')


class ListedImageFolder(torchvision.datasets.ImageFolder):
    """An ImageFolder whose classes and file list are given (scan() or --cache-dataset's file), read with
    checked_pil_loader. A validation split's classes are the training split's, whichever folders it has."""

    def __init__(self, root, transform, listing):
        self._listing = listing
        super().__init__(root, transform=transform, loader=checked_pil_loader)

    def find_classes(self, directory):
        return self._listing['classes'], self._listing['class_to_idx']

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return self._listing['samples']


def scan(root, labels_from=None, show_progress=True):
    """Listing of root: classes, class_to_idx, its class folders and samples. With labels_from (the
    training dataset), the classes and labels are that dataset's, and a class it lacks is an error.
    show_progress: a progress line on stderr while the scan takes more than a few seconds (progress.py)."""
    folders = class_folders(root)
    if labels_from is None:
        classes, class_to_idx = folders, {name: index for index, name in enumerate(folders)}
    else:
        refuse_unknown_classes(folders, labels_from.class_to_idx, root, labels_from.root)
        classes, class_to_idx = list(labels_from.classes), dict(labels_from.class_to_idx)
    samples = list_images(root, folders, class_to_idx, show_progress)
    return dict(classes=classes, class_to_idx=class_to_idx, folders=folders, samples=samples)


def class_images(root, name, label, extensions=torchvision.datasets.folder.IMG_EXTENSIONS):
    """(path, label) of the images under root/name, in torchvision make_dataset's order (its walk follows folder
    links too), except that a link back to a folder it is inside is not entered: torchvision followed such a loop
    about 40 levels deep (until ELOOP) and listed every image below it again at each level. Says so in a note."""
    walked = []
    for folder, subfolders, files in os.walk(os.path.join(root, name), followlinks=True):
        here = os.path.realpath(folder)
        for sub in list(subfolders):
            target = os.path.realpath(os.path.join(folder, sub))
            if here == target or here.startswith(target + os.sep):
                subfolders.remove(sub)  # os.walk descends only into what is left (top-down)
                print(f"note: '{os.path.join(folder, sub)}' links back to '{target}', a folder it is in; not read "
                      'again', file=sys.stderr)
        walked.append((folder, files))
    return [(os.path.join(folder, file), label) for folder, files in sorted(walked) for file in sorted(files)
            if torchvision.datasets.folder.has_file_allowed_extension(file, extensions)]


def list_images(root, folders, class_to_idx, show_progress=True):
    """(path, label) of every image under root's class `folders`, in torchvision make_dataset's order, one
    class folder at a time so that the scan can show its progress; an empty class folder is an error."""
    samples, empty = [], []
    extensions = torchvision.datasets.folder.IMG_EXTENSIONS
    with progress.Progress(f'Scanning {root}', total=len(folders), unit='class folders',
                           enabled=show_progress) as shown:
        for done, name in enumerate(sorted(folders), start=1):
            found = class_images(root, name, class_to_idx[name], extensions)
            if not found:
                empty.append(name)
            samples += found
            shown.update(done, f'{len(samples):,} images')
    if empty:  # torchvision's message, for all of them at once
        raise UsageError(f"--data-path: Found no valid file for the classes {', '.join(empty)}. Supported "
                         f"extensions are: {', '.join(extensions)} (under '{root}'); every class folder needs at "
                         'least one image (.jpg, .jpeg, .png, ...)')
    return samples


# --- --cache-dataset: the file list of each split, kept under --output-dir ---------------------------------------
#
# A cached list is used only while every folder it was read from is unchanged: the split folder, each class
# folder and each folder holding images keep the inode and modification time they had (a folder's mtime
# changes when an entry is added, removed or renamed in it). That is one stat per folder, about a thousand
# on ImageNet, against a scan of every file.

CACHE_FORMAT = 2


def dataset_cache_dir(output_dir):
    """Where --cache-dataset keeps its files, or None (with a note) when there is no --output-dir."""
    if not output_dir:
        print('note: --cache-dataset needs an --output-dir to keep the file lists in: scanning the folders')
        return None
    return os.path.join(output_dir, '.dataset-cache')


def cache_file(cache_dir, root):
    absolute = os.path.abspath(root)
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:10]
    return os.path.join(cache_dir, f'{os.path.basename(absolute)}-{digest}.pt')


def folder_stamps(root, folders):
    """Relative folder -> [inode, mtime_ns], the part of a folder's stat that changes with its entries."""
    stamps = {}
    for folder in folders:
        stat = os.stat(os.path.join(root, folder))
        stamps[folder] = [stat.st_ino, stat.st_mtime_ns]
    return stamps


def watched_folders(root, listing):
    """'.', the class folders and every folder that holds a listed image (nested ones too)."""
    holding = {path[:path.rfind(os.sep)] for path, _ in listing['samples']}
    return sorted({'.', *listing['folders'], *(os.path.relpath(folder, root) for folder in holding)})


def cache_entry(root, listing):
    """What the cache file holds: the listing and the folders' stamps. Image paths are relative to root and
    joined by NUL (never part of a file name), labels one tensor: torch.load(weights_only=True) reads
    ImageNet's list in a fraction of a second, against seconds for 1.28M small lists."""
    start = len(os.path.join(root, ''))
    return dict(format=CACHE_FORMAT, classes=listing['classes'], class_to_idx=listing['class_to_idx'],
                folders=listing['folders'], paths='\0'.join(path[start:] for path, _ in listing['samples']),
                labels=torch.tensor([label for _, label in listing['samples']], dtype=torch.int64),
                stamps=folder_stamps(root, watched_folders(root, listing)))


def listing_of(root, entry):
    prefix = os.path.join(root, '')
    paths = entry['paths'].split('\0') if entry['paths'] else []
    return dict(classes=entry['classes'], class_to_idx=entry['class_to_idx'], folders=entry['folders'],
                samples=[(prefix + path, label) for path, label in zip(paths, entry['labels'].tolist())])


def stale_reason(root, entry, labels_from):
    """Why a cache entry no longer describes root's folders, or None while it does."""
    if not isinstance(entry, dict) or entry.get('format') != CACHE_FORMAT:
        return 'written by another version'
    folders = class_folders(root)
    present, cached = set(folders), set(entry['folders'])
    added = [name for name in folders if name not in cached]
    removed = [name for name in entry['folders'] if name not in present]
    if added or removed:
        return f"class folder '{(added or removed)[0]}' {'added' if added else 'removed'}"
    if labels_from is not None and entry['class_to_idx'] != labels_from.class_to_idx:
        return f"the classes of '{labels_from.root}' changed"
    for folder, stamp in entry['stamps'].items():
        try:
            changed = folder_stamps(root, [folder])[folder] != stamp
        except OSError:
            changed = True
        if changed:
            kind = 'class folder' if folder in present else 'folder'
            return f"{kind} '{folder}' changed" if folder != '.' else f"'{root}' changed"
    return None


def read_cache(path, root, labels_from):
    """The listing cached in path while it is still current, else None (saying why when there was one)."""
    if not os.path.exists(path):
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except Exception as err:  # a damaged or foreign file is only a reason to scan again
        print(f'cache of {root} is unreadable ({type(err).__name__}): rescanning')
        return None
    reason = stale_reason(root, entry, labels_from)
    if reason:
        print(f'cache of {root} is stale ({reason}): rescanning')
        return None
    print(f'Loading file list of {root} from {path}')
    return listing_of(root, entry)


def write_cache(path, root, listing):
    print(f'Saving file list of {root} to {path}')
    try:
        entry = cache_entry(root, listing)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        output_folder.atomic_save(entry, path, 'file list')
    except (OSError, RuntimeError, output_folder.SaveFailed) as err:  # torch.save: some as RuntimeError
        print(f'note: --cache-dataset: cannot write {path} ({err}); the folders will be scanned again next run')


def image_folder(root, transform, labels_from=None, cache_dir=None, is_main=True):
    """ImageFolder over root, with a clear error for empty class folders or an empty split.

    labels_from: the training dataset, whose labels a validation split takes. cache_dir: where
    --cache-dataset keeps the file list (None: always scan); only the main process writes it and shows the
    scan's progress.
    """
    path = cache_file(cache_dir, root) if cache_dir else None
    listing = read_cache(path, root, labels_from) if path else None
    if listing is None:
        listing = scan(root, labels_from, show_progress=is_main)
        if path and is_main:
            write_cache(path, root, listing)
    return ListedImageFolder(root, transform, listing)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes (and the forkserver they come from) start with the stop signals
    blocked: a SIGTERM sent to the whole process group, as clusters send it, must reach only the trainer,
    which finishes its step and saves. Before, the forkserver died of it and took every worker with it
    ('DataLoader worker exited unexpectedly'), losing the run. A worker that dies all the same (the
    out-of-memory killer) stops the run after the step, which saves (faults.surviving_worker_loss)."""

    def __iter__(self):
        if self.num_workers == 0:
            return super().__iter__()
        faults.ignore_torchs_worker_sigchld()
        return faults.surviving_worker_loss(self, self._start_workers)

    def _start_workers(self):
        with stop_signals_blocked():
            # Starting multiprocessing's resource tracker unblocks SIGTERM in this thread (rather than restore
            # the mask): start it first, then block again for the forkserver and workers.
            multiprocessing.resource_tracker.ensure_running()
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            return super().__iter__()


def end_with_trainer(trainer_pid):
    """End this loader worker when the trainer process ends, however it ends (kill -9 included).

    Workers forked by multiprocessing's forkserver are its children, not the trainer's, and they hold the pipe whose
    end tells the forkserver that its clients are gone: after a kill -9 of the trainer, torch's own watchdog (is the
    parent still there?) saw the forkserver alive, the forkserver saw its workers alive, and all of them, deaf to
    stop signals, lived on for good. A pidfd of the trainer becomes readable when it exits."""
    import select
    import threading
    try:
        trainer = os.pidfd_open(trainer_pid)
    except ProcessLookupError:  # the trainer died while this worker started (a rank killed as validation began)
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): torch's parent watchdog is all there is
        return

    def wait_for_trainer():
        select.select([trainer], [], [])
        os._exit(1)
    threading.Thread(target=wait_for_trainer, name='end-with-trainer', daemon=True).start()


def start_worker(worker_id, trainer_pid):
    """worker_init_fn: per-worker seeds, stop signals left to the trainer, and an end with the trainer's."""
    samplers.seed_worker(worker_id)
    end_with_trainer(trainer_pid)
    sys.excepthook = quiet_when_the_trainer_is_gone(sys.excepthook)


def quiet_when_the_trainer_is_gone(excepthook):
    """multiprocessing's resource sharer, which hands a batch's file descriptors to the trainer from a thread of the
    worker, reports a failed hand-over through sys.excepthook: when the trainer died (a killed rank) that printed a
    ConnectionResetError traceback into the job's log. A broken connection is the trainer's end, not news."""
    def hook(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            excepthook(kind, value, traceback)
    return hook


def worker_options(workers, start_method=None):
    """DataLoader options for `workers` persistent worker processes, which ignore SIGTERM (seed_worker) and end
    with the trainer (end_with_trainer).

    multiprocessing's own clean-up at exit ends workers with SIGTERM and then waits for them, so an exit
    hook that runs before it (atexit runs hooks in reverse order) ends any that are left.
    """
    if workers <= 0:
        return dict(num_workers=0)
    atexit.unregister(end_loader_workers)  # registered once, whatever the number of loaders
    atexit.register(end_loader_workers)
    return dict(num_workers=workers, worker_init_fn=functools.partial(start_worker, trainer_pid=os.getpid()),
                persistent_workers=True,
                multiprocessing_context=start_method)


def make_loader(dataset, sampler, *, train, batch_size, workers, placement, seed=0):
    """A torch DataLoader as the reference uses it, plus worker seeding and persistent workers; pinned memory
    and the workers' start method are the device layer's (`placement`, devices.LoaderPlacement).

    The loader draws its worker seeds from its own generator, never from the global RNG, so the
    global RNG (dropout) runs the same whether an epoch starts workers afresh or reuses them.
    """
    extra = dict(pin_memory=placement.pin_memory, generator=torch.Generator().manual_seed(seed),
                 **worker_options(workers, placement.worker_start_method))
    if train:
        return SignalSafeLoader(dataset, batch_sampler=samplers.TrainBatchSampler(sampler, batch_size), **extra)
    return SignalSafeLoader(dataset, batch_size=batch_size, sampler=sampler, **extra)
