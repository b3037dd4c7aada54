"""Input overlap on CUDA: the next batch crosses to the GPU while the current step computes.

loaders.build wraps every loader it makes (MP, FAST, HABANA's FAST fallback, synthetic data) in a `Prefetcher`
on CUDA unless LoaderSettings.prefetch is off. The prefetcher keeps one batch ahead of the trainer: the batch's
host-to-device copy (non_blocking, from the loaders' pinned memory), the uint8-to-float normalisation of FAST's
and synthetic data's batches (fast_jpeg.NormalizedOnDevice.normalise, here instead of after the copy) and the
conversion to the model's memory format are queued on a side CUDA stream. Before a batch is handed over, the
consumer's current stream waits for that stream (wait_stream), and the batch's tensors are recorded as used on
the consumer's stream (record_stream): they were allocated on the side stream, whose next batch must not be
given their memory while the step still reads them.

Each iteration (epoch) starts from the loader afresh, after the sampler's set_epoch, so nothing is prefetched
across an epoch's end; a loop that stops early leaves its one prefetched batch unread, as a DataLoader leaves
the batches its workers made ahead. On other devices the same class runs without streams, one batch ahead all
the same, which is how the tests check it on the CPU (the batches the loader makes, in its order, bit for bit).
"""
import contextlib

import torch

from . import fast_jpeg


class Prefetcher:
    """The (images, targets) batches of `loader`, moved to `device` one batch ahead of the consumer, the images
    passed through `prepare` there (None: as they come) and laid out in `memory_format`; on CUDA all of it on a
    side stream. `loader` is the wrapped loader, as NormalizedOnDevice's."""

    def __init__(self, loader, device, prepare=None, memory_format=torch.contiguous_format):
        self.loader = loader
        self.device = device
        self.prepare = prepare
        self.memory_format = memory_format

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        stream = side_stream(self.device)
        batches = iter(self.loader)
        ahead = self._next_on_device(batches, stream)
        while ahead is not None:
            batch = hand_over(ahead, stream)
            ahead = self._next_on_device(batches, stream)  # queued before the step that reads `batch`
            yield batch

    def _next_on_device(self, batches, stream):
        """The next batch of `batches` with its copy and preparation queued on `stream`; None after the last."""
        try:
            images, targets = next(batches)
        except StopIteration:
            return None
        with on_stream(stream):
            images = images.to(self.device, non_blocking=True)
            if self.prepare is not None:
                images = self.prepare(images)
            return images.contiguous(memory_format=self.memory_format), targets.to(self.device, non_blocking=True)


def side_stream(device):
    """A CUDA stream of `device` for the copies, which starts after the work queued so far on the current
    stream (synthetic data and the normalisation constants were made there); None off CUDA."""
    if device.type != 'cuda':
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    return stream


def on_stream(stream):
    """Context that queues CUDA work on `stream`; none to enter without one."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def hand_over(batch, stream):
    """`batch` ready for the consumer's current stream: that stream waits for `stream`'s work so far, and the
    caching allocator keeps the batch's memory until the consumer's stream is done with it."""
    if stream is None:
        return batch
    consumer = torch.cuda.current_stream(stream.device)
    consumer.wait_stream(stream)
    for tensor in batch:
        tensor.record_stream(consumer)
    return batch


def onto_device(loader, placement):
    """`loader`'s batches prefetched onto placement.device (devices.LoaderPlacement) in its memory format. A
    fast_jpeg.NormalizedOnDevice is unwrapped: its uint8 batches are copied and normalised on the side stream,
    once, instead of by it."""
    if isinstance(loader, fast_jpeg.NormalizedOnDevice):
        return Prefetcher(loader.loader, placement.device, loader.normalise, placement.memory_format)
    return Prefetcher(loader, placement.device, None, placement.memory_format)
