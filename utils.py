"""Metrics and log lines, as upstream's references/classification utils.py: SmoothedValue, MetricLogger,
accuracy, plus the print-window throughput both trainers report.

They keep upstream's shape so that log lines read the same. Distributed start-up is in distributed.py,
stop signals and the non-finite loss watch in stopping.py.
"""
import datetime
import time
from collections import defaultdict, deque
from typing import NamedTuple

import torch
import torch.distributed as dist


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


def accuracy(output, target, topk=(1,), on_host=True):
    """Top-k accuracy in percent for each k (0-d tensors), computed on the CPU as Habana's port does, or with
    `on_host` False where the logits are, as upstream does (no copy of the logits: the trainers' choice on CUDA
    and CPU, devices.py's accuracy_on_device).

    A k larger than the number of classes counts every sample as correct, so top-5 on a
    2-class dataset reads 100 instead of crashing.
    """
    with torch.no_grad():
        output, target = output.detach(), target.detach()
        if on_host:
            output, target = output.float().cpu(), target.cpu()
        batch_size = target.size(0)
        maxk = min(max(topk), output.size(1))
        _, pred = output.topk(maxk, 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:min(k, maxk)].reshape(-1).float().sum(0) * (100.0 / batch_size) for k in topk]


def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


class Window(NamedTuple):
    """One report window of ThroughputWindow: images and steps since the last report, the window's wall time
    and the part of it spent waiting for data."""
    images: int
    steps: int
    seconds: float
    data_time: float

    @property
    def total_ips(self):
        """Images per second, data time included."""
        return self.images / max(self.seconds, 1e-9)

    @property
    def compute_ips(self):
        """Images per second, data time left out."""
        return self.images / max(self.seconds - self.data_time, 1e-9)

    @property
    def data_time_per_step(self):
        return self.data_time / max(self.steps, 1)


class ThroughputWindow:
    """Images per second over the steps since the last report, with and without the time spent waiting for
    batches (and copying them to the device): over the whole window rather than one step's."""

    def __init__(self):
        self.total_images = 0
        self._reset(time.time())

    def _reset(self, now):
        self.start = self.step_end = now
        self.data_time = 0.0
        self.images = 0
        self.steps = 0

    def data_ready(self):
        self.data_time += time.time() - self.step_end

    def step_done(self, batch_size):
        self.images += batch_size
        self.steps += 1
        self.total_images += batch_size
        self.step_end = time.time()

    def close(self):
        """The window's figures (Window), with and without data time; a new window starts."""
        now = time.time()
        window = Window(self.images, self.steps, now - self.start, self.data_time)
        self._reset(now)
        return window
