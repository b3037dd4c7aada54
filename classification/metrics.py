"""The metrics file of a run, `<output-dir>/metrics.jsonl`, and its TensorBoard copy (`--tensorboard`).

Rank 0 appends one JSON object per line: a `header` when the run starts (or resumes, or only evaluates), a
`train` record per log line of the training loop, a `val` record per evaluation and an `epoch` record per
finished epoch. Field names are NVIDIA DeepLearningExamples' dllogger names (`train.loss`, `train.top1`,
`train.compute_ips`, `val.top1`, `val_ema.top1`, ...). Writers take only values the trainers already hold
for their log lines, so writing costs no device sync. Each line goes to the file in one write() call, so a
killed run keeps every line it wrote and never leaves half of one; a line that cannot be written (full disk)
is taken back and the run trains on without its metrics, after one warning line. Reading (`read`, for
plot_metrics.py) needs no torch.
"""
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import weakref
from typing import NamedTuple

from . import REPO_ROOT, resolution
from .cli import UsageError

FILE_NAME = 'metrics.jsonl'
TENSORBOARD_FOLDER = 'tensorboard'
HERE = REPO_ROOT
NOT_SCALARS = ('epoch', 'step', 'timestamp')  # where a record is, not what it measures
INSTALL_TENSORBOARD = ('--tensorboard: the tensorboard package is not installed; install it with '
                       '`pip install tensorboard` or leave out --tensorboard')


def check_tensorboard(enabled, output_dir):
    """Refuse --tensorboard at start when it cannot write: no --output-dir, or no tensorboard package."""
    if not enabled:
        return
    if not output_dir:
        raise UsageError("--tensorboard writes into <output-dir>/tensorboard; give an --output-dir (not '')")
    try:
        importlib.import_module('torch.utils.tensorboard')
    except ImportError:
        raise UsageError(INSTALL_TENSORBOARD) from None


def git_commit(folder=HERE):
    """The commit checked out in `folder` when it is the top of a git checkout, else None (never fails)."""
    try:
        result = subprocess.run(['git', '-C', folder, 'rev-parse', '--show-toplevel', 'HEAD'], capture_output=True,
                                text=True, timeout=5, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(folder):
        return None
    return lines[1]


class RunStart(NamedTuple):
    """Where a run starts: its first epoch, the samples of that epoch's order already trained, and the
    checkpoint it resumes from (None: none)."""
    epoch: int = 0
    position: int = 0
    checkpoint: str = None


FROM_THE_START = RunStart()


class NoMetrics:
    """What ranks other than 0, and runs without --output-dir, write: nothing."""

    def header(self, **fields):
        pass

    def train_window(self, epoch, step, **values):
        pass

    def evaluation(self, epoch, **values):
        pass

    def epoch(self, epoch, **values):
        pass

    def close(self):
        pass


NO_METRICS = NoMetrics()


def progressive_resizing_record(args):
    """The header's record of progressive resizing (resolution.ProgressiveResizing.as_record), read from the run's
    parsed arguments `args` (a plain dict); None without --min-res and the rest."""
    schedule = resolution.from_arguments(args)
    return schedule.as_record() if schedule else None


def open_run(output_dir, rank, tensorboard=False):
    """The writer of this rank: a MetricsFile on rank 0 with an --output-dir, else NO_METRICS."""
    if not output_dir or rank != 0:
        return NO_METRICS
    return MetricsFile(os.path.join(output_dir, FILE_NAME),
                       os.path.join(output_dir, TENSORBOARD_FOLDER) if tensorboard else None)


def _plain(value):
    """JSON-safe: a non-finite float becomes null (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsFile(NoMetrics):
    """Appends records to `path` (created with its folder when missing) and, with `tensorboard_dir`, adds the
    numeric fields as TensorBoard scalars (tag `train/loss` for `train.loss`, `epoch/total_ips` for an epoch
    record's `train.total_ips`; global step: images trained)."""

    def __init__(self, path, tensorboard_dir=None):
        self.path = path
        self.world_size = 1
        self.global_batch = 0
        self.steps_per_epoch = None
        self.fd = None
        self.writing = False
        try:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            self.writing = True
        except OSError as err:
            self._warn(err)
        self.tensorboard = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(tensorboard_dir)
        self._finalizer = weakref.finalize(self, _close, self.fd, self.tensorboard)

    def close(self):
        self._finalizer()
        self.writing, self.tensorboard = False, None

    def _warn(self, err):
        print(f'warning: could not write {self.path}: {err}; the run goes on without its metrics file',
              file=sys.stderr, flush=True)

    def header(self, *, args, recipe, device, world_size, batch_size, steps_per_epoch, start=FROM_THE_START,
               test_only=False, precision=None):
        """The run's identity: command line, parsed arguments (`args`: a plain dict, checkpoints.plain_args),
        recipe, code and library versions, device and what decides its arithmetic (`precision`:
        the device layer's precision_settings(): --amp, --hmp, on CUDA TF32 and the deterministic kernels),
        ranks and batch, the training resolution per epoch (progressive resizing's flags in `args`, or None), and
        where it starts (`start`: RunStart); for a resume, the checkpoint and the epoch and
        step it continues at."""
        import torch
        import torchvision
        start_epoch, resume_position, resume = start
        self.world_size, self.global_batch = world_size, world_size * batch_size
        self.steps_per_epoch = steps_per_epoch
        first_step = resume_position // self.global_batch
        resumed_from = ({'checkpoint': os.path.abspath(resume), 'epoch': start_epoch, 'step': first_step}
                        if resume else None)
        record = {'type': 'header', 'epoch': start_epoch, 'step': first_step,
                  'mode': 'test-only' if test_only else 'train', 'resumed_from': resumed_from,
                  'command': list(sys.argv), 'recipe': recipe, 'git_commit': git_commit(),
                  'torch_version': torch.__version__, 'torchvision_version': torchvision.__version__,
                  'python_version': platform.python_version(), 'device': device, 'precision': precision,
                  'world_size': world_size,
                  'batch_size': batch_size, 'global_batch': self.global_batch, 'steps_per_epoch': steps_per_epoch,
                  'progressive_resizing': progressive_resizing_record(args),
                  'args': args}
        self._write(record)
        if self.tensorboard is not None:
            self.tensorboard.add_text('header', json.dumps(record, indent=1), self._images(start_epoch, first_step))
            self.tensorboard.flush()

    def train_window(self, epoch, step, *, lr, loss, top1, top5, total_ips, compute_ips, data_time):
        """A log line of the training loop at `step` of `epoch`: the logged step's loss and accuracy, and the
        window's throughput of all ranks (rank 0's x world size, as dllogger's) and data wait per step."""
        self._write({'type': 'train', 'epoch': epoch, 'step': step, 'train.lr': lr, 'train.loss': loss,
                     'train.top1': top1, 'train.top5': top5, 'train.total_ips': total_ips * self.world_size,
                     'train.compute_ips': compute_ips * self.world_size, 'train.data_time': data_time},
                    self._images(epoch, step + 1))

    def evaluation(self, epoch, *, loss, top1, top5, images, ema=False):
        """An evaluation after `epoch` (None: no epoch trained, --test-only of a checkpoint without one), over
        `images` validation images of all ranks; the EMA model's under `val_ema.` (dllogger's prefix)."""
        prefix = 'val_ema' if ema else 'val'
        self._write({'type': 'val', 'epoch': epoch, 'step': None, 'ema': ema, f'{prefix}.loss': loss,
                     f'{prefix}.top1': top1, f'{prefix}.top5': top5, f'{prefix}.images': images},
                    self._images(epoch + 1, 0) if epoch is not None else 0)

    def epoch(self, epoch, *, images, train_time, epoch_time, resolution=None):
        """A finished epoch: images this rank trained (x world size in the record), the training loop's time
        and throughput, the whole epoch's time (evaluation included), and its training resolution where
        progressive resizing set one."""
        images *= self.world_size
        record = {'type': 'epoch', 'epoch': epoch, 'step': None, 'train.images': images, 'train.time': train_time,
                  'train.total_ips': images / max(train_time, 1e-9), 'epoch_time': epoch_time}
        if resolution is not None:
            record['train.resolution'] = resolution
        self._write(record, self._images(epoch + 1, 0))

    def _images(self, epoch, steps):
        """The global step of TensorBoard: images trained by all ranks at `steps` steps into `epoch`."""
        return ((epoch or 0) * (self.steps_per_epoch or 0) + steps) * self.global_batch

    def _write(self, record, global_step=None):
        record = dict(record, timestamp=time.time())
        if self.writing:
            line = (json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + '\n').encode()
            try:
                end = os.fstat(self.fd).st_size
                written = os.write(self.fd, line)
                if written != len(line):  # a full disk took part of the line: take it back
                    os.ftruncate(self.fd, end)
                    raise OSError(f'only {written} of {len(line)} bytes written')
            except OSError as err:
                self._warn(err)
                self.writing = False  # the descriptor stays open until close(): its number is not reused
        if self.tensorboard is not None and global_step is not None:
            for key, value in record.items():
                if (key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool)
                        and math.isfinite(value)):  # a --compile window's img/s is nan
                    tag = (f"epoch/{key.rpartition('.')[2]}" if record['type'] == 'epoch'  # not in train/'s curves
                           else key.replace('.', '/'))
                    self.tensorboard.add_scalar(tag, value, global_step)
            self.tensorboard.flush()


def _close(fd, tensorboard):
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass
    if tensorboard is not None:
        tensorboard.close()


def file_path(path):
    """The metrics file a path names: the file itself, or `<folder>/metrics.jsonl`."""
    return os.path.join(path, FILE_NAME) if os.path.isdir(path) else path


def read(path):
    """The records of a metrics file, or of `<folder>/metrics.jsonl`; a UsageError naming the file when it is
    missing, empty or not a metrics file. A last line without its newline (a run killed mid-write on a file
    system that allows it) is left out."""
    path = file_path(path)
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as err:
        raise UsageError(f"cannot read metrics file '{path}': {err.strerror or err}") from None
    lines = data.split(b'\n')
    records = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1]: after the last newline
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"'{path}' line {number} is not JSON: not a metrics file") from None
        if not isinstance(record, dict) or 'type' not in record:
            raise UsageError(f"'{path}' line {number} has no record type: not a metrics file")
        records.append(record)
    if not records:
        raise UsageError(f"metrics file '{path}' is empty")
    return records
