"""The --output-dir of a run: checked and locked before any work starts, and written to atomically.

`claim` runs once near the start of each trainer. On the rank that writes (rank 0) it creates the folder,
proves it writable by writing, syncing and removing a probe file, takes an advisory lock (`.lock`, held
until the process ends, kill -9 included) so that a second run cannot write into the same folder, and
removes the temporary files a killed run left behind. Every problem is one UsageError before training
(only a file system that cannot lock at all gets a warning instead).

`atomic_save` writes each file to `.<name>.<pid>.<random>.tmp` beside it and renames it into place: a
crash never leaves a half-written file, and two writers never share a temporary file.
"""
import atexit
import errno
import fcntl
import os
import re
import secrets
import time

import torch

from .cli import CleanExit, UsageError

LOCK_NAME = '.lock'
TEMP_FILE = re.compile(r'^\..+\.\d+\.[0-9a-f]{8}\.tmp$')  # what temp_path() names
PROBE_BYTES = 4096  # one page: enough to hit a full disk, too little to matter on any other

_claimed = {}  # real path of a folder -> FolderLock this process holds for it


def describe(err):
    """'[Errno 28] No space left on device (ENOSPC)' for an OSError."""
    if err.errno is None:
        return str(err)
    return f'[Errno {err.errno}] {os.strerror(err.errno)} ({errno.errorcode.get(err.errno, "?")})'


def temp_path(folder, name):
    """A temporary name beside `name` that no other process or thread picks."""
    return os.path.join(folder, f'.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp')


def claim(folder, rank, writes=True):
    """Make `folder` (--output-dir) ready for this run, or refuse with one line before any work starts.

    Only rank 0 writes checkpoints, so only rank 0 checks and locks; a run that writes nothing
    (`writes` False: --test-only, --evaluate) leaves the folder alone.
    """
    if not folder or rank != 0 or not writes:
        return
    real = os.path.realpath(folder)
    if real in _claimed:  # main() called again in the same process (tests)
        return
    create(folder)
    check_writable(folder)
    if not _claimed:
        atexit.register(release_all)
    _claimed[real] = lock_folder(folder)
    remove_leftover_temp_files(folder)


def release_all():
    """Give up every folder this process claimed (at exit; tests that run a trainer in-process call it
    where the process would have ended)."""
    for lock in _claimed.values():
        if lock is not None:
            lock.release()
    _claimed.clear()


def create(folder):
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _first_existing(folder)
        raise UsageError(f"--output-dir: '{blocker}' is a file, not a folder; give a folder path "
                         '(it is created if missing)') from None
    except OSError as err:
        raise UsageError(f"--output-dir: cannot create '{folder}': {describe(err)}") from None


def _first_existing(path):
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def check_writable(folder):
    """Write, sync and remove a small file, so that a read-only, full or forbidden folder fails now
    rather than at the first checkpoint, an epoch later."""
    probe = temp_path(folder, 'write-test')
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b'\0' * PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        fix = ('free some space there or use another --output-dir' if err.errno in (errno.ENOSPC, errno.EDQUOT)
               else 'use a writable --output-dir')
        raise UsageError(f"--output-dir: cannot write to '{folder}': {describe(err)}; {fix}") from None
    finally:
        _remove_quietly(probe)


class FolderLock:
    """An flock on `<folder>/.lock`. The kernel drops it when the process ends, however it ends; the
    file records the holder's pid and start time for the message another run gets."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_NAME)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors='replace').strip() or 'pid unknown'
                os.close(fd)
                raise UsageError(f"--output-dir: '{folder}' is in use by another run ({holder}); "
                                 'use another --output-dir') from None
            except OSError:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'pid {os.getpid()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}'.encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):  # remove it while still holding it, so no run locks a stale file
            _remove_quietly(self.path)
        os.close(self.fd)
        self.fd = None


LOCKING_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)  # e.g. NFS without a lock daemon


def lock_folder(folder):
    """Lock `folder` for this process, or raise UsageError naming the run that holds it. Where the file
    system cannot lock at all, the run goes on unlocked, with a warning."""
    try:
        return FolderLock(folder)
    except UsageError:
        raise
    except OSError as err:
        if err.errno in LOCKING_UNSUPPORTED:
            print(f"Warning: --output-dir '{folder}' cannot be locked ({describe(err)}); make sure no other run "
                  'writes there')
            return None
        raise UsageError(f"--output-dir: cannot lock '{folder}': {describe(err)}") from None


def _same_file(fd, path):
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def remove_leftover_temp_files(folder):
    """Temporary files of saves that a kill interrupted. Called under the lock: no other run of these
    scripts is writing here, so every such file is a leftover."""
    leftovers = [name for name in os.listdir(folder) if TEMP_FILE.match(name)]
    for name in leftovers:
        _remove_quietly(os.path.join(folder, name))
    if leftovers:
        print(f"Removed {len(leftovers)} unfinished temporary file(s) of an interrupted save from '{folder}'")


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:  # gone already, or the folder turned read-only: the original error says more
        pass


class SaveFailed(CleanExit):
    """A file could not be written (full disk, read-only or vanished folder): the run ends, exit 1."""


class _FirstErrorKeeper:
    """A file wrapper for torch.save that keeps the first OSError of a write: torch reports it as
    'RuntimeError: ... unexpected pos', which names neither the cause nor the errno."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self):
        self.f.flush()


def atomic_save(obj, path, what='checkpoint'):
    """torch.save `obj` to `path` through a synced temporary file and a rename, so that `path` holds
    either the previous version or the new one, complete. A failed write raises SaveFailed naming the
    path and the errno, and removes the temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = temp_path(folder, os.path.basename(path))
    try:
        _write_synced(obj, tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise SaveFailed(f'could not save {path}: {describe(err)}; the previous {what} is unchanged') from None
    finally:
        _remove_quietly(tmp)
    try:
        _fsync_folder(folder)
    except OSError as err:
        raise SaveFailed(f'saved {path} but could not sync its folder: {describe(err)}') from None


def _write_synced(obj, path):
    with open(path, 'wb') as f:
        keeper = _FirstErrorKeeper(f)
        try:
            torch.save(obj, keeper)
        except RuntimeError:
            if keeper.error is not None:
                raise keeper.error from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _fsync_folder(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
