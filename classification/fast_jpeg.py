"""The fast JPEG input pipeline: --dl-worker-type FAST, and HABANA where habana_dataloader is missing.

Each loader item is a whole batch, decoded by one worker straight into a uint8 NHWC buffer and handed
over as an NCHW view of it (so already channels_last); NormalizedOnDevice moves it to the device and
converts it to normalised float there. Per image: libjpeg-turbo decode (simplejpeg), then antialiased bilinear
resize of the crop (the same pixels as torchvision on a PIL image, within 1 grey level) and a
horizontal flip. Where csrc/build.sh has built the region decoder, training crops decode only the
rows and columns they need (same pixels); crops at least twice the output size decode at half scale
in the DCT domain (a few grey levels from torchvision's pixels on average, see DCT_REDUCTIONS).

Training crops follow torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, 10 tries, then a
centre crop) and RandomHorizontalFlip(0.5), drawn from a generator seeded by (seed, epoch, sample
index) only, so a run's augmentation does not depend on the number of workers. Validation: resize the
shorter side to resize_size, centre crop val_crop_size.

Files that are not JPEGs libjpeg-turbo can read (PNG, CMYK JPEGs, ...) are decoded with PIL instead,
as the MP loader decodes them (data.to_rgb). A file that PIL cannot read either raises ImageDecodeError
naming the file; one over data.MAX_IMAGE_PIXELS raises data.ImageTooLarge from its header, as in MP.
"""
import ctypes
import io
import math
import os

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, Dataset

from . import data, REPO_ROOT, samplers

SCALE = (0.08, 1.0)
LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
# Training crops at least twice the output size decode at half scale in the DCT domain: a quarter of
# the IDCT and colour conversion work (entropy decoding stays), pixels about 2.5 grey levels from
# torchvision's on grainy photos. Other M/8 scales decode slower than full size, and 1/4 and 1/8 stray
# further (the box snaps to a coarser grid). Validation always decodes at full size.
DCT_REDUCTIONS = (2,)
JPEG_MAGIC = b'\xff\xd8'

# Writes the resized crop straight into the channels_last batch buffer; F.interpolate returns an NCHW
# copy that would need one more transposing copy. Same kernel and pixels; F.interpolate if it is gone.
_resize_aa_out = getattr(getattr(torch.ops.aten, '_upsample_bilinear2d_aa', None), 'out', None)


def load_region_decoder():
    """csrc/jpeg_region.c's fj_decode_region when built (sh csrc/build.sh), else None."""
    path = os.path.join(REPO_ROOT, 'csrc', 'libjpeg_region.so')
    try:
        decode = ctypes.CDLL(path).fj_decode_region
    except (OSError, AttributeError):
        return None
    decode.argtypes = [ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 + [ctypes.c_void_p, ctypes.c_char_p,
                                                                                 ctypes.c_int]
    decode.restype = ctypes.c_int
    return decode


REGION_DECODER = load_region_decoder()


class ImageDecodeError(data.UnreadableImage):
    """An image file that neither libjpeg-turbo nor PIL can decode; the one-line message names the file,
    as the MP pipeline's does."""


def read_file(path):
    with open(path, 'rb') as f:
        return f.read()


def is_jpeg(encoded):
    return encoded[:2] == JPEG_MAGIC


def decode_with_pil(encoded, path):
    """RGB pixels as the MP loader decodes them (data.open_image's size limit, data.to_rgb)."""
    try:
        with data.open_image(io.BytesIO(encoded), path) as img:
            return np.array(data.to_rgb(img))
    except data.ImageTooLarge:
        raise
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, ... for bad files
        raise ImageDecodeError.for_file(path, f'{type(err).__name__}: {err}') from None


class EncodedImage:
    """A file's bytes and pixel size. JPEGs decode with libjpeg-turbo (whole, at half scale, or only a
    box); other files (and CMYK JPEGs) with PIL, once, when the size is read."""

    def __init__(self, path):
        self.path = path
        self.encoded = read_file(path)
        self.pixels = None
        self.height, self.width = self._jpeg_size() or self._decode_full().shape[:2]

    def _jpeg_size(self):
        """(height, width) of a JPEG that libjpeg-turbo decodes as PIL does, else None."""
        if not is_jpeg(self.encoded):
            return None
        try:
            height, width, colorspace, _ = simplejpeg.decode_jpeg_header(self.encoded)
        except ValueError:
            return None
        data.check_image_size(self.path, width, height)
        # libjpeg-turbo's CMYK to RGB conversion rounds differently from PIL's (1 grey level, everywhere)
        return None if colorspace in ('CMYK', 'YCCK') else (height, width)

    def _decode_full(self):
        self.pixels = decode_with_pil(self.encoded, self.path)
        return self.pixels

    def reduced_shape(self, reduction):
        """libjpeg's output size at scale 1/reduction."""
        return -(-self.height // reduction), -(-self.width // reduction)

    def decode(self, reduction=1):
        """RGB HWC uint8 pixels, about 1/reduction of the full size (full size when PIL decodes)."""
        if self.pixels is not None:
            return self.pixels
        min_height, min_width = self.reduced_shape(reduction)
        try:
            return simplejpeg.decode_jpeg(self.encoded, 'RGB', min_height=min_height, min_width=min_width)
        except ValueError:  # CMYK, arithmetic coding, a corrupt stream: PIL decides
            return self._decode_full()

    def decode_box(self, box, reduction=1, region_decode=True):
        """Pixels of box (top, left, h, w in full-size coordinates) at about 1/reduction scale; only the
        box's rows and columns are decoded when the region decoder is built and takes the file."""
        if region_decode and REGION_DECODER is not None and self.pixels is None:
            pixels = self.decode_region(scale_box(box, (self.height, self.width), self.reduced_shape(reduction)),
                                         reduction)
            if pixels is not None:
                return pixels
        pixels = self.decode(reduction)
        top, left, h, w = scale_box(box, (self.height, self.width), pixels.shape[:2])
        return pixels[top:top + h, left:left + w]

    def decode_region(self, box, reduction):
        """The box's pixels from the region decoder, or None when it declines (the full path decides)."""
        top, left, h, w = box
        pixels = np.empty((h, w, 3), dtype=np.uint8)
        message = ctypes.create_string_buffer(200)
        status = REGION_DECODER(self.encoded, len(self.encoded), reduction, top, left, h, w,
                                pixels.ctypes.data, message, len(message))
        return pixels if status == 0 else None


def random_resized_crop_box(height, width, rng):
    """(top, left, h, w) drawn as torchvision's RandomResizedCrop.get_params does, from `rng`."""
    area = height * width
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*LOG_RATIO))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return ratio_clamped_centre_box(height, width)


def sample_rng(seed, epoch, index):
    """The generator of one sample's augmentation: it depends on (seed, epoch, sample index) only."""
    return np.random.default_rng(samplers.sample_seed(seed, epoch, index))


def augmented_crop(height, width, rng):
    """((top, left, h, w), flip) of RandomResizedCrop and RandomHorizontalFlip(0.5), drawn in that order."""
    box = random_resized_crop_box(height, width, rng)
    return box, rng.random() < 0.5


def plain_crop(resized_h, resized_w, crop_size, rng):
    """(top, left, flip) of a random crop_size crop of an image resized to (resized_h, resized_w), then a flip:
    the training crop of the epochs without scale/aspect augmentation."""
    top = int(rng.integers(0, max(resized_h - crop_size, 0) + 1))
    left = int(rng.integers(0, max(resized_w - crop_size, 0) + 1))
    return top, left, rng.random() < 0.5


def ratio_clamped_centre_box(height, width):
    """The fallback of RandomResizedCrop: the whole image, cut to the nearest allowed aspect ratio."""
    min_ratio, max_ratio = 3 / 4, 4 / 3
    h, w = height, width
    if width / height < min_ratio:
        h = int(round(width / min_ratio))
    elif width / height > max_ratio:
        w = int(round(height * max_ratio))
    return (height - h) // 2, (width - w) // 2, h, w


def dct_reduction(region_h, region_w, out_h, out_w):
    """The largest JPEG DCT reduction that keeps the region at least (out_h, out_w), else 1."""
    for reduction in DCT_REDUCTIONS:
        if region_h >= out_h * reduction and region_w >= out_w * reduction:
            return reduction
    return 1


def scale_box(box, full_shape, scaled_shape):
    """(top, left, h, w) in full-size coordinates mapped onto an image of scaled_shape (never empty)."""
    top, left, h, w = box
    sy, sx = scaled_shape[0] / full_shape[0], scaled_shape[1] / full_shape[1]
    y0, x0 = min(round(top * sy), scaled_shape[0] - 1), min(round(left * sx), scaled_shape[1] - 1)
    y1, x1 = min(round((top + h) * sy), scaled_shape[0]), min(round((left + w) * sx), scaled_shape[1])
    return y0, x0, max(y1 - y0, 1), max(x1 - x0, 1)


def as_nchw(hwc):
    """An NCHW view (batch of one) of HWC pixels."""
    return torch.from_numpy(hwc).permute(2, 0, 1).unsqueeze(0)


def resize_into(out_hwc, region_hwc):
    """Antialiased bilinear resize (torchvision's Resize on a PIL image) of region into out_hwc."""
    region = as_nchw(np.ascontiguousarray(region_hwc))
    out = out_hwc.permute(2, 0, 1).unsqueeze(0)
    if _resize_aa_out is not None:
        _resize_aa_out(region, list(out.shape[-2:]), False, None, None, out=out)
    else:
        out.copy_(F.interpolate(region, size=out.shape[-2:], mode='bilinear', antialias=True))


def resized_shape(height, width, short_side):
    """torchvision's Resize(int) output size: shorter side to short_side, longer side truncated."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def centre_offset(size, crop):
    return int(round((size - crop) / 2.0))


def new_batch(count, size):
    """A uint8 NHWC batch buffer."""
    return torch.empty((count, size, size, 3), dtype=torch.uint8)


def batch_output(images_nhwc, labels):
    """(NCHW uint8 view of the NHWC buffer, int64 targets), as the device layer takes them."""
    return images_nhwc.permute(0, 3, 1, 2), torch.tensor(labels, dtype=torch.int64)


class ImageBatches(Dataset):
    """A dataset whose items are whole batches of out_size x out_size uint8 images, so that one worker
    builds a batch in one buffer and no per-sample collation is needed."""

    def __init__(self, samples, out_size):
        self.samples = samples
        self.out_size = out_size

    def __len__(self):
        return len(self.samples)

    def _batch(self, indices, fill, out_size=None):
        """fill(out, index) writes sample index's pixels into its slot of a new batch (of out_size images,
        default self.out_size)."""
        images = new_batch(len(indices), out_size or self.out_size)
        for slot, index in enumerate(indices):
            fill(images[slot], index)
        return batch_output(images, [self.samples[index][1] for index in indices])


class TrainBatches(ImageBatches):
    """Item (epoch, indices, augment, resolution) (samplers.train_key) -> one augmented batch of resolution
    (default crop_size) square images, seeded per sample: RandomResizedCrop + flip, or with augment False a
    random crop of the image resized to its validation size (shorter side `plain_resize_size`, or the crop if
    larger) + flip, the LR-collapse recipe's phase without scale/aspect augmentation."""

    def __init__(self, samples, crop_size, seed, region_decode=True, plain_resize_size=256):
        super().__init__(samples, crop_size)
        self.seed = seed
        self.region_decode = region_decode
        self.plain_resize_size = plain_resize_size

    def __getitem__(self, key):
        epoch, indices, augment, resolution = samplers.train_key(key)
        fill = self._augment_into if augment else self._plain_crop_into
        return self._batch(indices, lambda out, index: fill(out, epoch, index), resolution)

    def _augment_into(self, out, epoch, index):
        """Write sample `index`'s random crop, flipped with probability 0.5, into out."""
        image = EncodedImage(self.samples[index][0])
        box, flip = augmented_crop(image.height, image.width, sample_rng(self.seed, epoch, index))
        reduction = dct_reduction(box[2], box[3], out.shape[0], out.shape[1])
        resize_into(out, image.decode_box(box, reduction, self.region_decode))
        if flip:
            out.copy_(out.flip(1))

    def _plain_crop_into(self, out, epoch, index):
        image = EncodedImage(self.samples[index][0])
        size = out.shape[0]
        resized_h, resized_w = resized_shape(image.height, image.width, max(self.plain_resize_size, size))
        resized = torch.empty((resized_h, resized_w, 3), dtype=torch.uint8)
        resize_into(resized, image.decode())
        top, left, flip = plain_crop(resized_h, resized_w, size, sample_rng(self.seed, epoch, index))
        out.copy_(resized[top:top + size, left:left + size])
        if flip:
            out.copy_(out.flip(1))


class EvalBatches(ImageBatches):
    """Item indices -> one batch resized (shorter side resize_size) and centre-cropped to crop_size."""

    def __init__(self, samples, resize_size, crop_size):
        super().__init__(samples, crop_size)
        self.resize_size = resize_size

    def __getitem__(self, indices):
        return self._batch(indices, self._centre_crop_into)

    def _centre_crop_into(self, out, index):
        image = EncodedImage(self.samples[index][0])
        resized_h, resized_w = resized_shape(image.height, image.width, self.resize_size)
        resized = torch.empty((resized_h, resized_w, 3), dtype=torch.uint8)
        resize_into(resized, image.decode())
        top, left = centre_offset(resized_h, self.out_size), centre_offset(resized_w, self.out_size)
        out.copy_(resized[top:top + self.out_size, left:left + self.out_size])


def batch_loader(dataset, batch_keys, workers, pin_memory, start_method):
    """A DataLoader whose every item is one batch already built by a worker (every random draw is
    seeded per sample, so the workers' own seeds do not matter). Its generator is its own, so that starting
    it never draws from the global RNG (dropout), wherever a run starts or resumes."""
    return data.SignalSafeLoader(dataset, batch_size=None, sampler=batch_keys, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(0),
                                 **data.worker_options(workers, start_method))


class NormalizedOnDevice:
    """The uint8 batches of a loader, moved to `device` and normalised there, (x / 255 - mean) / std, as one
    multiply-add that keeps the batch's channels_last layout: a quarter of the bytes cross to the device."""

    def __init__(self, loader, device, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD):
        self.loader = loader
        self.device = device
        inv_std = 1.0 / (torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)
        self.shift = -torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255 * inv_std
        self.inv_std = inv_std

    def __len__(self):
        return len(self.loader)

    def normalise(self, images):
        """uint8 images already on the device -> normalised float32, in their layout (the prefetcher runs this
        on its side stream, prefetch.py)."""
        return torch.addcmul(self.shift, images, self.inv_std)

    def __iter__(self):
        for images, targets in self.loader:
            images = images.to(self.device, non_blocking=True)
            yield self.normalise(images), targets.to(self.device, non_blocking=True)


def build_loaders(dataset, dataset_test, train_sampler, test_sampler, settings, placement):
    """(train loader, validation loader) yielding normalised float images on placement.device (channels_last)
    and int64 targets, with the batch size, workers, crop and resize sizes and seed (loader_seed) of `settings`
    (loaders.LoaderSettings)."""
    train = TrainBatches(list(dataset.samples), settings.train_crop_size, settings.loader_seed,
                         plain_resize_size=settings.plain_resize_size)
    test = EvalBatches(list(dataset_test.samples), settings.val_resize_size, settings.val_crop_size)
    return tuple(NormalizedOnDevice(batch_loader(batches, keys, settings.workers, placement.pin_memory,
                                                 placement.worker_start_method), placement.device)
                 for batches, keys in ((train, samplers.EpochBatchSampler(train_sampler, settings.batch_size)),
                                       (test, BatchSampler(test_sampler, settings.batch_size, drop_last=False))))
