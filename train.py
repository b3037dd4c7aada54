"""ImageNet classification trainer for the ResNet family and MobileNetV2 on Gaudi (hpu), CUDA and CPU.

A port of Habana's 1.4.0 train.py, itself torchvision's references/classification/train.py (release
0.10) plus Habana's changes. Its functions, flags and log lines follow upstream, in upstream's order;
what we add sits behind calls with plain names: the device layer (devices.py, through training.py's
`train_step`), the input pipelines (loaders.py), the stop on SIGTERM and on a NaN loss (stopping.py), and
the mid-epoch resume (training.py). The deliberate changes are listed in docs/upstream-diff.md.
"""
import datetime
import math
import os
import sys
import time

from classification import start_up
if __name__ == '__main__':
    start_up.guard(sys.argv)  # before anything slow: a stop signal from here on ends the run with one line

import torch  # noqa: E402

from classification import (benchmark_modes, checkpoints, cli, devices, distributed, faults, loaders, metrics,
                            recipe_flags, stopping, training)
import utils  # noqa: E402
from classification.cli import UsageError  # noqa: E402


def train_one_epoch(model, criterion, optimizer, data_loader, dev, epoch, print_freq, *, dl_time_exclude=True,
                    num_train_steps=sys.maxsize, stop=None, first_step=0, extras=training.NO_EXTRAS,
                    model_without_ddp=None, compiles=False, metrics_file=metrics.NO_METRICS):
    """Train one epoch (from `first_step` when resuming mid-epoch), with a recipe's `extras` around each step
    (training.StepExtras: mixup/cutmix, clipping, the per-iteration schedule, the EMA update), writing each
    log line's values to `metrics_file` (metrics.MetricsFile) too. `compiles`: the first step compiles the
    model (--compile, the run's first epoch): its line shows img/s nan and the next window starts after it.

    Returns (images trained, step to resume from when a stop signal ended the epoch early, else None).
    The meters are updated on logged steps only, where the step waits for the device anyway; a NaN or
    infinite loss raises stopping.NonFiniteLoss there.
    """
    model.train()
    metric_logger = utils.MetricLogger(delimiter='  ', device=dev.collective_device)
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value}'))
    metric_logger.add_meter('img/s', utils.SmoothedValue(window_size=10, fmt='{value}'))

    header = f'Epoch: [{epoch}]'
    throughput = utils.ThroughputWindow()
    nonfinite = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    batches = metric_logger.log_every(data_loader, print_freq, header, max_steps=num_train_steps - first_step)
    for step, (image, target) in enumerate(batches, start=first_step):
        distributed.progress(epoch, step)
        image, target = dev.to_device(image, target)
        throughput.data_ready()
        lr = optimizer.param_groups[0]['lr']
        image, loss_target = extras.inputs(image, target)
        output, loss = training.train_step(model, criterion, optimizer, dev, image, loss_target, extras.clip_grad_norm)
        extras.after_step(model_without_ddp, epoch, step)
        throughput.step_done(image.shape[0])
        compiling = compiles and step == first_step
        compile_seconds = time.time() - throughput.start if compiling else None
        nonfinite.track(loss, step, lr)

        if (step - first_step) % print_freq == 0:
            acc1, acc5 = utils.accuracy(output, target, topk=(1, 5), on_host=not dev.accuracy_on_device)
            batch_size = throughput.images
            loss_value, acc1, acc5 = training.logged_figures(dev, nonfinite, epoch, loss, acc1, acc5)
            metric_logger.update(loss=loss_value, lr=lr)
            metric_logger.meters['acc1'].update(acc1, n=batch_size)
            metric_logger.meters['acc5'].update(acc5, n=batch_size)
            window = throughput.close()
            compute_ips, total_ips = (math.nan, math.nan) if compiling else (window.compute_ips, window.total_ips)
            metric_logger.meters['img/s'].update(compute_ips if dl_time_exclude else total_ips)
            metrics_file.train_window(epoch, step, lr=lr, loss=loss_value, top1=acc1, top5=acc5,
                                      total_ips=total_ips, compute_ips=compute_ips,
                                      data_time=window.data_time_per_step)
        if compiling:
            print(f'--compile: step {step} compiled the model ({compile_seconds:.1f} s, data wait included); '
                  'img/s leaves it out')
        if stop is not None and stop.after_step(step):
            return throughput.total_images, step + 1
    nonfinite.check(epoch, model)
    return throughput.total_images, None


def evaluate(model, criterion, data_loader, dev, print_freq=100, num_eval_steps=sys.maxsize, stop=None, log_suffix='',
             *, epoch=None, metrics_file=metrics.NO_METRICS, tta_flip=False):
    """Top-1 accuracy over the validation set, or None when there was nothing to evaluate or a stop signal
    cut it short (each rank leaves its loop on its own: the only collective is the final sum). `log_suffix`
    names the model in the lines, as torchvision's ('EMA'). The result goes to `metrics_file` as the
    evaluation after `epoch`. `tta_flip`: each image's logits summed with its mirror's (training.eval_logits)."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ', device=dev.collective_device)
    for name in ('loss', 'acc1', 'acc5'):  # every rank must all-reduce the same meters, even with no batch
        metric_logger.add_meter(name, utils.SmoothedValue())
    header = f'Test: {log_suffix}'.strip()
    stopping = stop is not None and stop.signum
    with torch.no_grad():
        for image, target in [] if stopping else metric_logger.log_every(data_loader, print_freq, header,
                                                                          max_steps=num_eval_steps):
            image, target = dev.to_device(image, target)
            dev.mark_step('eval_input')
            with dev.autocast():
                output = training.eval_logits(model, image, tta_flip)
                loss = criterion(output, target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, 5), on_host=not dev.accuracy_on_device)
            batch_size = image.shape[0]
            loss_value, acc1, acc5 = dev.read_scalars([loss, acc1, acc5])
            metric_logger.update(loss=loss_value)
            metric_logger.meters['acc1'].update(acc1, n=batch_size)
            metric_logger.meters['acc5'].update(acc5, n=batch_size)
            if stop is not None and stop.signum:
                break
    metric_logger.synchronize_between_processes()
    if stop is not None and stop.signum:
        print(f'{header} cut short by {stop.signal_name} after {metric_logger.acc1.count} images')
        return None
    if metric_logger.acc1.count == 0:  # --num-eval-steps 0 or an empty split: nothing to report
        return None
    print(f'{header} evaluated {metric_logger.acc1.count} images')
    summary = f'Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f}'
    print(f'{header} {summary}' if log_suffix else f' * {summary}')
    metrics_file.evaluation(epoch, loss=metric_logger.loss.global_avg, top1=metric_logger.acc1.global_avg,
                            top5=metric_logger.acc5.global_avg, images=metric_logger.acc1.count,
                            ema=log_suffix == 'EMA')
    return metric_logger.acc1.global_avg


def load_data(data_path, args, dev, ranks, batch_size=None):
    """The datasets of data_path/train and data_path/val, their samplers and loaders (loaders.build), with
    upstream's progress lines. The training order is shuffled from --seed; with --deterministic every
    sample's augmentation is seeded too. `--data-path synthetic`: random batches made once on the device
    (--dataset-size training images per epoch, ImageNet's by default)."""
    settings = recipe_flags.loader_settings(args, seed=args.seed, seeded=args.deterministic,
                                            batch_size=batch_size or args.batch_size, cache_dataset=args.cache_dataset)
    return loaders.build(data_path, settings, ranks, dev.loader_placement())


def custom_lr_table(base_lr, values, milestones, epochs):
    """Per-epoch learning rates: `base_lr` until the first milestone, then values[i] from milestones[i].

    E.g. values 0.275,0.45,0.625,0.8,0.08,0.008,0.0008 at 1,2,3,4,30,60,80 over 90 epochs give
    0.1, 0.275, 0.45, 0.625, then 0.8 for epochs 4-29, 0.08 for 30-59, 0.008 for 60-79, 0.0008 for 80-89.
    """
    if values is None and milestones is None:
        return None
    if values is None or milestones is None:
        given, missing = (('--custom-lr-values', '--custom-lr-milestones') if milestones is None
                          else ('--custom-lr-milestones', '--custom-lr-values'))
        raise UsageError(f'{given} needs {missing} as well: one learning rate per milestone epoch')
    if len(values) != len(milestones):
        raise UsageError(f'--custom-lr-values has {len(values)} values but --custom-lr-milestones has '
                         f'{len(milestones)} epochs; give one learning rate per milestone')
    if milestones[0] < 0 or any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise UsageError('--custom-lr-milestones must be increasing epoch numbers from 0, got '
                         + ' '.join(map(str, milestones)))
    if any(v <= 0 for v in values):
        raise UsageError('--custom-lr-values must all be positive, got ' + ' '.join(map(str, values)))
    bounds = [0] + list(milestones) + [epochs]
    table = []
    for value, start, end in zip([base_lr] + list(values), bounds, bounds[1:]):
        table += [value] * max(end - start, 0)
    if len(table) < epochs:
        raise UsageError(f'--custom-lr-milestones: the schedule covers {len(table)} epochs, fewer than '
                         f'--epochs {epochs}')
    return table[:epochs]  # a milestone past the last epoch never starts


def check_args(args):
    """Refuse values that cannot work, before any data is read or any file written; return the custom
    per-epoch learning rates (None without --custom-lr-values)."""
    cli.check_at_least((('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1),
                        ('--workers', args.workers, 0), ('--print-freq', args.print_freq, 1),
                        ('--num-train-steps', args.num_train_steps, 1), ('--num-eval-steps', args.num_eval_steps, 0),
                        ('--start-epoch', args.start_epoch, 0), ('--train-crop-size', args.train_crop_size, 1),
                        ('--val-crop-size', args.val_crop_size, 1),
                        ('--val-resize-size', args.val_resize_size, args.val_crop_size)))
    training.check_model_and_resume(args.model, args.resume, args.output_dir,
                                   '--test-only' if args.test_only else None)
    training.check_blurpool(args.model, args.blurpool)
    loaders.check_kind(args.dl_worker_type, args.data_path)
    benchmark_modes.check(args.mode, args.bench_warmup, args.bench_iterations, args.benchmark_batch_sizes, args.compile)
    if args.apex:
        raise UsageError('--apex: NVIDIA apex is not supported by this port (upstream replaced it with '
                         'native mixed precision); use --amp (torch.autocast, --amp-dtype float16 or bfloat16)')
    training.check_precision(args.device, training.amp_dtype(args.amp, args.amp_dtype), args.is_hmp)
    recipe_flags.check(args)
    metrics.check_tensorboard(args.tensorboard, args.output_dir)
    lr_table = custom_lr_table(args.lr, args.custom_lr_values, args.custom_lr_milestones, args.epochs)
    if lr_table and args.lr_scheduler != 'steplr' or lr_table and args.lr_warmup_epochs:
        raise UsageError(f'--custom-lr-values is a schedule of its own; it cannot be combined with --lr-scheduler '
                         f'{args.lr_scheduler} or --lr-warmup-epochs')
    return lr_table


def set_epoch_lr(optimizer, lr_table, epoch):
    """The custom schedule's learning rate for `epoch` (--custom-lr-values); StepLR's runs otherwise."""
    if lr_table:
        for group in optimizer.param_groups:
            group['lr'] = lr_table[epoch]


def save_checkpoint(dev, model_without_ddp, optimizer, schedule, epoch, args, classes, position=None, ema=None):
    """Save after a completed epoch to model_<epoch>.pth and checkpoint.pth, with the class names in label order
    (`classes`, the training folder's, for inference.py); or, when a run stops
    mid-epoch (at `position`: samples of the epoch's order trained), to checkpoint.pth alone with what a
    resume needs to continue exactly. Returns checkpoint.pth's path (None without --output-dir)."""
    if not args.output_dir:
        return None
    latest = training.latest_checkpoint(args.output_dir)
    paths = [latest] if position is not None else [os.path.join(args.output_dir, f'model_{epoch}.pth'), latest]
    fields = {**training.schedule_fields(schedule, ema), 'epoch': epoch, 'args': checkpoints.plain_args(args)}
    training.save_checkpoint(dev, model_without_ddp, optimizer, fields, paths, model_name=args.model, classes=classes,
                             position=position)
    return latest


def main(args):
    lr_table = check_args(args)
    if args.print_schedule:
        return recipe_flags.print_schedule(args, recipe_flags.launched_world_size(args.world_size), lr_table)
    hmp = training.hmp_config(args.is_hmp, args.hmp_bf16, args.hmp_fp32, args.hmp_opt_level, args.hmp_verbose)
    device = devices.DeviceSettings(args.device, channels_last=args.channels_last, hmp=hmp,
                                    lazy_mode=args.run_lazy_mode, compile=args.compile,
                                    amp_dtype=training.amp_dtype(args.amp, args.amp_dtype), tf32=args.tf32,
                                    deterministic=args.deterministic)
    dev, ranks = training.start(device, output_dir=args.output_dir, writes=not args.test_only, dist_url=args.dist_url,
                                dist_timeout=args.dist_timeout)
    vars(args).update(ranks._asdict())  # for print(args) and the checkpoints, as upstream's init_distributed_mode
    dev.mark_points = devices.reference_mark_points(args.model, ranks.distributed)
    print(args)
    training.seed_everything(args.seed, args.deterministic)
    if args.mode != 'training':
        return benchmark(args, dev, ranks)

    dataset = load_data(args.data_path, args, dev, ranks)
    args.dl_worker_type = dataset.kind  # the loader that really runs, for the checkpoints
    data_loader, data_loader_test, train_sampler = dataset.train, dataset.val, dataset.train_sampler
    num_classes = len(dataset.classes)

    print('Creating model')
    model = training.place_model(dev, training.build_model(args.model, num_classes, args.pretrained, args.blurpool),
                                 args.sync_bn, ranks.distributed)

    criterion = training.make_criterion(args.label_smoothing)
    optimizer = recipe_flags.make_optimizer(dev, model, args)
    global_batch = ranks.world_size * args.batch_size
    schedule = None if lr_table else recipe_flags.make_schedule(optimizer, args, len(data_loader), global_batch)

    model, model_without_ddp = training.wrap_ddp(dev, model, ranks.distributed, args.model, args.bucket_cap_mb)
    model = training.compile_model(dev, model, args.compile)
    extras = recipe_flags.make_extras(args, schedule or training.NO_SCHEDULE, model_without_ddp, num_classes,
                                      global_batch)
    ema = extras.ema

    resumed = training.NOT_RESUMED
    resume_path = training.checkpoint_to_resume(args.resume, args.output_dir)
    if resume_path:
        checkpoint = checkpoints.load(resume_path, args.model, num_classes,
                                      ('model', 'optimizer', 'lr_scheduler', 'epoch'), classes=dataset.classes,
                                      blurpool=args.blurpool)
        resumed = training.resume(checkpoint, dev, model_without_ddp, optimizer, schedule, 'model', ema)
        args.start_epoch = resumed.start_epoch

    metrics_file = metrics.open_run(args.output_dir, ranks.rank, args.tensorboard)
    metrics_file.header(args=checkpoints.plain_args(args), recipe=args.recipe, device=dev.name(),
                        precision=dev.precision_settings(),
                        world_size=ranks.world_size, batch_size=args.batch_size,
                        steps_per_epoch=min(len(data_loader), args.num_train_steps),
                        start=metrics.RunStart(args.start_epoch, resumed.position, resume_path),
                        test_only=args.test_only)
    if args.test_only:
        evaluated = resumed.checkpoint.get('epoch')  # the epoch the checkpoint finished (None: none)
        evaluate(model_without_ddp, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps,
                 epoch=evaluated, metrics_file=metrics_file, tta_flip=args.tta_flip)
        if ema is not None:
            evaluate(ema, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps, log_suffix='EMA',
                     epoch=evaluated, metrics_file=metrics_file, tta_flip=args.tta_flip)
        return

    print('Start training')
    stop = stopping.GracefulStop(ranks.distributed, args.dist_timeout, ranks.rank, cli.rerun_status(args.resume))
    faults.watch_surroundings(launched=ranks.distributed)

    def save(position):
        return save_checkpoint(dev, model_without_ddp, optimizer, schedule, epoch, args, dataset.classes, position,
                               ema)

    start_time = time.time()
    images_trained = 0
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        first_step = training.start_epoch(epoch, resumed, train_sampler, dev, args.batch_size,
                                          args.seed if args.deterministic else None,
                                          augment=schedule.augments(epoch) if schedule else True,
                                          resolution=recipe_flags.training_resolution(args, epoch))
        set_epoch_lr(optimizer, lr_table, epoch)
        images, stopped_at = train_one_epoch(model, criterion, optimizer, data_loader, dev, epoch, args.print_freq,
                                             dl_time_exclude=args.dl_time_exclude,
                                             num_train_steps=args.num_train_steps, stop=stop, first_step=first_step,
                                             extras=extras, model_without_ddp=model_without_ddp,
                                             metrics_file=metrics_file,
                                             compiles=args.compile and epoch == args.start_epoch)
        train_time = time.time() - epoch_start
        images_trained += images
        position = training.unfinished_position(stopped_at, first_step, train_sampler, args.batch_size)
        if position is not None:
            return training.stop_and_save(stop, save, epoch, position, stopped_at - 1)
        if schedule is not None:
            schedule.after_epoch()
        distributed.broadcast_buffers(model_without_ddp)
        if training.evaluates_after(epoch, args.epochs, args.epochs_between_evals, args.eval_offset_epochs):
            evaluate(model_without_ddp, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps, stop,
                     epoch=epoch, metrics_file=metrics_file, tta_flip=args.tta_flip)
            if ema is not None:
                evaluate(ema, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps, stop,
                         log_suffix='EMA', epoch=epoch, metrics_file=metrics_file, tta_flip=args.tta_flip)
        metrics_file.epoch(epoch, images=images, train_time=train_time, epoch_time=time.time() - epoch_start,
                           resolution=recipe_flags.training_resolution(args, epoch))
        if args.save_checkpoint:
            save(None)
        if stop.at_epoch_end() and epoch + 1 < args.epochs:
            return training.stop_and_save(stop, save, epoch)

    total_time = time.time() - start_time
    if ranks.distributed:
        distributed.say(f'| rank {ranks.rank}: trained on {images_trained} images')  # one write: mpirun merges ranks
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')
    return training.status_after_the_last_epoch(stop)


def benchmark(args, dev, ranks):
    """--mode benchmark-training | benchmark-inference (benchmark_modes.py): the model, loss and optimizer of a
    training run, measured at each of --benchmark-batch-sizes on the training (benchmark-training) or
    validation (benchmark-inference) loader, the plain step (no recipe extras); no evaluation, no checkpoint."""
    num_classes = len(load_data(args.data_path, args, dev, ranks).classes)
    model = training.place_model(dev, training.build_model(args.model, num_classes, args.pretrained, args.blurpool),
                                 args.sync_bn, ranks.distributed)
    criterion = training.make_criterion(args.label_smoothing)
    optimizer = recipe_flags.make_optimizer(dev, model, args)
    model, model_without_ddp = training.wrap_ddp(dev, model, ranks.distributed, args.model, args.bucket_cap_mb)
    if args.mode == 'benchmark-training':
        step = benchmark_modes.training_step(training.compile_model(dev, model, args.compile), criterion, optimizer, dev)
    else:
        step = benchmark_modes.inference_step(training.compile_model(dev, model_without_ddp, args.compile), dev)

    def loader(batch_size):
        dataset = load_data(args.data_path, args, dev, ranks, batch_size)
        return dataset.train if args.mode == 'benchmark-training' else dataset.val
    json_path = args.benchmark_json or (os.path.join(args.output_dir, f'{args.mode}.json') if args.output_dir else None)
    precision = (f'amp {args.amp_dtype or "float16"}' if args.amp else 'hmp bf16' if args.is_hmp else 'fp32') + \
        (', channels-last' if args.channels_last else '') + (', compiled' if args.compile else '')
    description = dict(model=args.model, device=f'{args.device} ({precision})',
                       data='synthetic' if args.data_path == loaders.SYNTHETIC else args.data_path,
                       crop_size=args.train_crop_size if args.mode == 'benchmark-training' else args.val_crop_size,
                       compile=args.compile, hmp=args.is_hmp, channels_last=args.channels_last,
                       precision=dev.precision_settings())
    plan = benchmark_modes.Plan(args.mode, tuple(args.benchmark_batch_sizes or [args.batch_size]), args.bench_warmup,
                                args.bench_iterations, json_path)
    return benchmark_modes.run(plan, step, loader, dev, description)


def get_args_parser(add_help=True):
    parser = cli.ArgumentParser(description='PyTorch Classification Training', add_help=add_help)
    bool_arg = cli.parse_bool

    parser.add_argument('--data-path', default='/software/data/pytorch/imagenet/ILSVRC2012/',
                        help='dataset (train/ and val/ folders), or synthetic: random batches made once on the device')
    parser.add_argument('--dl-time-exclude', default='True', type=bool_arg,
                        help='Set to False to include data load time')
    parser.add_argument('--model', default='resnet18',
                        help='model: resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, '
                             'resnext101_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2, '
                             'or any torchvision.models name (e.g. mobilenet_v2)')
    parser.add_argument('--device', default='hpu', choices=('hpu', 'cuda', 'cpu'), help='device')
    parser.add_argument('-b', '--batch-size', default=128, type=int, help='per-process batch size')
    parser.add_argument('--epochs', default=90, type=int, metavar='N', help='number of total epochs to run')
    cli.add_loader_kind_arg(parser, default='HABANA')
    parser.add_argument('-j', '--workers', default=10, type=int, metavar='N', help='number of data loading workers')
    parser.add_argument('--lr', default=0.1, type=float, help='initial learning rate')
    parser.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum')
    parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W',
                        help='weight decay (default: 1e-4)', dest='weight_decay')
    parser.add_argument('--lr-step-size', default=30, type=int, help='decrease lr every step-size epochs')
    parser.add_argument('--custom-lr-values', default=None, metavar='V', nargs='+', type=float,
                        help='learning rates from each of --custom-lr-milestones on, e.g. 0.1 0.01 0.001')
    parser.add_argument('--custom-lr-milestones', default=None, metavar='M', nargs='+', type=int,
                        help='epochs at which each of --custom-lr-values starts, e.g. 0 30 60')
    parser.add_argument('--lr-gamma', default=0.1, type=float, help='decrease lr by a factor of lr-gamma')
    parser.add_argument('--print-freq', default=1, type=int, help='print frequency')
    parser.add_argument('--output-dir', default='.', help='path where to save (checkpoints, metrics.jsonl)')
    parser.add_argument('--channels-last', default='True', type=bool_arg,
                        help='whether input is in channels last format (True/False)')
    parser.add_argument('--resume', default='', metavar='PATH|auto',
                        help='resume from checkpoint; auto: --output-dir\'s checkpoint.pth when it exists, else a fresh '
                             'start (a stop signal with epochs left then exits 75: run the same command again)')
    parser.add_argument('--start-epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--seed', type=int, default=123, help='random seed')
    parser.add_argument('--cache-dataset', dest='cache_dataset', action='store_true',
                        help='Cache the datasets\' file lists for quicker initialization')
    parser.add_argument('--sync-bn', dest='sync_bn', action='store_true', help='Use sync batch norm')
    parser.add_argument('--test-only', dest='test_only', action='store_true', help='Only test the model')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true',
                        help='Use pre-trained models from the modelzoo')
    parser.add_argument('--amp', action='store_true',
                        help='mixed precision: torch.autocast (--amp-dtype; float16 with a GradScaler), cuda and cpu')
    parser.add_argument('--apex', action='store_true', help='Use apex for mixed precision training (not supported)')
    parser.add_argument('--apex-opt-level', default='O1', type=str, help='apex opt level (not used)')
    parser.add_argument('--world-size', default=1, type=int, help='number of distributed processes (the launcher\'s variables decide; recorded in the args)')
    parser.add_argument('--dist-url', default='env://', help='url used to set up distributed training')
    distributed.add_timeout_flag(parser)
    parser.add_argument('--num-train-steps', type=int, default=sys.maxsize, metavar='T',
                        help='number of training steps per epoch (default: the whole epoch)')
    parser.add_argument('--num-eval-steps', type=int, default=sys.maxsize, metavar='E',
                        help='number of evaluation steps (default: the whole validation set)')
    parser.add_argument('--save-checkpoint', action='store_true', help='Save checkpoint after every epoch')
    parser.add_argument('--run-lazy-mode', default='True', type=bool_arg,
                        help='run model in lazy execution mode (hpu; True/False)')
    parser.add_argument('--deterministic', action='store_true',
                        help='seed every RNG and each sample\'s augmentation, so runs repeat exactly')
    cli.add_hmp_args(parser, bf16_default='', fp32_default='')
    cli.add_precision_and_gpu_args(parser)
    cli.add_image_size_args(parser)
    cli.add_compile_arg(parser)
    cli.add_tensorboard_arg(parser)
    bench = parser.add_argument_group('benchmark modes (docs/training.md, Synthetic data and benchmark modes)')
    bench.add_argument('--mode', default='training', choices=benchmark_modes.MODES,
                       help='training (the usual run), or measure img/s and latency: benchmark-training (training '
                            'steps), benchmark-inference (forward passes on the validation loader)')
    bench.add_argument('--bench-warmup', default=10, type=int, metavar='N',
                       help='benchmark modes: steps run and left out before measuring, per batch size (default: 10)')
    bench.add_argument('--bench-iterations', default=100, type=int, metavar='N',
                       help='benchmark modes: measured steps per batch size (default: 100)')
    bench.add_argument('--benchmark-batch-sizes', default=None, type=int, nargs='+', metavar='B',
                       help='benchmark modes: the per-process batch sizes to measure (default: --batch-size)')
    bench.add_argument('--benchmark-json', default=None, metavar='PATH',
                       help='benchmark modes: where to write the results (default: <output-dir>/<mode>.json)')
    cli.add_recipe_args(parser)
    ignored = cli.compatibility_group(parser)
    ignored.add_argument('--process-per-node', default=8, type=int, metavar='N',
                         help='processes per node: the launcher (mpirun, torchrun) places the ranks')
    ignored.add_argument('--hls_type', default='HLS1', help='type of HLS: the launcher places the ranks')
    return parser


if __name__ == '__main__':
    sys.exit(cli.run_cli(distributed.reporting_stopped_peers(main),
                         recipe_flags.parse_args(get_args_parser(), sys.argv[1:])))
