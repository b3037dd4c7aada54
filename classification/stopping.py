"""What stops a run early: the stop signals (SIGTERM, SIGUSR1 and the rest of cli.STOP_SIGNALS) and the
faults around the trainer (faults.py), on which every rank finishes the same step and the run saves, and a NaN
or infinite loss, on which it stops without saving.

Neither adds a device sync to a step: ranks agree on a stop through a non-blocking all-reduce read one
step later, and the loss watch is read only where a step already waits for the device (logged steps).
"""
import datetime
import enum
import math
import signal
import sys
import time

import torch
import torch.distributed as dist

from . import start_up
from .cli import CleanExit, stop_exit_status


class Fault(enum.IntEnum):
    """Something around a healthy trainer failed (faults.py); the run stops after the step and saves, as for a
    signal, then exits 1."""
    LOADER_WORKER = 1  # a loader worker died (the out-of-memory killer, a full /dev/shm)
    LAUNCHER = 2       # the launcher (mpirun, its daemon) ended under a rank
    OUTPUT = 3         # the output stream closed (its pipe's reader or the terminal went away)


FAULT_NAMES = {Fault.LOADER_WORKER: "a loader worker's death", Fault.LAUNCHER: 'the end of its launcher',
               Fault.OUTPUT: 'the loss of its output stream'}
FAULT_BASE = 10000  # a cause above this is a fault: FAULT_BASE * fault + the rank it happened on

_active = None  # the GracefulStop of the run that is training, which faults.py asks to stop


class GracefulStop:
    """A stop signal (cli.STOP_SIGNALS) or a fault around the trainer (Fault, through `request`) asks the run
    to stop after the current step and save.

    A single process stops after the step it is in. Ranks of a distributed run must stop after the same
    step without a blocking sync per step: after each step a rank starts a non-blocking all-reduce of its
    stop cause on a small CPU (gloo) group, and reads the result after the next step, long after it
    arrived. So every rank sees the same answer at the same step, within two steps of the signal, and the
    device is never synchronised for it. Repeated signals (a scheduler and mpirun both send one) do not
    cancel the save; a second SIGINT (Ctrl-C) stops at once, and SIGKILL does.
    """

    def __init__(self, distributed=False, timeout_s=None, rank=0, rerun_status=0):
        global _active
        self.signum = 0  # the cause: a signal number, or a fault (FAULT_BASE * Fault + rank); 0 while none
        self.received_at = None
        self.seen_at_step = None  # the step during which this rank saw the signal
        self.rank = rank
        self.rerun_status = rerun_status  # a scheduler's stop with epochs left: cli.RERUN_EXIT_STATUS (--resume auto)
        self.group = None
        if distributed:  # bounded like every other wait for the ranks (--dist-timeout)
            timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
            self.group = dist.new_group(backend='gloo', timeout=timeout)
        self.pending = None  # (work, flag tensor) of the all-reduce started after the previous step
        for signum in start_up.answered_signals():
            signal.signal(signum, self._handle)
        start_up.hand_over()
        _active = self

    def _handle(self, signum, frame):
        if self.signum:
            if signum == signal.SIGINT:  # a second Ctrl-C: at once, without saving
                raise KeyboardInterrupt
            return
        self._set(signum)
        again = ' (Ctrl-C again: stop at once, without saving)' if signum == signal.SIGINT else ''
        _write_stderr(f'{self.signal_name} received: stopping after this step (ranks agree within two steps) and '
                      f'saving a checkpoint{again}\n')

    def request(self, fault):
        """A fault (Fault) on this rank: stop after this step and save, as for a signal (a run that stops
        already keeps its first cause)."""
        if not self.signum:
            self._set(FAULT_BASE * int(fault) + self.rank)

    def _set(self, cause):
        self.signum, self.received_at = cause, time.time()

    @property
    def is_fault(self):
        return self.signum >= FAULT_BASE

    @property
    def signal_name(self):
        """What stopped the run: SIGTERM and the like, or the fault and the rank it happened on."""
        if not self.signum:
            return None
        if not self.is_fault:
            return signal.Signals(self.signum).name
        fault, rank = divmod(self.signum, FAULT_BASE)
        where = f' on rank {rank}' if self.group is not None else ''
        return FAULT_NAMES[Fault(fault)] + where

    @property
    def exit_status(self):
        """0 after a scheduler's stop (cli.CLEAN_STOP_SIGNALS), 128 + N after another signal N, 1 after a fault."""
        return 1 if self.is_fault else stop_exit_status(self.signum)

    @property
    def exit_status_with_epochs_left(self):
        """exit_status, but `rerun_status` after a scheduler's stop (--resume auto: run the job again)."""
        return 1 if self.is_fault else stop_exit_status(self.signum, self.rerun_status)

    def after_step(self, step):
        """Whether the run stops after `step`, the step just done (every rank gets the same answer)."""
        if self.signum and self.seen_at_step is None:
            self.seen_at_step = step
        if self.group is None:
            return bool(self.signum)
        if self._collect():
            return True
        flag = torch.tensor([self.signum], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return False

    def at_epoch_end(self):
        """Whether the run stops here, where it waits anyway: the pending answer, else a blocking one."""
        if self.group is None:
            return bool(self.signum)
        if self._collect():
            return True
        flag = torch.tensor([self.signum], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return self._agree(flag)

    def wait_for_the_save(self):
        """After a stop's save, every rank leaves together: rank 0 is the one that saves, and a launcher ends the
        ranks still running when one exits non-zero (mpirun aborts the job on --resume auto's 75, or a fault's 1),
        which would cut that save short."""
        if self.group is None:
            return
        try:
            dist.barrier(group=self.group)
        except RuntimeError:  # a rank is gone: nothing left to wait for
            pass

    def _collect(self):
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()
        return self._agree(flag)

    def _agree(self, flag):
        """Adopt the cause another rank had (the highest of all), so every rank reports the same stop."""
        if flag.item() and flag.item() != self.signum:
            self.signum = int(flag.item())
            self.received_at = self.received_at or time.time()
        return bool(flag.item())


def request(fault):
    """Ask the run that is training to stop after this step and save, for `fault` (Fault): True, or False when
    no run is training (before training starts, or a run that only evaluates)."""
    if _active is None:
        return False
    _active.request(fault)
    return True


def forget():
    """No run is training any more (the in-process tests run several)."""
    global _active
    _active = None


def rank_prefix():
    """'rank R: ' in a distributed run that is training, for lines only that rank writes; else ''."""
    return f'rank {_active.rank}: ' if _active is not None and _active.group is not None else ''


def _write_stderr(text):
    try:
        sys.stderr.write(text)
    except OSError:  # the stream is gone (faults.guard_output turns that into a stop of its own)
        pass


class NonFiniteLoss(CleanExit):
    """A NaN or infinite loss: the run stops instead of training (and saving) garbage."""


class NonFiniteLossWatch:
    """Remembers, on the device and without syncing, the first step whose loss was NaN or infinite;
    `check` reads it where the step already waits for the device (logged steps, end of epoch).

    With --amp float16 (`scaler`: the device's torch.amp.GradScaler) a non-finite loss is first an overflow:
    the scaler skips that step (the weights do not change) and halves its scale. Only SKIPS_IN_A_ROW such
    steps in a row mean a divergence; fewer are reported in a `note:` line, as are the gradient overflows the
    scaler skipped with a finite loss (seen as its scale going down)."""

    NONE = 2 ** 62
    SKIPS_IN_A_ROW = 5

    def __init__(self, device, scaler=None):
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.scaler = scaler
        self.in_a_row = torch.zeros((), dtype=torch.int64, device=device)
        self.last_scale = scaler.get_scale() if scaler is not None else None
        self.lr_at = {}

    def track(self, loss, step, lr):
        bad = ~torch.isfinite(loss.detach())
        first = step
        if self.scaler is not None:
            self.in_a_row = torch.where(bad, self.in_a_row + 1, torch.zeros_like(self.in_a_row))
            bad = self.in_a_row >= self.SKIPS_IN_A_ROW
            first = step - self.SKIPS_IN_A_ROW + 1
        step_t = torch.full((), first, dtype=torch.int64, device=self.first_bad.device)
        self.first_bad = torch.where(bad & (self.first_bad == self.NONE), step_t, self.first_bad)
        self.lr_at[step] = lr

    def pending(self):
        """The 0-d tensors `check_values` reads, for a logged step to read them with its own figures at once."""
        if self.scaler is None:
            return [self.first_bad]
        # GradScaler keeps its scale on the device in `_scale` (get_scale() would wait for the device).
        scale = getattr(self.scaler, '_scale', None)
        return [self.first_bad, scale if scale is not None else torch.tensor(self.scaler.get_scale())]

    def check(self, epoch, model=None):
        """Read the watch (one wait for the device) and check it; at an epoch's end under a loss scaler, also
        `model`'s floating-point buffers: a float16 overflow in a forward passes through BatchNorm's running
        statistics, which the skipped step does not undo, and non-finite ones would make every evaluation NaN."""
        pending = self.pending()
        buffers = [t for t in model.buffers() if t.is_floating_point()] if self.scaler is not None and model else []
        if buffers:
            pending.append(torch.stack([torch.isfinite(t).all() for t in buffers]).all())
        values = [t.item() for t in pending]
        self.check_values(values[:2] if self.scaler is not None else values[:1], epoch)
        if buffers and not values[-1]:
            raise NonFiniteLoss(f'epoch {epoch}: BatchNorm running statistics are not finite after a float16 '
                                'overflow in a forward; stopped without saving, the last checkpoint is the last good '
                                'state. --resume from it with a lower --lr, or --amp-dtype bfloat16')

    def check_values(self, values, epoch):
        """Check what pending() held, read to the host (`values`): raise NonFiniteLoss on a divergence."""
        step = int(values[0])
        if step != self.NONE:
            skipped = (f'{self.SKIPS_IN_A_ROW} steps in a row from step {step} under --amp float16 (the loss scaler '
                       'skipped them; the weights are as before them)' if self.scaler is not None else f'step {step}')
            raise NonFiniteLoss(f'non-finite loss at epoch {epoch}, {skipped} (lr {self.lr_at.get(step)}); '
                                'stopped without saving, the last checkpoint is the last good state. '
                                'Lower --lr (or check the data) and --resume from it')
        if self.scaler is not None:
            self._report_skips(float(values[1]), epoch)
        # keep the learning rates of a run of non-finite losses that may still be growing
        self.lr_at = {s: lr for s, lr in self.lr_at.items() if s > max(self.lr_at, default=0) - self.SKIPS_IN_A_ROW}

    def _report_skips(self, scale, epoch):
        """A note when the loss scale went down since the last check: float16 overflows were skipped."""
        if scale < self.last_scale and _is_first_rank():
            skips = round(math.log2(self.last_scale / scale))
            print(f'note: epoch {epoch}: float16 overflow: the loss scaler skipped {skips} step(s) since the last '
                  f'log line and lowered its scale from {self.last_scale:g} to {scale:g}; a skipped step leaves the '
                  'weights as they were (not a divergence)', flush=True)
        self.last_scale = scale


def _is_first_rank():
    """Rank 0 of the process group, or a run without one: the scaler is the same on every rank."""
    return not dist.is_initialized() or dist.get_rank() == 0
