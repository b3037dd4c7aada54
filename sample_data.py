"""Write a small ImageFolder dataset of real JPEG files (train/ and val/, one folder per class).

Used by the README quick start, the tests and the benchmarks. The pictures are crops and rescales of
the two sample photos that ship with scikit-learn, tinted per class so that a short run can learn
them. `--imagenet-like` gives ImageNet-sized files (shorter side 300-500 px, quality 75-95, about
110 KB with sensor-like grain); the default gives small files for quick runs.

    python sample_data.py /tmp/sample_data --classes 10 --train-per-class 20 --val-per-class 5
"""
import argparse
import importlib.util
import os

import numpy as np
from PIL import Image, ImageFilter

from classification import progress

PRESETS = {
    # shorter side (px), JPEG quality, smallest crop of the photo (fraction of its sides), unsharp-mask
    # strength (%), grain sigma, share of files with full-resolution chroma (4:4:4 rather than 4:2:0)
    'small': dict(short_side=(40, 72), quality=(75, 95), min_crop=1 / 3, sharpen=0, grain=(0.0, 2.0),
                  full_chroma=0.0),
    # Calibrated to ImageNet's ~110 KB average: the sample photos are smaller than the output, so the
    # detail that upscaling smooths away is given back as sharpening and grain.
    'imagenet_like': dict(short_side=(300, 500), quality=(75, 95), min_crop=0.8, sharpen=500,
                          grain=(10.0, 14.0), full_chroma=0.4),
}


def source_photos():
    """scikit-learn's sample photos (china.jpg, flower.jpg), read without importing scikit-learn."""
    spec = importlib.util.find_spec('sklearn')
    if spec is None:
        raise SystemExit('sample_data.py needs scikit-learn for its sample photos: pip install scikit-learn')
    folder = os.path.join(os.path.dirname(spec.origin), 'datasets', 'images')
    return [np.asarray(Image.open(os.path.join(folder, name)).convert('RGB')) for name in ('china.jpg', 'flower.jpg')]


def class_tint(class_index, num_classes):
    """An RGB gain per class, spread around the colour wheel."""
    angle = 2 * np.pi * class_index / max(num_classes, 1)
    return 0.75 + 0.35 * np.cos(angle + np.array([0.0, 2.1, 4.2]))


def make_picture(photos, class_index, num_classes, rng, preset):
    photo = photos[rng.integers(len(photos))]
    h, w = photo.shape[:2]
    ch = rng.integers(int(h * preset['min_crop']), h + 1)
    cw = rng.integers(int(w * preset['min_crop']), w + 1)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(photo[y:y + ch, x:x + cw])
    short = rng.integers(preset['short_side'][0], preset['short_side'][1] + 1)
    aspect = rng.uniform(3 / 4, 4 / 3)
    size = (int(round(short * max(aspect, 1))), int(round(short * max(1 / aspect, 1))))
    picture = crop.resize(size, Image.BICUBIC)
    if preset['sharpen']:
        picture = picture.filter(ImageFilter.UnsharpMask(radius=1.5, percent=preset['sharpen'], threshold=0))
    pixels = np.asarray(picture, dtype=np.float32) * class_tint(class_index, num_classes)
    pixels += rng.normal(0.0, rng.uniform(*preset['grain']), pixels.shape[:2] + (1,))
    if rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def save_jpeg(picture, path, rng, preset):
    quality = int(rng.integers(preset['quality'][0], preset['quality'][1] + 1))
    subsampling = 0 if rng.random() < preset['full_chroma'] else 2
    picture.save(path, format='JPEG', quality=quality, subsampling=subsampling)


def make_dataset(root, classes=10, train_per_class=20, val_per_class=5, imagenet_like=False, seed=0):
    """Write root/train/class_XX/*.JPEG and root/val/class_XX/*.JPEG; return the number of files. A run of more
    than a few seconds shows its progress on stderr (progress.py)."""
    preset = PRESETS['imagenet_like' if imagenet_like else 'small']
    photos = source_photos()
    rng = np.random.default_rng(seed)
    written = 0
    with progress.Progress(f'Writing {root}', total=classes * (train_per_class + val_per_class),
                           unit='JPEG files') as shown:
        for split, per_class in (('train', train_per_class), ('val', val_per_class)):
            for c in range(classes):
                folder = os.path.join(root, split, f'class_{c:02d}')
                os.makedirs(folder, exist_ok=True)
                for i in range(per_class):
                    picture = make_picture(photos, c, classes, rng, preset)
                    save_jpeg(picture, os.path.join(folder, f'{split}_{c:02d}_{i:05d}.JPEG'), rng, preset)
                    written += 1
                    shown.update(written)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('root', help='folder to write (train/ and val/ are created inside)')
    parser.add_argument('--classes', type=int, default=10)
    parser.add_argument('--train-per-class', type=int, default=20)
    parser.add_argument('--val-per-class', type=int, default=5)
    parser.add_argument('--imagenet-like', action='store_true', help='ImageNet-sized JPEGs (about 110 KB each)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    n = make_dataset(args.root, args.classes, args.train_per_class, args.val_per_class, args.imagenet_like, args.seed)
    print(f'wrote {n} JPEG files under {args.root}')


if __name__ == '__main__':
    main()
