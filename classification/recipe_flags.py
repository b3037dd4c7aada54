"""The recipe flags (cli.add_recipe_args) as both trainers read them: the command line with its --recipe expanded,
the checks made before any data is read, and the values the training core takes (schedules.ScheduleConfig,
loaders.Augmentation, the optimizer and the step's extras). The only module below the trainers that reads `args`,
as upstream's train.py reads it.
"""
import shlex
import sys

import torch

from . import distributed, loaders, optimizers, recipes, resolution, schedules, training
from .cli import UsageError


def launched_world_size(world_size_flag=1):
    """The world size the launcher's variables give (mpirun, torchrun, SLURM), else the --world-size flag's (a
    --print-schedule or a recipe expanded outside a launcher)."""
    rank, world_size, _, launcher = distributed.discover_ranks()
    return world_size if launcher is not None else max(world_size_flag or 1, 1)


def parse_args(parser, argv):
    """Parse argv with its --recipe expanded in front (recipes.expand); print the recipe and the equivalent
    command line on the first rank; `--recipe list` prints the recipes and exits."""
    rank = distributed.discover_ranks()[0]
    try:
        known, _ = parser.parse_known_args(argv)
        expanded, lines = recipes.expand(parser, argv, launched_world_size(getattr(known, 'world_size', 1)))
    except UsageError as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    args = parser.parse_args(expanded)
    if args.recipe == 'list':
        try:
            print(recipes.listing(), flush=True)
        except BrokenPipeError:  # piped into head: the reader has what it wanted
            pass
        sys.exit(0)
    if lines and rank == 0:
        print('\n'.join(lines))
        print('Equivalent command line: ' + shlex.join([parser.prog, *expanded]), flush=True)
    return args


def schedule_config(args):
    phases = tuple(schedules.parse_phase(text) for text in args.lr_phases or ())
    return schedules.ScheduleConfig(
        name=args.lr_scheduler, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs,
        step_size=args.lr_step_size, gamma=args.lr_gamma, warmup_epochs=args.lr_warmup_epochs,
        warmup_method=args.lr_warmup_method, warmup_decay=args.lr_warmup_decay, lr_min=args.lr_min,
        power=args.lr_power, decay_epochs=args.lr_decay_epochs, phases=phases,
        peak_epoch=args.lr_peak_epoch)


def augmentation(args):
    return loaders.Augmentation(args.auto_augment, args.random_erase, args.ra_magnitude, args.augmix_severity)


def progressive_resizing(args):
    """resolution.ProgressiveResizing of --min-res, --max-res, --start-ramp, --end-ramp, --res-rounding; None
    without them."""
    return resolution.from_arguments(vars(args))


def training_resolution(args, epoch):
    """The training crop size of `epoch`: progressive resizing's, else None (the loaders' --train-crop-size)."""
    schedule = progressive_resizing(args)
    return schedule.at(epoch) if schedule else None


def has_plain_crop_epochs(args):
    """Whether some epoch of the schedule trains without scale/aspect augmentation (a noaug collapse phase)."""
    return any(not phase.augment for phase in schedule_config(args).phases)


def loader_settings(args, *, seed, seeded, batch_size, cache_dataset=False):
    """loaders.LoaderSettings of a trainer's data flags. `seed` orders the training samples; `seeded` also draws
    each sample's augmentation from it (train.py's --deterministic, main.py's --seed), else the loaders' own
    seed is drawn from the global RNG."""
    return loaders.LoaderSettings(
        kind=args.dl_worker_type, batch_size=batch_size, workers=args.workers, seed=seed, seeded=seeded,
        loader_seed=seed if seeded else int(torch.randint(2 ** 31, ()).item()),
        train_crop_size=args.train_crop_size, val_resize_size=args.val_resize_size, val_crop_size=args.val_crop_size,
        cache_dataset=cache_dataset, output_dir=args.output_dir, augmentation=augmentation(args),
        plain_crop_epochs=has_plain_crop_epochs(args), progressive=progressive_resizing(args) is not None,
        synthetic_images=args.dataset_size,
        prefetch=getattr(args, 'prefetch', True))


def check(args):
    """Refuse recipe flags that cannot work, before any data is read or any file written."""
    from . import data
    try:
        schedules.check(schedule_config(args))
    except UsageError as err:
        if args.recipe == recipes.DEFAULT:
            raise
        raise UsageError(f'{err} (a value --recipe {args.recipe} sets, for its own --epochs: give the flag too, '
                         'e.g. for a shorter trial run)') from None
    if not 0 <= args.label_smoothing < 1:
        raise UsageError(f'--label-smoothing must be in [0, 1), got {args.label_smoothing:g}')
    for flag, value in (('--mixup-alpha', args.mixup_alpha), ('--cutmix-alpha', args.cutmix_alpha),
                        ('--random-erase', args.random_erase)):
        if value < 0:
            raise UsageError(f'{flag} must be at least 0, got {value:g}')
    if args.random_erase > 1:
        raise UsageError(f'--random-erase is a probability, at most 1, got {args.random_erase:g}')
    if args.clip_grad_norm is not None and args.clip_grad_norm <= 0:
        raise UsageError(f'--clip-grad-norm must be above 0, got {args.clip_grad_norm:g}')
    if args.model_ema_steps < 1 or not 0 < args.model_ema_decay < 1:
        raise UsageError('--model-ema-steps must be at least 1 and --model-ema-decay in (0, 1), got '
                         f'{args.model_ema_steps} and {args.model_ema_decay:g}')
    if args.auto_augment is not None and args.auto_augment not in data.AUTO_AUGMENT:
        raise UsageError(f"--auto-augment: unknown policy '{args.auto_augment}'; choose one of "
                         + ', '.join(data.AUTO_AUGMENT))
    if args.epochs_between_evals < 1 or args.eval_offset_epochs < 0:
        raise UsageError('--epochs-between-evals must be at least 1 and --eval-offset-epochs at least 0, got '
                         f'{args.epochs_between_evals} and {args.eval_offset_epochs}')
    if args.dataset_size is not None and args.dataset_size < 1:
        raise UsageError(f'--dataset-size must be at least 1, got {args.dataset_size}')
    if args.optimizer == 'lars' and (args.norm_weight_decay or args.bias_weight_decay):
        raise UsageError('--optimizer lars applies no weight decay to normalisation layers and biases (MLPerf, '
                         'Habana): leave --norm-weight-decay and --bias-weight-decay unset')
    progressive = progressive_resizing(args)
    loaders.check_augmentation(loaders.resolve_kind(args.dl_worker_type, say=False), augmentation(args),
                               has_plain_crop_epochs(args), progressive is not None)


def make_optimizer(dev, model, args):
    """training.make_optimizer with --optimizer, --nesterov, the weight-decay groups and LARS's trust coefficient."""
    settings = optimizers.OptimizerSettings(args.lr, args.momentum, args.weight_decay, kind=args.optimizer,
                                            nesterov=args.nesterov, norm_weight_decay=args.norm_weight_decay,
                                            bias_weight_decay=args.bias_weight_decay,
                                            trust_coefficient=args.lars_trust_coefficient)
    return training.make_optimizer(dev, model, settings)


def make_extras(args, schedule, model_without_ddp, num_classes, global_batch):
    """training.StepExtras of the flags: mixup/cutmix, --clip-grad-norm, the schedule, and the EMA model
    (`extras.ema`, None without --model-ema)."""
    ema = training.make_ema(model_without_ddp, args.model_ema_decay, args.model_ema_steps, global_batch,
                            args.epochs) if args.model_ema else None
    return training.StepExtras(schedule, training.make_batch_mix(args.mixup_alpha, args.cutmix_alpha, num_classes),
                               args.clip_grad_norm, ema, args.model_ema_steps, args.lr_warmup_epochs)


def make_schedule(optimizer, args, iterations_per_epoch, global_batch):
    schedule = schedules.Schedule(optimizer, schedule_config(args), min(iterations_per_epoch, args.num_train_steps),
                                  global_batch)
    note = schedule.overrun_note()
    if note:
        print(note)
    return schedule


def print_schedule(args, world_size, lr_table=None):
    """--print-schedule: the schedule for these flags and world size, over --dataset-size images (default
    ImageNet-1k's training split); no device, data or output folder is touched. `lr_table`: train.py's
    --custom-lr-values, one LR per epoch."""
    dataset_size = args.dataset_size or schedules.IMAGENET_TRAIN_IMAGES
    ipe = schedules.iterations_per_epoch(dataset_size, world_size, args.batch_size, args.num_train_steps)
    print(f'{dataset_size} training images, {world_size} rank(s) x batch {args.batch_size}')
    if lr_table:
        print(f'Schedule --custom-lr-values: {args.epochs} epochs x {ipe} iterations, set per epoch')
        print('\n'.join(f'epoch {epoch:>4d}  lr {lr:.9g}  wd {args.weight_decay:g}' for epoch, lr in enumerate(lr_table)))
        return
    print('\n'.join(schedules.schedule_lines(schedule_config(args), ipe, world_size * args.batch_size)))
    if progressive_resizing(args):
        print('\n'.join(resolution_lines(progressive_resizing(args), args.epochs)))


def resolution_lines(schedule, epochs):
    """--print-schedule's training resolutions: the rule, then each run of epochs at one resolution."""
    lines = [f'Progressive resizing: {schedule.describe()}']
    first = 0
    for epoch in range(1, epochs + 1):
        if epoch == epochs or schedule.at(epoch) != schedule.at(first):
            span = f'epoch {first}' if epoch - 1 == first else f'epochs {first}-{epoch - 1}'
            lines.append(f'  {span}: train at {schedule.at(first)} px')
            first = epoch
    return lines
