"""Checkpoint files: what they hold, how they are written and how they are checked when read back.

Every checkpoint is a dict of tensors and plain Python values, so `torch.load(path, weights_only=True)`
reads it (upstream stores an argparse.Namespace, which weights_only refuses). Besides the trainer's
own keys it records the model name, the number of classes and a format version, and resuming with a
different model or class count is refused.
"""
import os
import pickle
import zipfile

import torch

import utils
from utils import UsageError

FORMAT_VERSION = 1


def plain_args(args):
    """The parsed arguments as a dict of plain values (safe for weights_only loading)."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def stamp(checkpoint, model_name, num_classes):
    """Add the identity fields every checkpoint carries."""
    checkpoint.update(format_version=FORMAT_VERSION, model_name=model_name, num_classes=num_classes)
    return checkpoint


def save(checkpoint, *paths):
    """Write on rank 0 only, each file atomically (a kill mid-write leaves the old file intact)."""
    utils.save_on_master(checkpoint, *paths)


def load(path, model_name, num_classes, required_keys, flag='--resume'):
    """Read and check a checkpoint written by these trainers; any problem is one clear UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{flag}: '{path}' is not a readable checkpoint (truncated or not written by "
                         f'torch.save?): {reason}') from None
    if not isinstance(checkpoint, dict) or 'format_version' not in checkpoint:
        raise UsageError(f"{flag}: '{path}' was not written by these training scripts "
                         '(no format_version); to start from bare weights, load them into the model first')
    if checkpoint['format_version'] > FORMAT_VERSION:
        raise UsageError(f"{flag}: '{path}' has checkpoint format {checkpoint['format_version']}, newer than "
                         f'this script understands ({FORMAT_VERSION})')
    missing = [k for k in required_keys if k not in checkpoint]
    if missing:
        raise UsageError(f"{flag}: '{path}' lacks {', '.join(missing)}; it was written by the other trainer "
                         '(train.py and main.py checkpoints differ)')
    if checkpoint['model_name'] != model_name:
        raise UsageError(f"{flag}: '{path}' holds a {checkpoint['model_name']} model but --model is "
                         f'{model_name}')
    if checkpoint['num_classes'] != num_classes:
        raise UsageError(f"{flag}: '{path}' was trained on {checkpoint['num_classes']} classes but the "
                         f'dataset has {num_classes}')
    return checkpoint
