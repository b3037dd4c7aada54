"""The training core both trainers share (train.py for the ResNet family and MobileNetV2, main.py for GoogLeNet).

It owns the order of set-up, `start` (device, output folder, process group), then `build_model`,
`place_model`, `make_optimizer`, `wrap_ddp` and `resume`; the step, `train_step`; and what an epoch loop
needs to stop and continue exactly: `start_epoch`, `unfinished_position`, `stop_and_save` and
`save_checkpoint`. The trainers keep their own loops, meters and log lines (upstream's and pytorch/examples'),
and call these in upstream's order. Every function takes the values it uses; none reads `args`.
"""
import os
import random
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

import checkpoints
import devices
import distributed
import model as models
import samplers
from cli import UsageError


# --- Checks and set-up ------------------------------------------------------------------------------------------

def check_model_and_resume(model_name, resume_path):
    """The checks on --model and --resume both trainers make before any data is read or any file written."""
    if model_name not in models.available_models():
        raise UsageError(f"--model: unknown model '{model_name}'; choose one of: " + ', '.join(models.available_models()))
    if resume_path and not os.path.isfile(resume_path):
        raise UsageError(f"--resume: checkpoint '{resume_path}' does not exist")


def hmp_config(enabled, bf16_path, fp32_path, opt_level='O1', verbose=False):
    """--hmp and its op lists as the device layer takes them (None without --hmp)."""
    return devices.HmpConfig(bf16_path, fp32_path, opt_level, verbose) if enabled else None


def start(device, *, output_dir, writes, dist_url, dist_timeout, channels_last=True, hmp=None, lazy_mode=True,
          index=0):
    """The device, the output folder (created, probed and locked on the rank that writes; `writes` is False
    for a run that only evaluates) and the process group, in that order. Returns (device layer, Ranks)."""
    dev = devices.create(device, channels_last=channels_last, hmp=hmp, lazy_mode=lazy_mode, index=index)
    checkpoints.prepare_output_dir(output_dir, writes=writes)
    ranks = distributed.start(dist_url, dist_timeout, dev.init_distributed)
    return dev, ranks


def seed_everything(seed, deterministic):
    torch.manual_seed(seed)
    if deterministic:
        random.seed(seed)
        np.random.seed(seed)


def build_model(name, num_classes, pretrained=False, **options):
    """models.create_model, its failures as one line naming the flag."""
    try:
        return models.create_model(name, num_classes=num_classes, pretrained=pretrained, **options)
    except models.ModelError as err:
        flag = '--pretrained' if pretrained and 'unknown model' not in str(err) else '--model'
        raise UsageError(f'{flag}: {err}') from None


def place_model(dev, model, sync_bn=False, distributed=False):
    """The model on the device, in its layout; with --sync-bn on several ranks, with SyncBatchNorm."""
    model = dev.prepare_model(model)
    if distributed and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def make_optimizer(dev, model, lr, momentum, weight_decay):
    """The device's SGD (fused where it has one) over the model's parameters, laid out for the device."""
    optimizer = dev.make_optimizer(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    dev.after_optimizer_created(model, optimizer)
    return optimizer


def wrap_ddp(dev, model, distributed, model_name, **ddp_options):
    """(model to train, model_without_ddp): DistributedDataParallel with the device's settings (ddp_options
    override them) on several ranks, the model itself on one."""
    if not distributed:
        return model, model
    ddp_model = nn.parallel.DistributedDataParallel(model, **dict(dev.ddp_kwargs(model_name), **ddp_options))
    return ddp_model, ddp_model.module


class Resumed(NamedTuple):
    start_epoch: int     # the first epoch to run
    position: int        # samples of start_epoch's order already trained (0: from its start)
    rng_state: object    # the random state saved by a mid-epoch stop, else None
    checkpoint: dict     # the whole checkpoint, for the trainer's own fields


NOT_RESUMED = Resumed(0, 0, None, {})


def resume(checkpoint, dev, model_without_ddp, optimizer, lr_scheduler, model_key):
    """Load a checkpoint read by checkpoints.load into model, optimizer and schedule (the model under
    `model_key`: 'model' for train.py, 'state_dict' for main.py). Returns Resumed."""
    dev.load_training_state(model_without_ddp, optimizer, checkpoint[model_key], checkpoint['optimizer'])
    if lr_scheduler is not None and checkpoint.get('lr_scheduler') is not None:
        lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    start_epoch, position = resume_position(checkpoint)
    return Resumed(start_epoch, position, checkpoint.get('rng_state'), checkpoint)


def resume_position(checkpoint):
    """(epoch, position) to continue from: the next epoch from its start, or, after a mid-epoch stop, that
    epoch from `position` samples of its order (checkpoints of the first format stored a step number)."""
    position = checkpoint.get('epoch_position')
    if position is None and checkpoint.get('next_step'):
        saved = checkpoint.get('args') or {}
        position = checkpoint['next_step'] * saved.get('batch_size', 0) * saved.get('world_size', 1)
    if position:
        return checkpoint['epoch'], position
    return checkpoint['epoch'] + 1, 0


# --- The step -----------------------------------------------------------------------------------------------------

def train_step(model, loss_fn, optimizer, dev, image, target):
    """One optimisation step, with the device's lazy-graph cuts and mixed precision around it."""
    dev.mark_step('before_forward')
    with dev.autocast():
        output = model(image)
        loss = loss_fn(output, target)
    optimizer.zero_grad(set_to_none=True)
    dev.mark_step('before_backward')
    loss.backward()
    dev.mark_step('after_backward')
    with dev.optimizer_step_context():
        optimizer.step()
    dev.mark_step('after_step')
    return output, loss


# --- Epochs: where they start, where a stop leaves them, and saving ------------------------------------------------

def start_epoch(epoch, resumed, train_sampler, dev, batch_size, seed):
    """Set the data order and random state for `epoch`: from its start (the main RNG re-seeded from `seed`
    and the epoch when `seed` is given, so that a resumed run repeats an uninterrupted one), or, for the
    epoch a mid-epoch checkpoint stopped in, from where it stopped. Returns the step the epoch starts at."""
    position = resumed.position if epoch == resumed.start_epoch else 0
    train_sampler.set_epoch(epoch, position)
    if not position:
        if seed is not None:
            torch.manual_seed(samplers.epoch_seed(seed, epoch))
        return 0
    dev.set_rng_state(resumed.rng_state)
    first_step = position // (batch_size * train_sampler.num_replicas)
    if samplers.train_batches(len(train_sampler), batch_size):
        print(f'Resuming epoch {epoch} at step {first_step} ({position} of its {train_sampler.dataset_len} '
              'samples trained)')
    else:
        print(f'Resuming epoch {epoch} at its end (nothing left to train at --batch-size {batch_size} on '
              f'{train_sampler.num_replicas} rank(s)): finishing it and going on with epoch {epoch + 1}')
    return first_step


def unfinished_position(stopped_at, first_step, train_sampler, batch_size):
    """After a stop signal ended the epoch's loop before step `stopped_at`, the epoch position to save; None
    when the epoch is finished anyway (the stop came on its last step), so it ends as usual first."""
    if stopped_at is None:
        return None
    position = train_sampler.position_after(stopped_at - first_step, batch_size)
    return position if position < train_sampler.dataset_len else None


def stop_and_save(stop, save, epoch, position=None, step=None):
    """Save with `save(position)` (None: a complete epoch) and say where the run stopped and how long it took."""
    started = time.time()
    path = save(position)
    where = f'epoch {epoch} (complete)'
    if position is not None:
        seen = f', signal seen at step {stop.seen_at_step}' if stop.seen_at_step is not None else ''
        where = f'epoch {epoch} after step {step} ({position} samples{seen})'
    if path is None:
        print(f'Stopped by {stop.signal_name}; no --output-dir, so no checkpoint was written')
        return
    print(f'Stopped by {stop.signal_name}: saved {where} to {path} in {time.time() - started:.1f} s '
          f'({time.time() - stop.received_at:.1f} s after the signal); continue with --resume {path}')


def save_checkpoint(dev, model_without_ddp, optimizer, model_name, num_classes, fields, paths, *, model_key='model',
                    position=None):
    """Write the checkpoint to each of `paths` (rank 0, atomically): the model under `model_key`, the optimizer,
    the trainer's `fields` and the identity stamp; after a mid-epoch stop (at `position`, samples of the epoch's
    order trained), also what a resume needs to continue exactly. Returns the first path."""
    with dev.checkpoint_state(model_without_ddp, optimizer) as (model_state, optimizer_state):
        checkpoint = checkpoints.stamp({model_key: model_state, 'optimizer': optimizer_state, **fields},
                                       model_name, num_classes)
        if position is not None:
            checkpoint.update(epoch_position=position, rng_state=dev.rng_state())
        checkpoints.save(checkpoint, *paths)
    return paths[0]
