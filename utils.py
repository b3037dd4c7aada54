"""Helpers shared by the trainers: metrics and log lines, checkpoint permutation.

SmoothedValue, MetricLogger and accuracy keep the shape of torchvision's references/classification
utils so that log lines read the same. Distributed start-up is in distributed.py.
"""
import datetime
import signal
import sys
import time
from collections import defaultdict, deque

import torch
import torch.distributed as dist

import output_folder
from cli import STOP_SIGNALS, ArgumentParser, CleanExit, UsageError, parse_bool, run_cli  # noqa: F401  (re-exported)


class SmoothedValue:
    """Track a series of values and give smoothed values over a window or the global series average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device='cpu'):
        """Sum count and total over all ranks (the deque stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        self.count = int(round(t[0].item()))
        self.total = t[1].item()

    @property
    def median(self):
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self):
        return torch.tensor(list(self.deque), dtype=torch.float32).mean().item()

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque)

    @property
    def value(self):
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    def __init__(self, delimiter='\t', device='cpu'):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.device = device

    def update(self, n=1, **kwargs):
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                v = v.item()
            assert isinstance(v, (float, int))
            self.meters[k].update(v, n)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        if attr in self.__dict__:
            return self.__dict__[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes(self.device)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header=None, max_steps=None):
        """Yield from `iterable`, printing the log line on every `print_freq`-th iteration (after its body).

        `max_steps` (--num-train-steps / --num-eval-steps) ends the loop early; unlike a `break` in the
        caller, the last iteration's line and the total time are still printed.
        """
        i = 0
        header = header or ''
        start_time = time.time()
        end = time.time()
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        total = len(iterable) if max_steps is None else min(len(iterable), max_steps)
        if total == 0:
            return
        space_fmt = ':' + str(len(str(total))) + 'd'
        fields = [header, '[{0' + space_fmt + '}/{1}]', 'eta: {eta}', '{meters}', 'time: {time}', 'data: {data}']
        if torch.cuda.is_available():
            fields.append('max mem: {memory:.0f}')
        log_msg = self.delimiter.join(fields)
        mib = 1024.0 * 1024.0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                memory = torch.cuda.max_memory_allocated() / mib if torch.cuda.is_available() else 0
                print(log_msg.format(i, total, eta=str(eta), meters=str(self), time=str(iter_time),
                                     data=str(data_time), memory=memory))
            i += 1
            end = time.time()
            if i >= total:
                break
        total_time = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f'{header} Total time: {total_time}')


def accuracy(output, target, topk=(1,)):
    """Top-k accuracy in percent for each k, computed on the CPU (as Habana's port does).

    A k larger than the number of classes counts every sample as correct, so top-5 on a
    2-class dataset reads 100 instead of crashing.
    """
    with torch.no_grad():
        output = output.detach().float().cpu()
        target = target.detach().cpu()
        batch_size = target.size(0)
        maxk = min(max(topk), output.size(1))
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:min(k, maxk)].reshape(-1).float().sum(0) * (100.0 / batch_size) for k in topk]


def mkdir(path):
    """Create `path` (and its parents); a file in the way is a UsageError naming --output-dir."""
    output_folder.create(path)


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist_avail_and_initialized():
        dist.barrier()


def atomic_save(obj, path, what='file'):
    """torch.save through a unique temporary file and a rename (output_folder.atomic_save)."""
    output_folder.atomic_save(obj, path, what)


def save_on_master(obj, *paths):
    if is_main_process():
        for path in paths:
            atomic_save(obj, path, 'checkpoint')


# Habana's convolution kernels want filters-last (RSCK) weights; checkpoints and torchvision use KCRS.
KCRS_TO_RSCK = (2, 3, 1, 0)
RSCK_TO_KCRS = (3, 2, 0, 1)


def permute_params(model, to_filters_last):
    """Permute every 4-D parameter (the conv weights) between KCRS and RSCK, in place."""
    order = KCRS_TO_RSCK if to_filters_last else RSCK_TO_KCRS
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 4:
                param.data = param.data.permute(order).contiguous()


def permute_momentum(optimizer, to_filters_last):
    """Permute every 4-D momentum buffer the same way as the weights it belongs to."""
    order = KCRS_TO_RSCK if to_filters_last else RSCK_TO_KCRS
    with torch.no_grad():
        for state in optimizer.state.values():
            buf = state.get('momentum_buffer')
            if buf is not None and buf.ndim == 4:
                state['momentum_buffer'] = buf.permute(order).contiguous()


def broadcast_buffers(module):
    """Give every rank rank 0's buffers (BatchNorm statistics). DDP runs with broadcast_buffers=False
    for speed, so before evaluating and saving, all ranks are made to hold the model that is saved."""
    if is_dist_avail_and_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, 0)


class ThroughputWindow:
    """Images per second over the steps since the last report.

    With exclude_data_time, time spent waiting for batches (and copying them to the device) is left
    out, giving compute-only throughput over the whole window rather than one step's.
    """

    def __init__(self, exclude_data_time):
        self.exclude_data_time = exclude_data_time
        self.total_images = 0
        self._reset(time.time())

    def _reset(self, now):
        self.start = self.step_end = now
        self.data_time = 0.0
        self.images = 0

    def data_ready(self):
        self.data_time += time.time() - self.step_end

    def step_done(self, batch_size):
        self.images += batch_size
        self.total_images += batch_size
        self.step_end = time.time()

    def images_per_second(self):
        """Report the window's rate and start a new window."""
        now = time.time()
        busy = now - self.start - (self.data_time if self.exclude_data_time else 0.0)
        rate = self.images / max(busy, 1e-9)
        self._reset(now)
        return rate


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
