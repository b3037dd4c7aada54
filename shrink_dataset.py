"""Write a pre-shrunk copy of an ImageFolder dataset (train/ and val/), as FFCV's writer stores ImageNet.

    python shrink_dataset.py /data/imagenet /data/imagenet-500 --max-side 500 --quality 90 --workers 16

Every image becomes a JPEG whose longer side is at most --max-side (never upscaled), read as the trainers read it;
an interrupted run is finished by running the same command again. What it does exactly: classification/shrink.py
and docs/data.md.
"""
import os
import sys

from classification import cli


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def build_parser():
    parser = cli.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('source', metavar='SOURCE', help='dataset folder with train/ and val/ (class folders inside)')
    parser.add_argument('dest', metavar='DEST', help='folder for the copy (created; a rerun finishes an interrupted one)')
    parser.add_argument('--max-side', type=int, default=500,
                        help='longest side in pixels (default 500, FFCV\'s ResNet-50 data; its ResNet-18 data: 400)')
    parser.add_argument('--quality', type=int, default=90, help='JPEG quality of the files re-encoded, 1-100 (default 90)')
    parser.add_argument('--workers', type=int, default=default_workers(),
                        help='processes that shrink files (default: the CPUs this process may use; 0: this process)')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from classification import shrink  # after parsing: --help and flag errors need no torch
    return cli.run_cli(shrink.run, args.source, args.dest, args.max_side, args.quality, args.workers)


if __name__ == '__main__':
    sys.exit(main())
