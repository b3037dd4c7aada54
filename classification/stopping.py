"""What stops a run early: the stop signals (SIGTERM, SIGUSR1), on which every rank finishes the same step
and the run saves, and a NaN or infinite loss, on which it stops without saving.

Neither adds a device sync to a step: ranks agree on a stop through a non-blocking all-reduce read one
step later, and the loss watch is read only where a step already waits for the device (logged steps).
"""
import datetime
import signal
import sys
import time

import torch
import torch.distributed as dist

from .cli import STOP_SIGNALS, CleanExit


class GracefulStop:
    """A stop signal (cli.STOP_SIGNALS: SIGTERM, SIGUSR1) asks the run to stop after the current step and save.

    A single process stops after the step it is in. Ranks of a distributed run must stop after the same
    step without a blocking sync per step: after each step a rank starts a non-blocking all-reduce of its
    stop flag on a small CPU (gloo) group, and reads the result after the next step, long after it
    arrived. So every rank sees the same answer at the same step, within two steps of the signal, and the
    device is never synchronised for it. Repeated signals (a scheduler and mpirun both send one) do not
    cancel the save; SIGINT or SIGKILL stop at once.
    """

    def __init__(self, distributed=False, timeout_s=None):
        self.signum = 0
        self.received_at = None
        self.seen_at_step = None  # the step during which this rank saw the signal
        self.group = None
        if distributed:  # bounded like every other wait for the ranks (--dist-timeout)
            timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
            self.group = dist.new_group(backend='gloo', timeout=timeout)
        self.pending = None  # (work, flag tensor) of the all-reduce started after the previous step
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        if self.signum:
            return
        self.signum, self.received_at = signum, time.time()
        sys.stderr.write(f'{self.signal_name} received: stopping after this step (ranks agree within two steps) '
                         'and saving a checkpoint\n')

    @property
    def signal_name(self):
        return signal.Signals(self.signum).name if self.signum else None

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

    def _collect(self):
        if self.pending is None:
            return False
        work, flag = self.pending
        self.pending = None
        work.wait()
        return self._agree(flag)

    def _agree(self, flag):
        """Adopt the signal another rank received, so every rank reports the same stop."""
        if flag.item() and not self.signum:
            self.signum, self.received_at = int(flag.item()), time.time()
        return bool(flag.item())


class NonFiniteLoss(CleanExit):
    """A NaN or infinite loss: the run stops instead of training (and saving) garbage."""


class NonFiniteLossWatch:
    """Remembers, on the device and without syncing, the first step whose loss was NaN or infinite;
    `check` reads it where the step already waits for the device (logged steps, end of epoch)."""

    NONE = 2 ** 62

    def __init__(self, device):
        self.first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.lr_at = {}

    def track(self, loss, step, lr):
        bad = ~torch.isfinite(loss.detach())
        step_t = torch.full((), step, dtype=torch.int64, device=self.first_bad.device)
        self.first_bad = torch.where(bad & (self.first_bad == self.NONE), step_t, self.first_bad)
        self.lr_at[step] = lr

    def check(self, epoch):
        step = int(self.first_bad.item())
        if step != self.NONE:
            raise NonFiniteLoss(f'non-finite loss at epoch {epoch}, step {step} (lr {self.lr_at.get(step)}); '
                                'stopped without saving, the last checkpoint is the last good state. '
                                'Lower --lr (or check the data) and --resume from it')
        self.lr_at.clear()
