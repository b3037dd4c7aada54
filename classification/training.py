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
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from . import checkpoints, devices, distributed, optimizers, samplers
from .blurpool import MIN_IN_CHANNELS, apply_blurpool, has_blurpool, matches as blurpool_matches
import model as models
from .cli import AUTO_RESUME, UsageError


# --- Checks and set-up ------------------------------------------------------------------------------------------

def check_model_and_resume(model_name, resume_path, output_dir=None, evaluation_flag=None):
    """The checks on --model and --resume both trainers make before any data is read or any file written.
    evaluation_flag: the flag that made the run an evaluation (--test-only, main.py's --evaluate), else None."""
    if model_name not in models.available_models():
        raise UsageError(f"--model: unknown model '{model_name}'; choose one of: " + ', '.join(models.available_models()))
    if resume_path == AUTO_RESUME:
        if evaluation_flag:
            raise UsageError(f'--resume auto with {evaluation_flag}: an evaluation needs a checkpoint that exists; '
                             'name it, --resume PATH')
        if not output_dir:
            raise UsageError("--resume auto resumes from --output-dir's checkpoint.pth: give --output-dir")
        latest = latest_checkpoint(output_dir)
        if os.path.exists(latest) and not os.path.isfile(latest):
            raise UsageError(f"--resume auto: '{latest}' is not a file; move it away or name another --output-dir")
    elif resume_path and not os.path.isfile(resume_path):
        raise UsageError(f"--resume: checkpoint '{resume_path}' does not exist")


def latest_checkpoint(output_dir):
    """The checkpoint every save rewrites (each completed epoch, each stop): what --resume auto resumes from."""
    return os.path.join(output_dir, 'checkpoint.pth')


def checkpoint_to_resume(resume, output_dir):
    """The checkpoint a run resumes from: --resume's, or under --resume auto `output_dir`'s checkpoint.pth when it
    exists, else None (a fresh start), said in one line; it then gets --resume's checks (model, classes, ...)."""
    if resume != AUTO_RESUME:
        return resume or None
    path = latest_checkpoint(output_dir)
    if os.path.isfile(path):
        print(f'--resume auto: resuming from {path}')
        return path
    print(f'--resume auto: no {path} yet, so a fresh start')
    return None


def hmp_config(enabled, bf16_path, fp32_path, opt_level='O1', verbose=False):
    """--hmp and its op lists as the device layer takes them (None without --hmp)."""
    return devices.HmpConfig(bf16_path, fp32_path, opt_level, verbose) if enabled else None


AMP_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16}  # --amp-dtype's choices (timm's names)


def amp_dtype(enabled, name=None):
    """--amp's dtype as the device layer takes it: --amp-dtype (float16 when not given), None without --amp."""
    if not enabled:
        if name is not None:
            raise UsageError(f'--amp-dtype {name} does nothing without --amp: add --amp')
        return None
    return AMP_DTYPES[name or 'float16']


def check_precision(device_kind, amp, hmp):
    """--amp (`amp`: its dtype or None) and --hmp are two mixed precisions, and Gaudi has no float16 one."""
    if amp is not None and hmp:
        raise UsageError('--amp with --hmp: two mixed precisions at once; give --amp (torch.autocast) or --hmp '
                         "(Habana's op lists), not both")
    if amp == torch.float16 and device_kind == 'hpu':
        raise UsageError('--amp-dtype float16: Gaudi trains in bfloat16, not float16; on hpu use --amp '
                         '--amp-dtype bfloat16 or --hmp')


def start(device, *, output_dir, writes, dist_url, dist_timeout):
    """The device (`device`: devices.DeviceSettings), the output folder (created, probed and locked on the rank
    that writes; `writes` is False for a run that only evaluates) and the process group, in that order.
    Returns (device layer, Ranks). --compile is refused here, before anything is read, on a device that cannot
    run it. Repeatable CUDA kernels (device.deterministic) are chosen before the first CUDA call."""
    if device.deterministic and device.kind == 'cuda':
        from . import determinism
        determinism.enable_cuda_determinism()
    dev = devices.create(device.kind, channels_last=device.channels_last, hmp=device.hmp, lazy_mode=device.lazy_mode,
                         index=device.index, amp_dtype=device.amp_dtype, tf32=device.tf32)
    if device.compile and dev.compile_refusal:
        raise UsageError(dev.compile_refusal)
    checkpoints.prepare_output_dir(output_dir, writes=writes)
    ranks = distributed.start(dist_url, dist_timeout, dev.init_distributed)
    return dev, ranks


def seed_everything(seed, deterministic):
    torch.manual_seed(seed)
    if deterministic:
        random.seed(seed)
        np.random.seed(seed)


def build_model(name, num_classes, pretrained=False, blurpool=False, **options):
    """models.create_model, its failures as one line naming the flag; with `blurpool` (--blurpool), BlurPool before
    each downsampling conv (blurpool.apply_blurpool; after the --pretrained weights are loaded)."""
    try:
        model = models.create_model(name, num_classes=num_classes, pretrained=pretrained, **options)
    except models.ModelError as err:
        flag = '--pretrained' if pretrained and 'unknown model' not in str(err) else '--model'
        raise UsageError(f'{flag}: {err}') from None
    if blurpool and not apply_blurpool(model):
        raise no_blurpool_conv(name)
    return model


def no_blurpool_conv(name):
    return UsageError(f'--blurpool: {name} has no convolution with stride > 1 and at least '
                      f'{MIN_IN_CHANNELS} input channels for BlurPool to precede; drop --blurpool')


def check_blurpool(model_name, blurpool):
    """--blurpool on a model where the rule finds no convolution is refused before any data is read: the model
    is built on the meta device (no memory, no initialisation cost) and counted; on the CPU for the few models
    whose initialisation needs data."""
    if not blurpool:
        return
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torchvision's notes on GoogLeNet's and Inception's initialisation
        try:
            with torch.device('meta'):
                model = models.create_model(model_name, num_classes=1000)
        except (NotImplementedError, RuntimeError):
            model = models.create_model(model_name, num_classes=1000)
    if not any(blurpool_matches(module) for module in model.modules()):
        raise no_blurpool_conv(model_name)


def place_model(dev, model, sync_bn=False, distributed=False):
    """The model on the device, in its layout; with --sync-bn on several ranks, with SyncBatchNorm."""
    if torch.are_deterministic_algorithms_enabled():  # determinism.enable_cuda_determinism ran (cuda)
        from . import determinism
        determinism.make_deterministic(model)  # GoogLeNet's aux pooling by a deterministic route
    model = dev.prepare_model(model)
    if distributed and sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def make_optimizer(dev, model, settings):
    """The device's SGD or LARS (fused where it has one) over the model's parameter groups (optimizers.py: one
    group by default; --norm-weight-decay, --bias-weight-decay and LARS split them), laid out for the device.
    `settings`: optimizers.OptimizerSettings."""
    lars = settings.kind == 'lars'
    try:
        groups = optimizers.param_groups(model, settings.weight_decay, settings.norm_weight_decay,
                                         settings.bias_weight_decay, lars)
    except ValueError as err:
        raise UsageError(f'--optimizer lars: {err}') from None
    if len(groups) > 1:
        print('Optimizer groups: ' + optimizers.describe(groups))
    groups = [{k: v for k, v in group.items() if k != 'names'} for group in groups]  # the default stays as before
    optimizer = dev.make_optimizer(groups, lr=settings.lr, momentum=settings.momentum,
                                   weight_decay=settings.weight_decay, kind=settings.kind, nesterov=settings.nesterov,
                                   trust_coefficient=settings.trust_coefficient)
    dev.after_optimizer_created(model, optimizer)
    return optimizer


def make_criterion(label_smoothing=0.0):
    """Cross entropy, with --label-smoothing; it takes class indices or, after mixup/cutmix, probabilities."""
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def make_batch_mix(mixup_alpha, cutmix_alpha, num_classes):
    """torchvision.transforms.v2's MixUp and CutMix (one of the two per batch when both are on), applied on the
    device to the normalised batch, so the FAST pipeline's uint8 batches take them too; None when both are off.
    They draw from the global RNG, which a mid-epoch checkpoint saves, so a resume repeats them."""
    from torchvision.transforms import v2
    mixes = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + \
            ([v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def make_ema(model_without_ddp, decay, steps, global_batch, epochs):
    """torch.optim.swa_utils.AveragedModel keeping an exponential moving average of weights and buffers, updated
    every `steps` steps. `decay` is per image as torchvision's --model-ema-decay: its per-update value is
    1 - min(1, (1 - decay) * global_batch * steps / epochs), torchvision's adjustment."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    alpha = min(1.0, (1.0 - decay) * global_batch * steps / epochs)
    print(f'EMA of the weights: decay {1.0 - alpha:.6g} per update, every {steps} steps')
    return AveragedModel(model_without_ddp, multi_avg_fn=get_ema_multi_avg_fn(1.0 - alpha), use_buffers=True)


class _NoSchedule:
    """The schedule of a run with --custom-lr-values (train.py sets the table's LR per epoch itself)."""

    def after_step(self):
        pass


NO_SCHEDULE = _NoSchedule()


def evaluates_after(epoch, epochs, between=1, offset=0):
    """Whether to evaluate after `epoch`: every `between` epochs from `offset` (Habana 1.7+'s -ebe/-eoe, MLPerf's
    evaluation every 4 epochs), and always after the last."""
    return epoch + 1 == epochs or (epoch >= offset and (epoch - offset) % between == 0)


class StepExtras:
    """What a recipe adds around the optimizer step: mixup/cutmix of the batch, gradient clipping, the schedule's
    per-iteration step, and the EMA update (as torchvision's: every `ema_steps` steps of the epoch, and during
    the LR warm-up the average restarts from the model)."""

    def __init__(self, schedule, mix=None, clip_grad_norm=None, ema=None, ema_steps=32, warmup_epochs=0.0):
        self.schedule = schedule
        self.mix = mix
        self.clip_grad_norm = clip_grad_norm
        self.ema = ema
        self.ema_steps = ema_steps
        self.warmup_epochs = warmup_epochs

    def inputs(self, image, target):
        """(images, loss targets): mixed batch and probability targets with mixup/cutmix."""
        return self.mix(image, target) if self.mix is not None else (image, target)

    def after_step(self, model_without_ddp, epoch, step):
        self.schedule.after_step()
        if self.ema is not None and step % self.ema_steps == 0:
            self.ema.update_parameters(model_without_ddp)
            if epoch < self.warmup_epochs:
                self.ema.n_averaged.fill_(0)


NO_EXTRAS = StepExtras(NO_SCHEDULE)  # the plain step: the batch as it is, no clipping, EMA or per-step schedule


def wrap_ddp(dev, model, distributed, model_name, bucket_cap_mb=None, habana_bucket_cap_mb=None, **ddp_options):
    """(model to train, model_without_ddp): DistributedDataParallel with the device's settings (ddp_options
    override them; --bucket-cap-mb is `bucket_cap_mb`, a trainer's own Habana bucket size, used on hpu only,
    `habana_bucket_cap_mb`) on several ranks, the model itself on one."""
    if not distributed:
        return model, model
    kwargs = dev.ddp_kwargs(model_name, bucket_cap_mb, habana_bucket_cap_mb)
    ddp_model = nn.parallel.DistributedDataParallel(model, **dict(kwargs, **ddp_options))
    return ddp_model, ddp_model.module


def compile_model(dev, model, enabled):
    """--compile: the model to train (DDP-wrapped on several ranks) through torch.compile, as PyTorch's DDP notes
    recommend (compiling the DDP module lets its optimizer split the graph at the gradient buckets). The
    uncompiled module stays model_without_ddp: checkpoints, the EMA and evaluation use it, so saved keys have no
    `_orig_mod.` prefix. The first step compiles (the trainers leave it out of img/s); a new input shape, e.g. a
    short last batch, compiles again."""
    if not enabled:
        return model
    print('--compile: torch.compile(model); the first step of each batch shape compiles')
    return dev.compile(model)


class Resumed(NamedTuple):
    start_epoch: int     # the first epoch to run
    position: int        # samples of start_epoch's order already trained (0: from its start)
    rng_state: object    # the random state saved by a mid-epoch stop, else None
    checkpoint: dict     # the whole checkpoint, for the trainer's own fields


NOT_RESUMED = Resumed(0, 0, None, {})


def resume(checkpoint, dev, model_without_ddp, optimizer, schedule, model_key, ema=None):
    """Load a checkpoint read by checkpoints.load into model, optimizer, schedule (schedules.Schedule, or None
    with --custom-lr-values) and EMA (the model under `model_key`: 'model' for train.py, 'state_dict' for
    main.py). Returns Resumed."""
    check_optimizer_state(checkpoint.get('optimizer'), optimizer)
    dev.load_training_state(model_without_ddp, optimizer, checkpoint[model_key], checkpoint['optimizer'])
    start_epoch, position = resume_position(checkpoint)
    if schedule is not None:
        note = schedule.resume(checkpoint.get('lr_scheduler'), checkpoint.get('schedule'), start_epoch, position)
        if note:
            print(note)
    if ema is not None:
        if checkpoint.get('model_ema') is not None:
            dev.load_module_state(ema, checkpoint['model_ema'])
        else:
            print('--model-ema: the checkpoint has no EMA weights; the average starts from the resumed model')
            dev.load_module_state(ema.module, dev.module_state(model_without_ddp))
    resume_scaler(dev.scaler, checkpoint.get('scaler'))
    return Resumed(start_epoch, position, checkpoint.get('rng_state'), checkpoint)


def resume_scaler(scaler, saved):
    """The loss scaler of --amp float16 goes on at the scale the checkpoint saved (upstream's `scaler` key)."""
    if scaler is not None and saved:
        scaler.load_state_dict(saved)
    elif scaler is not None:
        print('note: --resume: the checkpoint has no loss scaler state (written without --amp float16): the '
              f'scaler starts at its initial scale, {scaler.get_scale():g}')
    elif saved:
        print("note: --resume: the checkpoint's loss scaler state (--amp float16) is not used by this run")


def check_optimizer_state(saved, optimizer):
    """The saved optimizer must have this run's parameter groups (the same --optimizer, --norm-weight-decay and
    --bias-weight-decay): its state cannot be mapped onto other groups."""
    if not isinstance(saved, dict) or 'param_groups' not in saved:
        return

    def shape(groups):
        return [(len(g['params']), 'lars' in g) for g in groups]
    if shape(saved['param_groups']) != shape(optimizer.param_groups):
        raise UsageError(f"--resume: the checkpoint's optimizer has parameter groups of {shape(saved['param_groups'])} "
                         f"(parameters, LARS), this run's {shape(optimizer.param_groups)}: resume with the --optimizer, "
                         '--norm-weight-decay and --bias-weight-decay of the run that wrote it')


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

def train_step(model, loss_fn, optimizer, dev, image, target, clip_grad_norm=None):
    """One optimisation step, with the device's lazy-graph cuts and mixed precision around it, and the gradients'
    norm clipped to `clip_grad_norm` when given. With --amp float16 the device's loss scaler scales the loss,
    unscales the gradients before clipping, and skips the step when they overflowed (weights unchanged; the
    scale halves), as torchvision's reference does."""
    scaler = dev.scaler
    dev.mark_step('before_forward')
    with dev.autocast():
        output = model(image)
        loss = loss_fn(output, target)
    optimizer.zero_grad(set_to_none=True)
    dev.mark_step('before_backward')
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    dev.mark_step('after_backward')
    with dev.optimizer_step_context():
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    dev.mark_step('after_step')
    return output, loss


def logged_figures(dev, watch, epoch, *values):
    """A logged step's `values` (0-d tensors: its loss, accuracies) as Python floats, read together with what
    `watch` (stopping.NonFiniteLossWatch) holds in one device-to-host transfer, after the watch has checked the
    steps of `epoch` so far: raises stopping.NonFiniteLoss on a divergence."""
    host = dev.read_scalars(list(values) + watch.pending())
    watch.check_values(host[len(values):], epoch)
    return host[:len(values)]


def eval_logits(model, images, tta_flip=False):
    """The model's logits for an evaluation batch (NCHW); with `tta_flip` (--tta-flip, FFCV's lr_tta) the sum of
    the logits of each image and of its left-right mirror."""
    output = model(images)
    if tta_flip:
        output = output + model(torch.flip(images, dims=(3,)))
    return output


# --- Epochs: where they start, where a stop leaves them, and saving ------------------------------------------------

def start_epoch(epoch, resumed, train_sampler, dev, batch_size, seed, augment=True, resolution=None):
    """Set the data order, augmentation (`augment` False: no scale/aspect augmentation), training resolution
    (`resolution`: progressive resizing's crop size; None: the loaders' own) and random state for `epoch`: from
    its start (the main RNG re-seeded from `seed` and the epoch when `seed` is given, so that a
    resumed run repeats an uninterrupted one), or, for the epoch a mid-epoch checkpoint stopped in, from where
    it stopped. Returns the step the epoch starts at."""
    position = resumed.position if epoch == resumed.start_epoch else 0
    train_sampler.set_epoch(epoch, position, augment, resolution)
    if resolution is not None:
        print(f'Epoch {epoch}: training at {resolution} px (progressive resizing)')
    if not augment and position == 0:
        print(f'Epoch {epoch}: no scale/aspect augmentation (random crop of the resized image and flip)')
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
    """Save with `save(position)` (None: a complete epoch), say where the run stopped and how long it took, and
    return the run's exit status (stopping.GracefulStop.exit_status_with_epochs_left: 0 after a scheduler's stop
    signal, cli.RERUN_EXIT_STATUS under --resume auto)."""
    started = time.time()
    path = save(position)
    stop.wait_for_the_save()
    what = 'fault' if stop.is_fault else 'signal'
    where = f'epoch {epoch} (complete)'
    if position is not None:
        seen = f', {what} seen at step {stop.seen_at_step}' if stop.seen_at_step is not None else ''
        where = f'epoch {epoch} after step {step} ({position} samples{seen})'
    if path is None:
        print(f'Stopped by {stop.signal_name}; no --output-dir, so no checkpoint was written')
    else:
        print(f'Stopped by {stop.signal_name}: saved {where} to {path} in {time.time() - started:.1f} s '
              f'({time.time() - stop.received_at:.1f} s after the {what}); continue with '
              + ('the same command (--resume auto)' if stop.rerun_status else f'--resume {path}'))
    return stop.exit_status_with_epochs_left


def status_after_the_last_epoch(stop):
    """The exit status of a run that trained every epoch: None (finished), or, when a stop came during the last
    validation or save (the ranks agree on it here), that stop's status, with one line."""
    if not stop.at_epoch_end():
        return None
    print(f'Stopped by {stop.signal_name} after the last epoch had trained; its validation may be cut short')
    return stop.exit_status


def schedule_fields(schedule, ema=None):
    """The checkpoint fields of the schedule ('lr_scheduler', torchvision's key, and 'schedule', where it stands)
    and of the EMA ('model_ema', torchvision's key), for save_checkpoint's `fields`."""
    fields = {'lr_scheduler': schedule.scheduler.state_dict() if schedule is not None else None,
              'schedule': schedule.state_dict() if schedule is not None else None}
    if ema is not None:
        fields['model_ema'] = ema
    return fields


def save_checkpoint(dev, model_without_ddp, optimizer, fields, paths, *, model_name, classes, model_key='model',
                    position=None):
    """Write the checkpoint to each of `paths` (rank 0, atomically): the model under `model_key`, the optimizer,
    the trainer's `fields` and the identity stamp (`model_name`, whether the model has BlurPool, and the class names in
    label order, `classes`); after a mid-epoch stop (at `position`, samples of the epoch's order trained), also what
    a resume needs to continue exactly. Returns the first path."""
    with dev.checkpoint_state(model_without_ddp, optimizer) as (model_state, optimizer_state):
        if fields.get('model_ema') is not None:
            fields = dict(fields, model_ema=dev.module_state(fields['model_ema']))
        if dev.scaler is not None:
            fields = dict(fields, scaler=dev.scaler.state_dict())
        checkpoint = checkpoints.stamp({model_key: model_state, 'optimizer': optimizer_state, **fields},
                                       model_name, len(classes), classes, blurpool=has_blurpool(model_without_ddp))
        if position is not None:
            checkpoint.update(epoch_position=position, rng_state=dev.rng_state())
        checkpoints.save(checkpoint, *paths)
    return paths[0]
