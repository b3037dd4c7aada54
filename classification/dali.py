"""The NVIDIA DALI input pipeline: --dl-worker-type DALI (an optional package, nvidia-dali-cuda130).

On CUDA, DALI decodes each JPEG on the GPU (nvJPEG, and the hardware JPEG decoder where the GPU has one:
device 'mixed') and crops, resizes, flips and normalises there, so that a batch leaves the pipeline as
channels_last float32 on the GPU, ready for the step. On any other device the same pipeline runs with DALI's
CPU operators; only the device strings differ (PipelineDevices).

The file order stays the project's: the batches are the samplers' (samplers.EpochBatchSampler for
training, ShardedEvalSampler's for validation), fed to DALI with fn.external_source, so the epoch's order,
each rank's shard, the exact evaluation, a mid-epoch resume and the class checks are FAST's. The crop
windows are the project's too: each sample's RandomResizedCrop box and flip come from the FAST pipeline's
per-sample generator (seed, epoch, index), computed here from the file's header and handed to DALI, which
decodes only that window (fn.decoders.image_slice), resizes it (antialiased bilinear) and mirrors it. A run
therefore trains on the same crops and flips as FAST's, on any number of ranks and across a resume; the
pixels differ from FAST's by DALI's own decoder and resampling (a few grey levels). Validation: resize the
shorter side to --val-resize-size as torchvision's Resize(int) sizes it, centre crop --val-crop-size.

The host reads each file and its header on the trainer's thread (sizes for the windows, and the same size
limit and one-line errors as MP and FAST); --workers sets DALI's CPU threads (0 means 1). The pipeline runs
one batch ahead: the next batch decodes while the current one trains.
"""
import io
from collections import deque
from typing import NamedTuple

import numpy as np
import simplejpeg
import torch
from torch.utils.data import BatchSampler

from . import data, fast_jpeg, samplers
from .cli import UsageError

PACKAGE = 'nvidia-dali-cuda130'
# Where a JPEG's stream must end: a file cut short has its last start-of-scan after its last end-of-image
# marker (DALI's decoder would fill the missing rows with grey instead of failing as PIL does).
START_OF_SCAN, END_OF_IMAGE = b'\xff\xda', b'\xff\xd9'
# The per-sample inputs of the pipeline, in the order DaliLoader feeds them.
INPUTS = ('encoded', 'window_anchor', 'window_shape', 'resize', 'crop_anchor', 'crop_shape', 'mirror')


def import_dali():
    """The nvidia.dali module, or a UsageError naming the package when it is not installed."""
    try:
        import nvidia.dali
        import nvidia.dali.fn  # noqa: F401  (the operators' module, loaded with the package's libraries)
    except ImportError as err:
        raise UsageError(f'--dl-worker-type DALI needs NVIDIA DALI, which is not installed ({err}): '
                         f'pip install {PACKAGE} (about 480 MB), or use --dl-worker-type FAST') from None
    return nvidia.dali


class PipelineDevices:
    """Where the pipeline's operators run: the decoder 'mixed' and the rest 'gpu' on CUDA device `index`;
    'cpu' with no device id elsewhere."""

    def __init__(self, device):
        on_gpu = device.type == 'cuda'
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if on_gpu else None
        self.decoder = 'mixed' if on_gpu else 'cpu'
        self.operators = 'gpu' if on_gpu else 'cpu'


def build_pipeline(batch_size, threads, devices, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
    """The one DALI pipeline of training and validation: decode a window of each file, resize it to a given
    size, slice a given box out of that, mirror where asked, normalise; float32 HWC out."""
    dali = import_dali()
    fn, types = dali.fn, dali.types
    pipe = dali.Pipeline(batch_size=batch_size, num_threads=max(threads, 1), device_id=devices.device_id,
                         prefetch_queue_depth=1, exec_async=True, exec_pipelined=True)
    absolute = dict(normalized_anchor=False, normalized_shape=False, axis_names='HW')
    with pipe:
        inputs = {name: fn.external_source(name=name, dtype=types.FLOAT if name == 'resize' else
                                           types.UINT8 if name == 'encoded' else types.INT32)
                  for name in INPUTS}
        images = fn.decoders.image_slice(inputs['encoded'], inputs['window_anchor'], inputs['window_shape'],
                                         device=devices.decoder, output_type=types.RGB, adjust_orientation=False,
                                         **absolute)
        images = fn.resize(images, size=inputs['resize'], interp_type=types.INTERP_LINEAR, antialias=True,
                           device=devices.operators)
        images = fn.slice(images, inputs['crop_anchor'], inputs['crop_shape'], device=devices.operators, **absolute)
        images = fn.crop_mirror_normalize(images, mirror=inputs['mirror'], dtype=types.FLOAT, output_layout='HWC',
                                          mean=[m * 255 for m in mean], std=[s * 255 for s in std],
                                          device=devices.operators)
        pipe.set_outputs(images)
    pipe.build()
    return pipe


def image_size(encoded, path):
    """(height, width) of an image file's bytes from its header, checked as MP and FAST check it (the pixel
    limit; a file PIL cannot open; a JPEG cut short)."""
    if fast_jpeg.is_jpeg(encoded):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(encoded)
        except ValueError:
            height = None
        if height is not None:
            data.check_image_size(path, width, height)
            end = encoded.rfind(END_OF_IMAGE)  # at the very end of a whole file: a short search
            if end < 0 or encoded.find(START_OF_SCAN, end) >= 0:
                raise fast_jpeg.ImageDecodeError.for_file(path, 'the JPEG data ends before its end-of-image '
                                                                'marker: the file is truncated')
            return height, width
    try:
        with data.open_image(io.BytesIO(encoded), path) as img:
            return img.height, img.width
    except data.ImageTooLarge:
        raise
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        raise fast_jpeg.ImageDecodeError.for_file(path, f'{type(err).__name__}: {err}') from None


class Plan(NamedTuple):
    """One sample's DALI inputs: the window of the file to decode (top, left, h, w), the size to resize it to
    (h, w), the box of the resized image to keep (top, left, h, w), and the flip."""
    window: tuple
    resize: tuple
    crop: tuple
    mirror: bool = False


def augmented_plan(height, width, out_size, rng):
    """RandomResizedCrop's window of the file, resized to out_size, and the flip: FAST's draws."""
    box, flip = fast_jpeg.augmented_crop(height, width, rng)
    return Plan(box, (out_size, out_size), (0, 0, out_size, out_size), flip)


def plain_plan(height, width, out_size, resize_size, rng):
    """The whole file resized (shorter side resize_size), a random out_size crop of it and the flip: FAST's
    training crop of the epochs without scale/aspect augmentation."""
    resized = fast_jpeg.resized_shape(height, width, resize_size)
    top, left, flip = fast_jpeg.plain_crop(*resized, out_size, rng)
    return Plan((0, 0, height, width), resized, (top, left, out_size, out_size), flip)


def eval_plan(height, width, out_size, resize_size):
    """The whole file resized (shorter side resize_size) and centre-cropped to out_size, as FAST validates."""
    resized_h, resized_w = fast_jpeg.resized_shape(height, width, resize_size)
    top, left = fast_jpeg.centre_offset(resized_h, out_size), fast_jpeg.centre_offset(resized_w, out_size)
    return Plan((0, 0, height, width), (resized_h, resized_w), (top, left, out_size, out_size))


class TrainPlans:
    """Batch key (epoch, indices, augment, resolution) (samplers.train_key) -> the plans of its samples, seeded
    per sample as FAST's, at the key's resolution (default out_size)."""

    def __init__(self, out_size, seed, plain_resize_size):
        self.out_size, self.seed, self.plain_resize_size = out_size, seed, plain_resize_size

    def __call__(self, key, sizes):
        epoch, indices, augment, resolution = samplers.train_key(key)
        out_size = resolution or self.out_size
        rngs = (fast_jpeg.sample_rng(self.seed, epoch, index) for index in indices)
        if augment:
            return [augmented_plan(h, w, out_size, rng) for (h, w), rng in zip(sizes, rngs)]
        resize_size = max(self.plain_resize_size, out_size)
        return [plain_plan(h, w, out_size, resize_size, rng) for (h, w), rng in zip(sizes, rngs)]

    @staticmethod
    def indices(key):
        return key[1]


class EvalPlans:
    """Batch key (indices) -> the plans of its samples."""

    def __init__(self, out_size, resize_size):
        self.out_size, self.resize_size = out_size, resize_size

    def __call__(self, key, sizes):
        return [eval_plan(h, w, self.out_size, self.resize_size) for h, w in sizes]

    @staticmethod
    def indices(key):
        return key


def feeds(encoded, plans):
    """{input name: the batch fed to it} for the files' bytes and their plans."""
    def boxes(pick):
        return np.array([pick(plan) for plan in plans], dtype=np.int32)
    return {'encoded': [np.frombuffer(e, dtype=np.uint8) for e in encoded],
            'window_anchor': boxes(lambda p: p.window[:2]), 'window_shape': boxes(lambda p: p.window[2:]),
            'resize': np.array([plan.resize for plan in plans], dtype=np.float32),
            'crop_anchor': boxes(lambda p: p.crop[:2]), 'crop_shape': boxes(lambda p: p.crop[2:]),
            'mirror': np.array([int(plan.mirror) for plan in plans], dtype=np.int32)}


class DaliLoader:
    """The batches of `batch_keys` (a batch sampler) of `samples` ((path, label) pairs) through the DALI
    pipeline: (channels_last float32 images, int64 targets) on `device`. `plans` turns a key and its files'
    sizes into the samples' Plans. The pipeline is built on the first iteration (DALI's threads start then)."""

    def __init__(self, samples, batch_keys, plans, batch_size, threads, device):
        self.samples, self.batch_keys, self.plans = samples, batch_keys, plans
        self.batch_size, self.threads, self.device = batch_size, threads, device
        self.pipe = None

    def __len__(self):
        return len(self.batch_keys)

    def __iter__(self):
        if self.pipe is None:
            self.pipe = build_pipeline(self.batch_size, self.threads, PipelineDevices(self.device))
        keys, scheduled = iter(self.batch_keys), deque()
        try:
            self._schedule(next(keys, None), scheduled)
            while scheduled:
                paths, targets = scheduled.popleft()
                images = self._images(paths)
                self._schedule(next(keys, None), scheduled)  # decodes while this batch trains
                yield images, targets
        finally:
            self._drain(scheduled)

    def _schedule(self, key, scheduled):
        if key is None:
            return
        paths, labels = zip(*(self.samples[index] for index in self.plans.indices(key)))
        encoded = [fast_jpeg.read_file(path) for path in paths]
        sizes = [image_size(e, path) for e, path in zip(encoded, paths)]
        for name, batch in feeds(encoded, self.plans(key, sizes)).items():
            self.pipe.feed_input(name, batch)
        self.pipe.schedule_run()
        scheduled.append((paths, torch.tensor(labels, dtype=torch.int64).to(self.device, non_blocking=True)))

    def _images(self, paths):
        """The scheduled batch's images, copied out of DALI's buffers. On CUDA the outputs are bound to torch's
        current stream (DALI's default execution model allocates them per run and releases them in that stream's
        order), and the copy is queued on it, behind whatever last used the memory torch hands out."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        stream = torch.cuda.current_stream(self.device) if self.device.type == 'cuda' else None
        try:
            (images,) = self.pipe.outputs(cuda_stream=stream) if stream is not None else self.pipe.outputs()
        except RuntimeError as err:
            raise undecodable(paths, err) from None
        nhwc = images.as_tensor()
        out = torch.empty(nhwc.shape(), dtype=torch.float32, device=self.device if stream is not None else 'cpu')
        feed_ndarray(nhwc, out, cuda_stream=stream)
        return out.to(self.device).permute(0, 3, 1, 2)  # NCHW view of NHWC: channels_last

    def _drain(self, scheduled):
        """Collect the runs still scheduled when an epoch stops early (or failed), so the next one starts clean."""
        for _ in scheduled:
            try:
                self.pipe.outputs()
            except RuntimeError:
                self.pipe = None  # DALI's pipeline is unusable after an error: a new one next time
                return


def undecodable(paths, err):
    """The ImageDecodeError of a batch DALI could not decode: the file FAST's decoders refuse too, named with
    their reason, or else the batch's files and DALI's words."""
    for path in paths:
        try:
            fast_jpeg.EncodedImage(path).decode()
        except data.UnreadableImage as refused:
            return refused
    words = str(err).split('encountered:')[-1].splitlines()  # after DALI's traceback of the operator
    reason = ' '.join(line.strip() for line in words if line.strip() and not line.startswith(('Current', 'Critical')))
    return fast_jpeg.ImageDecodeError(f"--data-path: DALI could not decode a batch of {len(paths)} images from "
                                      f"'{paths[0]}' ({reason or 'no reason given'}); find the file with "
                                      '--dl-worker-type FAST, then remove or replace it')


def build_loaders(dataset, dataset_test, train_sampler, test_sampler, settings, device):
    """(train loader, validation loader) of DALI batches on `device`, with the batch size, workers (DALI's
    threads), crop and resize sizes and seed (loader_seed) of `settings` (loaders.LoaderSettings)."""
    train = DaliLoader(list(dataset.samples), samplers.EpochBatchSampler(train_sampler, settings.batch_size),
                       TrainPlans(settings.train_crop_size, settings.loader_seed, settings.plain_resize_size),
                       settings.batch_size, settings.workers, device)
    val = DaliLoader(list(dataset_test.samples), BatchSampler(test_sampler, settings.batch_size, drop_last=False),
                     EvalPlans(settings.val_crop_size, settings.val_resize_size), settings.batch_size,
                     settings.workers, device)
    return train, val
