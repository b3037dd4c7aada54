"""Checkpoint files: what they hold, how they are written and how they are checked when read back.

Every checkpoint is a dict of tensors and plain Python values, so `torch.load(path, weights_only=True)`
reads it (upstream stores an argparse.Namespace, which weights_only refuses). Besides the trainer's
own keys it records the model name, the number of classes and a format version, and resuming with a
different model or class count is refused.

Checkpoints written by the originals are resumed too: torchvision's reference train.py (Habana's
included; `args` is an argparse.Namespace, allowed for this load only) and pytorch/examples' or Habana's
GoogLeNet main.py (`arch`, `state_dict`). Their model name and class count are read from `args.model`
or `arch` and from the classifier's weight, and checked the same way.
"""
import argparse
import os
import pickle
import re
import sys
import zipfile

import torch
import torch.distributed as dist

from . import distributed, output_folder
from .cli import UsageError

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


def stamp(checkpoint, model_name, num_classes, classes=None, blurpool=False):
    """Add the identity fields every checkpoint carries, `blurpool: True` when the model has BlurPool layers
    (--blurpool; without the field it has none, as every checkpoint before it), and the class names in label order
    (`classes`, the training folder's) when known; checkpoints written before it, and the originals', have none."""
    checkpoint.update(format_version=FORMAT_VERSION, model_name=model_name, num_classes=num_classes)
    if blurpool:
        checkpoint['blurpool'] = True
    if classes is not None:
        checkpoint['classes'] = list(classes)
    return checkpoint


def prepare_output_dir(folder, writes):
    """Create, probe and lock --output-dir on the rank that writes, before any work starts
    (output_folder.claim); `writes` is False for runs that only evaluate."""
    output_folder.claim(folder, distributed.discover_ranks()[0], writes)


def save(checkpoint, *paths):
    """Write on rank 0 only, each file atomically (a kill mid-write leaves the old file intact); a failed
    write ends the run with one line (output_folder.SaveFailed, exit 1)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for path in paths:
        output_folder.atomic_save(checkpoint, path, 'checkpoint')


def load(path, model_name, num_classes, required_keys, flag='--resume', resuming=True, classes=None, blurpool=None):
    """Read and check a checkpoint written by these trainers or by the originals; any problem is one
    clear UsageError. model_name, num_classes: what it must hold (None: whatever it holds). resuming: False
    when only the weights are wanted (inference), so an original's optimizer and schedule are not checked.
    classes: the dataset's class names, which a checkpoint that records its own must hold in the same order.
    blurpool: whether this run's model has BlurPool (--blurpool), which the checkpoint's must match (None: any)."""
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: checkpoint '{path}' does not exist")
    checkpoint = read(path, flag)
    if isinstance(checkpoint, dict) and 'format_version' not in checkpoint:
        checkpoint = from_original(checkpoint, path, required_keys, flag, resuming)
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
    if model_name is not None and checkpoint['model_name'] != model_name:
        raise UsageError(f"{flag}: '{path}' holds a {checkpoint['model_name']} model but --model is "
                         f'{model_name}')
    if blurpool is not None:
        check_blurpool(bool(checkpoint.get('blurpool')), blurpool, path, flag)
    if num_classes is not None and checkpoint['num_classes'] != num_classes:
        raise UsageError(f"{flag}: '{path}' was trained on {checkpoint['num_classes']} classes but the "
                         f'dataset has {num_classes}')
    if classes is not None:
        check_classes(checkpoint.get('classes'), list(classes), path, flag)
    return checkpoint


def check_blurpool(saved, wanted, path, flag):
    """A BlurPool model's weights sit under other names (blurpool.py): the run must build the model it resumes."""
    if saved != wanted:
        how, fix = ('with', 'add --blurpool') if saved else ('without', 'drop --blurpool')
        raise UsageError(f"{flag}: '{path}' holds a model {how} BlurPool but this run has {'no ' if saved else ''}"
                         f'--blurpool; {fix} to resume it')


def check_classes(saved, classes, path, flag):
    """The same labels must mean the same classes (checkpoints without a class list predate it: not checked)."""
    if saved is None or list(saved) == classes:
        return
    label, ours, theirs = next((i, a, b) for i, (a, b) in enumerate(zip(classes, saved)) if a != b)
    raise UsageError(f"{flag}: '{path}' was trained with other class names: label {label} is '{theirs}' there but "
                     f"'{ours}' in this dataset (same count, other folders: its labels would mean other classes)")


ANSI_ESCAPE = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')


def plain_text(err):
    """The first line of an exception's message, without the terminal colour codes torch puts in."""
    text = ANSI_ESCAPE.sub('', str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read(path, flag):
    """torch.load with weights_only, plus argparse.Namespace: the originals store their arguments as one,
    and it holds nothing but attribute values (which weights_only still restricts)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r'GLOBAL ([\w.]+)', str(err))
        if unsafe:
            raise UsageError(f"{flag}: '{path}' holds a Python object of type {unsafe.group(1)}, which is not "
                             'loaded because loading it could run code from the file; neither these scripts nor '
                             "torchvision's reference scripts write such objects") from None
        raise _unreadable(path, flag, err) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise _unreadable(path, flag, err) from None


def _unreadable(path, flag, err):
    return UsageError(f"{flag}: '{path}' is not a readable checkpoint (truncated or not written by "
                      f'torch.save?): {plain_text(err)}')


def from_original(checkpoint, path, required_keys, flag, resuming=True):
    """A checkpoint of torchvision's reference train.py, or of pytorch/examples' or Habana's main.py, in
    this trainer's form (identity fields added). Anything else is returned unchanged (and refused)."""
    if 'model' in checkpoint and 'epoch' in checkpoint:
        source, state_key = "torchvision's reference train.py", 'model'
        saved_args = checkpoint.get('args')
        saved_args = vars(saved_args) if isinstance(saved_args, argparse.Namespace) else saved_args or {}
        model_name, optimizer_name = saved_args.get('model'), saved_args.get('opt')
    elif 'state_dict' in checkpoint and 'arch' in checkpoint:
        source, state_key, model_name, optimizer_name = 'an ImageNet main.py', 'state_dict', checkpoint['arch'], None
        checkpoint = dict(checkpoint, state_dict=strip_wrapper_prefix(checkpoint['state_dict']))
        if 'scheduler' in checkpoint and 'lr_scheduler' not in checkpoint:
            # pytorch/examples: `scheduler`, and `epoch` is the next epoch to run (Habana's is the last one run)
            checkpoint['lr_scheduler'] = checkpoint.pop('scheduler')
            checkpoint['epoch'] -= 1
    else:
        return checkpoint
    missing = [k for k in required_keys if k not in checkpoint]
    if missing:
        raise UsageError(f"{flag}: '{path}' was written by {source} and lacks {', '.join(missing)}; train.py resumes "
                         "torchvision reference checkpoints, main.py those of pytorch/examples' and Habana's main.py")
    if not isinstance(model_name, str):
        raise UsageError(f"{flag}: '{path}' was written by {source} but does not name its model (no args.model)")
    if resuming:
        check_resumable_training_state(checkpoint, path, flag, optimizer_name)
        print(f"{flag}: '{path}' was written by {source}; resuming its model, optimizer and learning-rate schedule")
    else:  # on stderr: inference.py keeps stdout for its predictions
        print(f"{flag}: '{path}' was written by {source}; using its model weights", file=sys.stderr)
    return stamp(checkpoint, model_name, classifier_rows(checkpoint[state_key], path, flag))


def strip_wrapper_prefix(state_dict):
    """pytorch/examples saves the DDP/DataParallel-wrapped model: `module.` in every key."""
    return {re.sub(r'(^|\.)module\.', r'\1', key): value for key, value in state_dict.items()}


def classifier_rows(state_dict, path, flag):
    """The class count: rows of the last 2-D weight, the final classifier of every torchvision model."""
    matrices = [v for k, v in state_dict.items() if k.endswith('weight') and getattr(v, 'ndim', 0) == 2]
    if not matrices:
        raise UsageError(f"{flag}: '{path}' has no classifier weight, so its class count is unknown")
    return matrices[-1].shape[0]


def check_resumable_training_state(checkpoint, path, flag, optimizer_name):
    """These trainers use one SGD parameter group and StepLR; newer torchvision references may not."""
    if optimizer_name is not None and not str(optimizer_name).lower().startswith('sgd'):
        raise UsageError(f"{flag}: '{path}' was trained with --opt {optimizer_name}; these trainers use SGD, so "
                         'its optimizer state cannot be resumed')
    groups = checkpoint['optimizer'].get('param_groups', []) if isinstance(checkpoint.get('optimizer'), dict) else []
    if len(groups) != 1:
        raise UsageError(f"{flag}: '{path}' holds an optimizer with {len(groups)} parameter groups (newer torchvision "
                         'references give norm layers their own weight decay); these trainers use one')
    schedule = checkpoint.get('lr_scheduler')
    if schedule is not None and 'step_size' not in schedule:
        raise UsageError(f"{flag}: '{path}' holds a learning-rate schedule other than StepLR (warm-up, cosine or "
                         'exponential); these trainers use StepLR, so it cannot be resumed')
