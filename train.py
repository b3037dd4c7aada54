"""ImageNet classification trainer for the ResNet family and MobileNetV2 on Gaudi (hpu), CUDA and CPU.

A port of Habana's 1.4.0 train.py, itself torchvision's references/classification/train.py (release
0.10) plus Habana's changes. Function names, flags and log lines follow upstream; the deliberate
changes are listed in the README. Everything device-specific is behind devices.py.
"""
import datetime
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

import checkpoints
import data
import devices
import distributed
import model as models
import utils
from utils import UsageError


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


def train_one_epoch(model, criterion, optimizer, data_loader, dev, epoch, print_freq, args, stop=None, first_step=0):
    """Train one epoch (from `first_step` when resuming mid-epoch).

    Returns (images trained, step to resume from when SIGTERM stopped the epoch early, else None).
    A NaN or infinite loss raises utils.NonFiniteLoss at the next logged step.
    """
    model.train()
    metric_logger = utils.MetricLogger(delimiter='  ', device=dev.collective_device)
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value}'))
    metric_logger.add_meter('img/s', utils.SmoothedValue(window_size=10, fmt='{value}'))
    header = f'Epoch: [{epoch}]'
    throughput = utils.ThroughputWindow(exclude_data_time=args.dl_time_exclude)
    nonfinite = utils.NonFiniteLossWatch(dev.torch_device)
    batches = metric_logger.log_every(data_loader, print_freq, header, max_steps=args.num_train_steps - first_step)
    for step, (image, target) in enumerate(batches, start=first_step):
        distributed.progress(epoch, step)
        image, target = dev.to_device(image, target)
        throughput.data_ready()
        output, loss = train_step(model, criterion, optimizer, dev, image, target)
        throughput.step_done(image.shape[0])
        nonfinite.track(loss, step, optimizer.param_groups[0]['lr'])

        logged = (step - first_step) % print_freq == 0
        if logged:
            nonfinite.check(epoch)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, 5))
            images = throughput.images
            metric_logger.update(loss=loss.item(), lr=optimizer.param_groups[0]['lr'])
            metric_logger.meters['acc1'].update(acc1.item(), n=images)
            metric_logger.meters['acc5'].update(acc5.item(), n=images)
            metric_logger.meters['img/s'].update(throughput.images_per_second())
        if stop is not None and stop.after_step(step):
            return throughput.total_images, step + 1
    nonfinite.check(epoch)
    return throughput.total_images, None


def evaluate(model, criterion, data_loader, dev, print_freq=100, num_eval_steps=sys.maxsize, stop=None):
    """Top-1 accuracy over the validation set, or None when there was nothing to evaluate or a stop signal
    cut it short (each rank leaves its loop on its own: the only collective is the final sum)."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ', device=dev.collective_device)
    for name in ('loss', 'acc1', 'acc5'):  # every rank must all-reduce the same meters, even with no batch
        metric_logger.add_meter(name, utils.SmoothedValue())
    header = 'Test:'
    stopping = stop is not None and stop.signum
    with torch.no_grad():
        for image, target in [] if stopping else metric_logger.log_every(data_loader, print_freq, header,
                                                                          max_steps=num_eval_steps):
            image, target = dev.to_device(image, target)
            dev.mark_step('eval_input')
            with dev.autocast():
                output = model(image)
                loss = criterion(output, target)
            acc1, acc5 = utils.accuracy(output, target, topk=(1, 5))
            batch_size = image.shape[0]
            metric_logger.update(loss=loss.item())
            metric_logger.meters['acc1'].update(acc1.item(), n=batch_size)
            metric_logger.meters['acc5'].update(acc5.item(), n=batch_size)
            if stop is not None and stop.signum:
                break
    metric_logger.synchronize_between_processes()
    if stop is not None and stop.signum:
        print(f'Test: cut short by {stop.signal_name} after {metric_logger.acc1.count} images')
        return None
    if metric_logger.acc1.count == 0:  # --num-eval-steps 0 or an empty split: nothing to report
        return None
    print(f'Test: evaluated {metric_logger.acc1.count} images')
    print(f' * Acc@1 {metric_logger.acc1.global_avg:.3f} Acc@5 {metric_logger.acc5.global_avg:.3f}')
    return metric_logger.acc1.global_avg


def load_data(traindir, valdir, args):
    print('Loading data')
    data.check_class_lists(traindir, valdir)
    cache_dir = data.dataset_cache_dir(args.output_dir) if args.cache_dataset else None
    print('Loading training data')
    st = time.time()
    dataset = data.image_folder(traindir, data.train_transform(args.train_crop_size), cache_dir=cache_dir,
                                is_main=utils.is_main_process())
    print('Took', time.time() - st)

    print('Loading validation data')
    dataset_test = data.image_folder(valdir, data.eval_transform(args.val_resize_size, args.val_crop_size),
                                     labels_from=dataset, cache_dir=cache_dir, is_main=utils.is_main_process())

    print('Creating data loaders')
    seeded = args.deterministic and args.dl_worker_type == 'MP'  # FAST seeds each sample itself
    train_sampler = data.train_sampler(dataset, args.world_size, args.rank, args.seed, seeded)
    if seeded:
        dataset = data.SeededAugmentation(dataset, args.seed)
    test_sampler = data.ShardedEvalSampler(len(dataset_test), args.world_size, args.rank)
    return dataset, dataset_test, train_sampler, test_sampler


def data_loaders(args, dev, loader_seed=None):
    """(number of classes, train sampler, train loader, validation loader) for --data-path; the loaders
    draw their random seeds from `loader_seed` (a fresh random one when None)."""
    train_dir = data.check_split_dir(args.data_path, 'train')
    val_dir = data.check_split_dir(args.data_path, 'val')
    args.dl_worker_type = data.resolve_loader_kind(args.dl_worker_type)
    dataset, dataset_test, train_sampler, test_sampler = load_data(train_dir, val_dir, args)
    if loader_seed is None:
        loader_seed = int(torch.randint(2 ** 31, ()).item())
    loaders = data.build_loaders(args.dl_worker_type, dataset, dataset_test, train_sampler, test_sampler,
                                 args.batch_size, args.workers, dev, args.train_crop_size, args.val_resize_size,
                                 args.val_crop_size, seed=loader_seed)
    return (len(dataset.classes), train_sampler, *loaders)


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
    return table


def check_common_args(args, limits):
    """Checks both trainers make before any data is read or any file written: each (flag, value, least)
    of `limits`, the model name and the --resume file."""
    for flag, value, least in limits:
        if value < least:
            raise UsageError(f'{flag} must be at least {least}, got {value}')
    if args.model not in models.available_models():
        raise UsageError(f"--model: unknown model '{args.model}'; choose one of: "
                         + ', '.join(models.available_models()))
    if args.resume and not os.path.isfile(args.resume):
        raise UsageError(f"--resume: checkpoint '{args.resume}' does not exist")


def check_args(args):
    """Refuse values that cannot work, before any data is read or any file written."""
    check_common_args(args, (('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1),
                             ('--workers', args.workers, 0), ('--print-freq', args.print_freq, 1),
                             ('--num-train-steps', args.num_train_steps, 1),
                             ('--num-eval-steps', args.num_eval_steps, 0), ('--start-epoch', args.start_epoch, 0),
                             ('--train-crop-size', args.train_crop_size, 1),
                             ('--val-crop-size', args.val_crop_size, 1),
                             ('--val-resize-size', args.val_resize_size, args.val_crop_size)))
    if args.apex:
        raise UsageError('--apex: NVIDIA apex is not supported by this port (upstream replaced it with '
                         'native mixed precision); use --hmp with the op lists for bf16 on hpu, cuda and cpu')
    return custom_lr_table(args.lr, args.custom_lr_values, args.custom_lr_milestones, args.epochs)


def hmp_config(args):
    if not args.is_hmp:
        return None
    return devices.HmpConfig(args.hmp_bf16, args.hmp_fp32, args.hmp_opt_level, args.hmp_verbose)


def seed_everything(seed, deterministic):
    torch.manual_seed(seed)
    if deterministic:
        random.seed(seed)
        np.random.seed(seed)


def build_model(args, num_classes):
    try:
        return models.create_model(args.model, num_classes=num_classes, pretrained=args.pretrained)
    except models.ModelError as err:
        flag = '--pretrained' if args.pretrained and 'unknown model' not in str(err) else '--model'
        raise UsageError(f'{flag}: {err}') from None


def save_checkpoint(dev, model_without_ddp, optimizer, lr_scheduler, epoch, args, num_classes, position=None):
    """Save after a completed epoch to model_<epoch>.pth and checkpoint.pth; or, when a run stops
    mid-epoch (at `position`: samples of the epoch's order trained), to checkpoint.pth alone with what a
    resume needs to continue exactly."""
    with dev.checkpoint_state(model_without_ddp, optimizer) as (model_state, optimizer_state):
        checkpoint = checkpoints.stamp({
            'model': model_state,
            'optimizer': optimizer_state,
            'lr_scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
            'epoch': epoch,
            'args': checkpoints.plain_args(args),
        }, args.model, num_classes)
        latest = os.path.join(args.output_dir, 'checkpoint.pth')
        if position is None:
            checkpoints.save(checkpoint, os.path.join(args.output_dir, f'model_{epoch}.pth'), latest)
        else:
            checkpoint.update(epoch_position=position, rng_state=dev.rng_state())
            checkpoints.save(checkpoint, latest)
    return latest


def prepare_epoch(epoch, position, train_sampler, dev, batch_size, seed, rng_state=None):
    """Set the data order and random state for an epoch: from its start (re-seeded when `seed` is given,
    so that a resumed run repeats an uninterrupted one), or from `position` (samples of the epoch's order
    already trained) after a mid-epoch stop. Returns the step the epoch starts at (for the log)."""
    train_sampler.set_epoch(epoch, position)
    if not position:
        if seed is not None:
            torch.manual_seed(data.epoch_seed(seed, epoch))
        return 0
    dev.set_rng_state(rng_state)
    first_step = position // (batch_size * train_sampler.num_replicas)
    if data.train_batches(len(train_sampler), batch_size):
        print(f'Resuming epoch {epoch} at step {first_step} ({position} of its {train_sampler.dataset_len} '
              'samples trained)')
    else:
        print(f'Resuming epoch {epoch} at its end (nothing left to train at --batch-size {batch_size} on '
              f'{train_sampler.num_replicas} rank(s)): finishing it and going on with epoch {epoch + 1}')
    return first_step


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


def stop_after_signal(stop, save, epoch, position=None, step=None):
    """Save with `save(position)` (None for a complete epoch) and say where the run stopped and how long it took."""
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


def main(args):
    lr_table = check_args(args)
    dev = devices.create(args.device, channels_last=args.channels_last, hmp=hmp_config(args),
                         lazy_mode=args.run_lazy_mode)
    checkpoints.prepare_output_dir(args.output_dir, writes=not args.test_only)
    distributed.init_distributed_mode(args, dev.init_distributed)
    dev.mark_points = devices.reference_mark_points(args.model, args.distributed)
    print(args)
    seed_everything(args.seed, args.deterministic)

    num_classes, train_sampler, data_loader, data_loader_test = data_loaders(
        args, dev, args.seed if args.deterministic else None)

    print('Creating model')
    model = dev.prepare_model(build_model(args, num_classes))
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    criterion = nn.CrossEntropyLoss()
    optimizer = dev.make_optimizer(model.parameters(), lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay)
    dev.after_optimizer_created(model, optimizer)
    lr_scheduler = None if lr_table else torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=args.lr_step_size, gamma=args.lr_gamma)

    model_without_ddp = model
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, **dev.ddp_kwargs(args.model))
        model_without_ddp = model.module

    resume_at, rng_state = 0, None
    if args.resume:
        checkpoint = checkpoints.load(args.resume, args.model, num_classes,
                                      ('model', 'optimizer', 'lr_scheduler', 'epoch'))
        dev.load_training_state(model_without_ddp, optimizer, checkpoint['model'], checkpoint['optimizer'])
        if lr_scheduler is not None and checkpoint['lr_scheduler'] is not None:
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
        args.start_epoch, resume_at = resume_position(checkpoint)
        rng_state = checkpoint.get('rng_state')

    if args.test_only:
        evaluate(model_without_ddp, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps)
        return

    print('Start training')
    stop = utils.GracefulStop(args.distributed, args.dist_timeout)

    def save(position):
        if not args.output_dir:
            return None
        return save_checkpoint(dev, model_without_ddp, optimizer, lr_scheduler, epoch, args, num_classes, position)

    start_time = time.time()
    images_trained = 0
    for epoch in range(args.start_epoch, args.epochs):
        if lr_table:
            for group in optimizer.param_groups:
                group['lr'] = lr_table[epoch]
        position = resume_at if epoch == args.start_epoch else 0
        first_step = prepare_epoch(epoch, position, train_sampler, dev, args.batch_size,
                                   args.seed if args.deterministic else None, rng_state)
        images, stopped_at = train_one_epoch(model, criterion, optimizer, data_loader, dev, epoch, args.print_freq,
                                             args, stop, first_step)
        images_trained += images
        if stopped_at is not None:
            position = train_sampler.position_after(stopped_at - first_step, args.batch_size)
            if position < train_sampler.dataset_len:  # a stop on the epoch's last step ends the epoch first
                return stop_after_signal(stop, save, epoch, position, stopped_at - 1)
        if lr_scheduler is not None:
            lr_scheduler.step()
        utils.broadcast_buffers(model_without_ddp)
        evaluate(model_without_ddp, criterion, data_loader_test, dev, args.print_freq, args.num_eval_steps, stop)
        if args.output_dir and args.save_checkpoint:
            save_checkpoint(dev, model_without_ddp, optimizer, lr_scheduler, epoch, args, num_classes)
        if stop.at_epoch_end() and epoch + 1 < args.epochs:
            return stop_after_signal(stop, save, epoch)

    total_time = time.time() - start_time
    if args.distributed:
        print(f'| rank {args.rank}: trained on {images_trained} images', force=True)
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')


def get_args_parser(add_help=True):
    parser = utils.ArgumentParser(description='PyTorch Classification Training', add_help=add_help)
    bool_arg = utils.parse_bool

    parser.add_argument('--data-path', default='/software/data/pytorch/imagenet/ILSVRC2012/', help='dataset')
    parser.add_argument('--dl-time-exclude', default='True', type=bool_arg,
                        help='Set to False to include data load time')
    parser.add_argument('--model', default='resnet18',
                        help='model: resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, '
                             'resnext101_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2, '
                             'or any torchvision.models name (e.g. mobilenet_v2)')
    parser.add_argument('--device', default='hpu', choices=('hpu', 'cuda', 'cpu'), help='device')
    parser.add_argument('-b', '--batch-size', default=128, type=int, help='per-process batch size')
    parser.add_argument('--epochs', default=90, type=int, metavar='N', help='number of total epochs to run')
    parser.add_argument('--dl-worker-type', default='HABANA', type=lambda x: x.upper(),
                        choices=('MP', 'HABANA', 'FAST'),
                        help='MP: torch DataLoader with PIL transforms; HABANA: habana_dataloader, or the '
                             'fast JPEG pipeline where it is not installed; FAST: the fast JPEG pipeline')
    parser.add_argument('-j', '--workers', default=10, type=int, metavar='N', help='number of data loading workers')
    parser.add_argument('--process-per-node', default=8, type=int, metavar='N', help='number of processes per node')
    parser.add_argument('--hls_type', default='HLS1', help='type of HLS (parsed, not used)')
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
    parser.add_argument('--output-dir', default='.', help='path where to save')
    parser.add_argument('--channels-last', default='True', type=bool_arg,
                        help='whether input is in channels last format (True/False)')
    parser.add_argument('--resume', default='', help='resume from checkpoint')
    parser.add_argument('--start-epoch', default=0, type=int, metavar='N', help='start epoch')
    parser.add_argument('--seed', type=int, default=123, help='random seed')
    parser.add_argument('--cache-dataset', dest='cache_dataset', action='store_true',
                        help='Cache the datasets\' file lists for quicker initialization')
    parser.add_argument('--sync-bn', dest='sync_bn', action='store_true', help='Use sync batch norm')
    parser.add_argument('--test-only', dest='test_only', action='store_true', help='Only test the model')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true',
                        help='Use pre-trained models from the modelzoo')
    parser.add_argument('--apex', action='store_true', help='Use apex for mixed precision training (not supported)')
    parser.add_argument('--apex-opt-level', default='O1', type=str, help='apex opt level (not used)')
    parser.add_argument('--world-size', default=1, type=int, help='number of distributed processes (set by the launcher)')
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
    add_hmp_args(parser, bf16_default='', fp32_default='')
    add_image_size_args(parser)
    return parser


def add_hmp_args(parser, bf16_default, fp32_default):
    """Habana mixed precision flags, shared by both trainers (they differ only in the defaults)."""
    parser.add_argument('--hmp', dest='is_hmp', action='store_true', help='enable hmp mode')
    parser.add_argument('--hmp-bf16', default=bf16_default, help='path to bf16 ops list in hmp O1 mode')
    parser.add_argument('--hmp-fp32', default=fp32_default, help='path to fp32 ops list in hmp O1 mode')
    parser.add_argument('--hmp-opt-level', default='O1', help='choose optimization level for hmp')
    parser.add_argument('--hmp-verbose', action='store_true', help='enable verbose mode for hmp')


def add_image_size_args(parser):
    """Added (upstream torchvision 0.12+ names and the reference sizes), so small images and quick runs work."""
    parser.add_argument('--train-crop-size', default=224, type=int, help='RandomResizedCrop size')
    parser.add_argument('--val-resize-size', default=256, type=int, help='validation resize size')
    parser.add_argument('--val-crop-size', default=224, type=int, help='validation center crop size')


if __name__ == '__main__':
    utils.run_cli(distributed.reporting_stopped_peers(main), get_args_parser().parse_args())
