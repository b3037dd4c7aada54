"""A pre-shrunk copy of an ImageFolder dataset, as FFCV's writer makes one (shrink_dataset.py; docs/data.md).

`run(source, dest, max_side, quality, workers)` writes dest/train and dest/val with the class folders and files of
source's (listed by data.scan, as the trainers list them), each image read as the trainers' loader reads it
(data.checked_pil_loader: no EXIF rotation, RGB) and stored as a JPEG whose longer side is at most max_side:

- larger images are resized (PIL's Lanczos, never upscaled, aspect kept to the pixel) and encoded at `quality`;
- a JPEG already within max_side is copied byte for byte (no second lossy generation: the trainers read the very
  pixels of the source); any other file within it (PNG, ...) is encoded at `quality`;
- a file keeps its name; one whose extension is not .jpg/.jpeg (any case) gets .jpg in place of its extension,
  or, when that name is taken in its folder, .jpg after its whole name (a.png beside a.jpg: a.png.jpg).

Each file is written to a temporary name beside it (output_folder.temp_path) and renamed into place, so a kill
never leaves a partial file under a final name. A rerun skips the files already there (a zero-length one, what a
crash of the machine can leave, is written again) and removes the temporary files a killed run left; dest keeps
the settings it was written with (SETTINGS_FILE) and a rerun with others is refused. A stop signal (SIGTERM,
Ctrl-C, SIGHUP) lets the files in progress finish, then ends the run with one line and exit status 128 + N.
An image the trainers could not read is skipped with one line naming it, counted, and makes the exit status 1.
"""
import collections
import json
import multiprocessing
import os
import shutil
import signal
import sys

from . import data, output_folder, progress
from .cli import CleanExit, UsageError, end_loader_workers, stop_signals_blocked

SPLITS = ('train', 'val')
JPEG_EXTENSIONS = ('.jpg', '.jpeg')
SETTINGS_FILE = '.shrink_dataset.json'  # in dest: the settings it was written with
RESAMPLE_GAP = 3.0  # PIL's reducing_gap: box-reduce by whole factors first, "indistinguishable from fair" resampling
IN_FLIGHT_PER_WORKER = 2  # files handed to a worker ahead: what a stop waits for
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def check_settings(max_side, quality, workers):
    if max_side < 1:
        raise UsageError(f'--max-side must be a positive number of pixels, got {max_side}')
    if not 1 <= quality <= 100:
        raise UsageError(f'--quality must be from 1 to 100 (JPEG quality), got {quality}')
    if workers < 0:
        raise UsageError(f'--workers must be 0 (in this process) or more, got {workers}')


def check_paths(source, dest):
    """Refuse a missing SOURCE, and a DEST that is SOURCE, inside it or holding it."""
    if not os.path.isdir(source):
        raise UsageError(f"SOURCE: '{source}' is not a folder; give the dataset folder that holds train/ and val/")
    real_source, real_dest = os.path.realpath(source), os.path.realpath(dest)
    if real_dest == real_source:
        raise UsageError(f"DEST: '{dest}' is SOURCE itself; give another folder for the shrunk copy")
    if os.path.commonpath([real_source, real_dest]) == real_source:
        raise UsageError(f"DEST: '{dest}' is inside SOURCE '{source}'; give a folder outside it")
    if os.path.commonpath([real_source, real_dest]) == real_dest:
        raise UsageError(f"DEST: '{dest}' holds SOURCE '{source}'; give a folder outside it")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise UsageError(f"DEST: '{dest}' is a file, not a folder")


def list_source(source):
    """[(split, source file, its path relative to the split)] of train/ and val/, as data.scan lists them."""
    splits = [split for split in SPLITS if os.path.isdir(os.path.join(source, split))]
    if not splits:
        raise UsageError(f"SOURCE: '{source}' has no train/ or val/ folder; expected <split>/<class>/<image>")
    files = []
    for split in splits:
        root = os.path.join(source, split)
        try:
            listing = data.scan(root)
        except UsageError as err:  # data's messages name the trainers' flag
            raise UsageError(str(err).replace('--data-path:', 'SOURCE:', 1)) from None
        files += [(split, path, os.path.relpath(path, root)) for path, _ in listing['samples']]
    for split in SPLITS:
        if split not in splits:
            print(f"note: '{source}' has no {split}/ folder: only {', '.join(s + '/' for s in splits)} is copied")
    return files


def output_names(files):
    """{source file: its path under dest}. JPEG names are kept; the others get .jpg, or .jpg after the whole name
    where that is taken. Depends only on the listing, so every rerun picks the same names."""
    by_folder = collections.defaultdict(list)
    for split, path, relative in files:
        by_folder[os.path.join(split, os.path.dirname(relative))].append(path)
    names = {}
    for folder, paths in by_folder.items():
        taken = {}
        kept = [p for p in paths if os.path.splitext(p)[1].lower() in JPEG_EXTENSIONS]
        for path in kept:
            taken[os.path.basename(path)] = path
        for path in sorted(set(paths) - set(kept)):
            base = os.path.basename(path)
            for name in (os.path.splitext(base)[0] + '.jpg', base + '.jpg'):
                if name not in taken:
                    taken[name] = path
                    break
            else:
                raise UsageError(f"SOURCE: '{path}' cannot be given a .jpg name in '{folder}': both "
                                 f"'{os.path.splitext(base)[0]}.jpg' and '{base}.jpg' are taken; rename it")
        names.update({path: os.path.join(folder, name) for name, path in taken.items()})
    return names


def check_dest(dest, max_side, quality):
    """Refuse a DEST written with other settings, or one that holds other things."""
    if not os.path.isdir(dest):
        return
    settings_path = os.path.join(dest, SETTINGS_FILE)
    if not os.path.exists(settings_path):
        if set(os.listdir(dest)) - {output_folder.LOCK_NAME}:  # a lock alone: a run killed as it started
            raise UsageError(f"DEST: '{dest}' is not empty and was not written by shrink_dataset.py (no "
                             f'{SETTINGS_FILE}); give a new or empty folder')
        return
    try:
        with open(settings_path) as f:
            saved = json.load(f)
        saved_side, saved_quality = int(saved['max_side']), int(saved['quality'])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"DEST: cannot read '{settings_path}' ({err}); give a new folder") from None
    for flag, value, was in (('--max-side', max_side, saved_side), ('--quality', quality, saved_quality)):
        if value != was:
            raise UsageError(f"{flag}: '{dest}' was written with --max-side {saved_side} --quality {saved_quality}; "
                             'give those to finish it, or another DEST')


def claim_dest(dest, source, max_side, quality):
    """Create DEST, lock it against a second run (output_folder's lock) and record the settings."""
    try:
        os.makedirs(dest, exist_ok=True)
        lock = output_folder.lock_folder(dest)
        settings = json.dumps(dict(max_side=max_side, quality=quality, source=os.path.abspath(source)))
        write_atomically(os.path.join(dest, SETTINGS_FILE), lambda f: f.write(settings.encode()))
    except UsageError as err:
        raise UsageError(str(err).replace('--output-dir', 'DEST')) from None
    except OSError as err:
        raise UsageError(f"DEST: cannot write to '{dest}': {output_folder.describe(err)}") from None
    return lock


def write_atomically(path, write):
    """`write(file)` into a temporary file beside `path`, then renamed to `path`: never a partial file under it."""
    tmp = output_folder.temp_path(os.path.dirname(path), os.path.basename(path))
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def plan(dest, files, names):
    """(tasks, skipped bytes (source, dest), skipped count, leftovers removed): the files to write, each
    (source, dest file), and what is already there. Makes the dest folders."""
    present = {}
    leftovers = 0
    for folder in sorted({os.path.dirname(name) for name in names.values()}):
        path = os.path.join(dest, folder)
        os.makedirs(path, exist_ok=True)
        entries = {}
        with os.scandir(path) as scan:
            for entry in scan:
                if output_folder.TEMP_FILE.match(entry.name):  # a killed run's; the lock says no run writes here
                    os.remove(entry.path)
                    leftovers += 1
                elif entry.is_file():
                    entries[entry.name] = entry.stat().st_size
        present[folder] = entries
    tasks, skipped, skipped_bytes = [], 0, [0, 0]
    for _, path, _ in files:
        name = names[path]
        size = present[os.path.dirname(name)].get(os.path.basename(name), 0)
        if size > 0:
            skipped += 1
            skipped_bytes[0] += os.path.getsize(path)
            skipped_bytes[1] += size
        else:
            tasks.append((path, os.path.join(dest, name)))
    return tasks, skipped_bytes, skipped, leftovers


def shrunk_size(width, height, max_side):
    """(width, height) with the longer side at most max_side, aspect kept (rounded), never larger."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_file(source, target, max_side, quality):
    """Write `target` from `source` (module docstring); return ('written', source bytes, target bytes), or
    ('unreadable', message) for a file the trainers' loader refuses, or ('failed', message) for a write error."""
    from PIL import Image
    try:
        image = data.checked_pil_loader(source)  # the trainers' reading: no EXIF rotation, RGB
    except data.UnreadableImage as err:
        return 'unreadable', str(err).split(': ', 1)[-1]
    try:
        with open(source, 'rb') as f:
            is_jpeg = f.read(2) == b'\xff\xd8'
        size = shrunk_size(*image.size, max_side)
        if is_jpeg and size == image.size:
            write_atomically(target, lambda f: copy_into(source, f))
        else:
            if size != image.size:
                image = image.resize(size, Image.LANCZOS, reducing_gap=RESAMPLE_GAP)
            write_atomically(target, lambda f: image.save(f, format='JPEG', quality=quality))
        return 'written', os.path.getsize(source), os.path.getsize(target)
    except OSError as err:
        return 'failed', f"cannot write '{target}': {output_folder.describe(err)}"


def copy_into(source, f):
    with open(source, 'rb') as original:
        shutil.copyfileobj(original, f)


def _shrink_task(task):
    return shrink_file(*task)


def start_worker(main_pid):
    """Pool initializer: the stop signals are the main process's to answer (it lets the files in progress finish);
    a worker ends with the main process however that ends."""
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
    data.end_with_trainer(main_pid)


class StopNow(Exception):
    """A second stop signal: the run ends at once."""


class Stop:
    """The stop signal received (`signum`, None: none) or an error that ends the run (`halt`); no file starts
    after either. A second signal raises StopNow."""

    def __init__(self):
        self.signum, self.halted = None, False
        self.previous = {}

    @property
    def stopping(self):
        return self.signum is not None or self.halted

    def __enter__(self):
        for signum in STOPS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def handle(self, signum, frame):
        if self.signum is not None:
            raise StopNow()
        self.signum = signum


def results(tasks, workers, stop, max_side, quality):
    """The result of each task, in order, from `workers` processes (0: here). After a stop signal no task starts;
    the ones in progress finish."""
    tasks = iter((source, target, max_side, quality) for source, target in tasks)
    if workers == 0:
        for task in tasks:
            if stop.stopping:
                return
            yield _shrink_task(task)
        return
    with stop_signals_blocked():  # the workers start deaf to them (start_worker ignores them)
        pool = multiprocessing.Pool(workers, initializer=start_worker, initargs=(os.getpid(),))
    try:
        pending = collections.deque()
        while True:
            while not stop.stopping and len(pending) < workers * IN_FLIGHT_PER_WORKER:
                task = next(tasks, None)
                if task is None:
                    break
                pending.append(pool.apply_async(_shrink_task, (task,)))
            if not pending:
                break
            pending[0].wait(0.5)
            while pending and pending[0].ready():
                yield pending.popleft().get()
        pool.close()
        pool.join()
    finally:
        end_loader_workers()  # any left (an error, a second signal): killed, as the workers ignore SIGTERM
        pool.terminate()


def mb(count):
    return f'{count / 1e6:,.1f} MB'


def say(bar, line):
    """One line on stderr, on a line of its own while a terminal progress line is shown."""
    sys.stderr.write(('\r\x1b[K' if bar.tty and bar.shown_at is not None else '') + line + '\n')
    sys.stderr.flush()


def run(source, dest, max_side=500, quality=90, workers=1):
    """shrink_dataset.py: write the shrunk copy; return the exit status (module docstring)."""
    check_settings(max_side, quality, workers)
    check_paths(source, dest)
    files = list_source(source)
    names = output_names(files)
    check_dest(dest, max_side, quality)
    lock = claim_dest(dest, source, max_side, quality)
    try:
        return write_copy(source, dest, files, names, (max_side, quality, workers))
    finally:
        if lock is not None:
            lock.release()


def write_copy(source, dest, files, names, settings):
    max_side, quality, workers = settings
    tasks, sizes, skipped, leftovers = plan(dest, files, names)
    if leftovers:
        print(f'Removed {leftovers} unfinished temporary file(s) of an interrupted run from {dest}')
    written, unreadable, failure = 0, 0, None
    with Stop() as stop, progress.Progress(f'Shrinking {source}', total=len(files), unit='files') as bar:
        try:
            for result in results(tasks, min(workers, len(tasks)), stop, max_side, quality):
                if result[0] == 'written':
                    written += 1
                    sizes[0] += result[1]
                    sizes[1] += result[2]
                elif result[0] == 'unreadable':
                    unreadable += 1
                    say(bar, f'skipped: {result[1]}')
                else:
                    failure = failure or result[1]
                    stop.halted = True  # no file starts after a write error
                bar.update(skipped + written + unreadable, f'{written:,} written, {skipped:,} already there')
        except StopNow:
            end_loader_workers()
            say(bar, f'stopped at once by a second {signal.Signals(stop.signum).name}: {written:,} files written; the '
                     'files in progress are left as temporary files, which the next run removes')
            return 128 + stop.signum
    print(f'{written:,} files written, {skipped:,} skipped as already there, {unreadable:,} unreadable; '
          f'{sizes[0]:,} bytes ({mb(sizes[0])}) in SOURCE -> {sizes[1]:,} bytes ({mb(sizes[1])}) in DEST '
          f'({sizes[1] / max(sizes[0], 1):.2f}x) for the {written + skipped:,} files of the copy')
    if failure:
        raise CleanExit(f'DEST: {failure}; the files written are kept: run again to finish')
    if stop.signum:
        name = signal.Signals(stop.signum).name
        left = len(tasks) - written - unreadable
        say(bar, f'stopped by {name}: {left:,} of {len(files):,} files not written yet (no partial file left); '
                 'run the same command again to finish')
        return 128 + stop.signum
    if unreadable:
        say(bar, f'{unreadable:,} unreadable image(s) skipped (named above): the copy lacks them; replace or remove '
                 'them in SOURCE and run again')
        return 1
    return 0
