"""Write scikit-learn's digits (8x8 grey, 1797 images, 10 classes) as an ImageFolder of real JPEG files.

    python benchmarks/digits_dataset.py OUT --size 64

gives OUT/train/<digit>/<index>.jpg and OUT/val/<digit>/<index>.jpg: a fixed stratified 80/20 split
(sklearn train_test_split, random_state 0), each image scaled from 0..16 to 0..255, upscaled to
--size x --size with bicubic interpolation and saved as an RGB JPEG (quality 95). The output is the same
on every run (same files, same bytes for the same Pillow/libjpeg).
"""
import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def write(out, size=64, val_fraction=0.2, seed=0):
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target)
    counts = {}
    for split, chosen in (('train', train_idx), ('val', val_idx)):
        for index in sorted(chosen.tolist()):
            label = int(digits.target[index])
            folder = os.path.join(out, split, str(label))
            os.makedirs(folder, exist_ok=True)
            grey = np.clip(np.rint(digits.images[index] * (255.0 / 16.0)), 0, 255).astype(np.uint8)
            img = Image.fromarray(grey, mode='L').resize((size, size), Image.BICUBIC).convert('RGB')
            img.save(os.path.join(folder, f'{index:04d}.jpg'), format='JPEG', quality=95)
        counts[split] = len(chosen)
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('out', help='output folder (gets train/ and val/)')
    parser.add_argument('--size', type=int, default=64, help='side of the square JPEGs in pixels (default 64)')
    parser.add_argument('--val-fraction', type=float, default=0.2, help='share of each class held out (0.2)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the stratified split (0)')
    args = parser.parse_args()
    counts = write(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} training and {counts['val']} validation images of {args.size}x{args.size} "
          f'to {args.out}')


if __name__ == '__main__':
    main()
