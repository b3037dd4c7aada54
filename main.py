"""GoogLeNet trainer: a port of Habana's 1.4.0 main.py, itself pytorch/examples' imagenet/main.py.

It keeps the examples' shape (main, train, validate, save_checkpoint, AverageMeter, ProgressMeter)
and its log lines, and adds what Habana added: the auxiliary-classifier loss, throughput with and
without data loading, a warm-up skip in the averages, and periodic checkpoints. Devices, data
loading, metrics, the step, resume and checkpoint files come from the training core (training.py) that
train.py (the ResNet/MobileNetV2 trainer) uses too; the deliberate changes are listed in docs/googlenet.md.
"""
import datetime
import functools
import os
import sys
import time
from collections import namedtuple

from classification import start_up
if __name__ == '__main__':
    start_up.guard(sys.argv)  # before anything slow: a stop signal from here on ends the run with one line

import torch  # noqa: E402
from torchvision.models import GoogLeNetOutputs  # noqa: E402

from classification import (checkpoints, cli, devices, distributed, faults, loaders, metrics, recipe_flags,
                            stopping, training)
import utils  # noqa: E402
from classification.cli import UsageError  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_DEVICE_KIND = {'cpu': 'cpu', 'gpu': 'cuda', 'hpu': 'hpu'}  # --device gpu means CUDA, as in the original
AUX_LOSS_WEIGHT = 0.3  # "Going Deeper with Convolutions", section 5
WARM_UP_WINDOWS = 2  # print windows left out of the time and throughput averages at start-up
GOOGLENET_MIN_INPUT = 15  # pixels; smaller images shrink to nothing in GoogLeNet's pooling layers
# The original GoogLeNet trainer's DDP settings: gradients as bucket views, and on hpu 200 MB buckets (chosen for
# HCCL; on cuda and cpu torch's default unless --bucket-cap-mb).
DDP_SETTINGS = dict(habana_bucket_cap_mb=200, gradient_as_bucket_view=True)


class AverageMeter(utils.SmoothedValue):
    """The last value and a running average, printed `name value (average)`.

    The first `skip` updates stay out of the average (warm-up), but count in the totals that
    synchronize_between_processes() all-reduces and global_avg reports.
    """

    def __init__(self, name, fmt=':f', skip=0):
        super().__init__(window_size=1, fmt=f'{{value{fmt}}} ({{avg{fmt}}})')
        self.name = name
        self.skip = skip
        self.updates = 0
        self.kept_total = 0.0
        self.kept_count = 0

    def update(self, value, n=1):
        super().update(value, n)
        self.updates += 1
        if self.updates > self.skip:
            self.kept_total += value * n
            self.kept_count += n

    @property
    def avg(self):
        return self.kept_total / self.kept_count if self.kept_count else 0.0

    def __str__(self):
        return f'{self.name} {super().__str__()}'


class ProgressMeter:
    """One tab-separated line: `<prefix>[  i/N]` followed by the meters."""

    def __init__(self, num_batches, meters, prefix=''):
        width = len(str(num_batches))
        self.batch_fmt = '[{:' + str(width) + 'd}/' + str(num_batches) + ']'
        self.meters = meters
        self.prefix = prefix

    def display(self, batch):
        print('\t'.join([self.prefix + self.batch_fmt.format(batch)] + [str(meter) for meter in self.meters]))


WindowTimes = namedtuple('WindowTimes', 'batch_time data_time images_per_s compute_images_per_s')


class PrintWindow(utils.ThroughputWindow):
    """The steps since the last progress line: per-step compute and data-wait times, throughput
    with and without data loading. With --print-interval 1 these are exactly the original's figures."""

    def times(self):
        """The window's figures; a new window starts."""
        window = self.close()
        compute_time = max(window.seconds - window.data_time, 1e-9)
        return WindowTimes(compute_time / max(window.steps, 1), window.data_time_per_step, window.total_ips,
                           window.compute_ips)


def training_loss(criterion, output, target):
    """Cross entropy of the main classifier, plus 0.3 x that of each auxiliary one when present."""
    if isinstance(output, GoogLeNetOutputs):
        aux_loss = criterion(output.aux_logits2, target) + criterion(output.aux_logits1, target)
        return criterion(output.logits, target) + AUX_LOSS_WEIGHT * aux_loss
    return criterion(output, target)


def main_logits(output):
    return output.logits if isinstance(output, GoogLeNetOutputs) else output


def loss_and_accuracy_meters():
    return AverageMeter('Loss', ':.4e'), AverageMeter('Acc@1', ':0.2f'), AverageMeter('Acc@5', ':0.2f')


def batch_accuracy(dev, logits, target):
    """(top-1, top-5) of a batch as 0-d tensors: where the logits are, or on the CPU on hpu (Habana's copy)."""
    return utils.accuracy(logits, target, topk=(1, 5), on_host=not dev.accuracy_on_device)


def update_accuracy(top1, top5, acc1, acc5, batch_size):
    top1.update(acc1, batch_size)
    top5.update(acc5, batch_size)


def train(train_loader, model, criterion, optimizer, epoch, dev, print_interval, *, num_train_steps=sys.maxsize,
          warm_up=False, stop=None, first_step=0, extras=training.NO_EXTRAS, model_without_ddp=None, compiles=False,
          metrics_file=metrics.NO_METRICS):
    """One epoch (from `first_step` after a mid-epoch stop), with a recipe's `extras` around each step
    (training.StepExtras), each progress line's values going to `metrics_file` too. `compiles`: the first step
    compiles the model (--compile; it falls in the warm-up windows the averages leave out, and its time is
    printed). Returns (images trained, step to resume from when a stop signal ended the epoch early, else
    None); a NaN or infinite loss raises stopping.NonFiniteLoss at the next printed step."""
    skip = WARM_UP_WINDOWS if warm_up else 0
    batch_time = AverageMeter('BatchTime', ':6.3f', skip)
    compute_rate = AverageMeter('imgs/s(Exc. DL)', ':6.3f', skip)
    rate = AverageMeter('imgs/s(Inc. DL)', ':6.3f', skip)
    data_time = AverageMeter('DL Time', ':6.3f', skip)
    losses, top1, top5 = loss_and_accuracy_meters()
    shown = [batch_time] + ([compute_rate] if print_interval == 1 else []) + [rate, data_time,
                                                                                  losses, top1, top5]
    progress = ProgressMeter(first_step + len(train_loader), shown, prefix=f'Epoch: [{epoch}]')

    model.train()
    window = PrintWindow()
    nonfinite = stopping.NonFiniteLossWatch(dev.torch_device, dev.scaler)
    for i, (images, target) in enumerate(train_loader, start=first_step):
        distributed.progress(epoch, i)
        images, target = dev.to_device(images, target)
        window.data_ready()
        lr = optimizer.param_groups[0]['lr']
        inputs, loss_target = extras.inputs(images, target)
        output, loss = training.train_step(model, functools.partial(training_loss, criterion), optimizer, dev,
                                           inputs, loss_target, extras.clip_grad_norm)
        extras.after_step(model_without_ddp, epoch, i)
        window.step_done(images.shape[0])
        nonfinite.track(loss, i, lr)
        if compiles and i == first_step:
            print(f'--compile: step {i} compiled the model ({time.time() - window.start:.1f} s, data wait included); '
                  'the averages leave out the first print windows')

        printed = (i - first_step) % print_interval == 0
        if printed:
            loss_value, acc1, acc5 = training.logged_figures(dev, nonfinite, epoch, loss,
                                                             *batch_accuracy(dev, main_logits(output), target))
            losses.update(loss_value, images.shape[0])
            update_accuracy(top1, top5, acc1, acc5, target.shape[0])
            times = window.times()
            batch_time.update(times.batch_time)
            compute_rate.update(times.compute_images_per_s)
            rate.update(times.images_per_s)
            data_time.update(times.data_time)
            progress.display(i)
            metrics_file.train_window(epoch, i, lr=lr, loss=loss_value, top1=top1.value, top5=top5.value,
                                      total_ips=times.images_per_s, compute_ips=times.compute_images_per_s,
                                      data_time=times.data_time)
        if stop is not None and stop.after_step(i):
            return window.total_images, i + 1
        if i + 1 >= num_train_steps:
            break
    nonfinite.check(epoch, model)
    return window.total_images, None


def validate(val_loader, model, criterion, dev, print_interval, num_train_steps=sys.maxsize, stop=None, label='', *,
             epoch=None, metrics_file=metrics.NO_METRICS, tta_flip=False):
    """Top-1 accuracy over the whole validation set: each rank evaluates its shard, totals are summed.
    None when a stop signal cut it short (each rank leaves its loop on its own). `label` names the model
    in the lines ('EMA'). The result goes to `metrics_file` as the evaluation after `epoch` (its loss: the
    average over the printed batches of all ranks). `tta_flip`: each image's logits summed with its mirror's
    (training.eval_logits)."""
    batch_time = AverageMeter('BatchTime', ':6.3f', WARM_UP_WINDOWS)
    rate = AverageMeter('imgs/s(Inc. DL)', ':6.3f', WARM_UP_WINDOWS)
    losses, top1, top5 = loss_and_accuracy_meters()
    progress = ProgressMeter(len(val_loader), [batch_time, rate, losses, top1, top5], prefix=f'Test{" " + label if label else ""}: ')

    print(f'MODEL EVAL{" " + label if label else ""}')
    model.eval()
    window = PrintWindow()
    with torch.no_grad():
        for i, (images, target) in enumerate([] if stop is not None and stop.signum else val_loader):
            images, target = dev.to_device(images, target)
            dev.mark_step('eval_input')
            with dev.autocast():
                output = training.eval_logits(model, images, tta_flip)
                loss = criterion(output, target)
            printed = i % print_interval == 0
            # every batch's accuracy, so the summary is exact; the batch's figures in one read of the device
            figures = dev.read_scalars([*batch_accuracy(dev, output, target)] + ([loss] if printed else []))
            update_accuracy(top1, top5, figures[0], figures[1], target.shape[0])
            window.step_done(images.shape[0])
            if printed:
                losses.update(figures[2], images.shape[0])
                times = window.times()
                batch_time.update(times.batch_time)
                rate.update(times.images_per_s)
                progress.display(i)
            if i + 1 >= num_train_steps:  # the original bounds validation by this flag too
                break
            if stop is not None and stop.signum:
                break

    top1.synchronize_between_processes(dev.collective_device)
    top5.synchronize_between_processes(dev.collective_device)
    losses.synchronize_between_processes(dev.collective_device)
    if stop is not None and stop.signum:
        print(f'{progress.prefix}cut short by {stop.signal_name} after {top1.count} images')
        return None
    print(f'{progress.prefix}evaluated {top1.count} images')
    print(f' *{" " + label if label else ""} Acc@1 {top1.global_avg:.3f} Acc@5 {top5.global_avg:.3f}')
    metrics_file.evaluation(epoch, loss=losses.global_avg, top1=top1.global_avg, top5=top5.global_avg,
                            images=top1.count, ema=label == 'EMA')
    return top1.global_avg


def checkpoint_paths(output_dir, epoch, device, is_best):
    """The original's files, and checkpoint.pth, the latest of them, which --resume auto reads."""
    paths = [os.path.join(output_dir, f'checkpoint_{epoch}_{device}.pth.tar'), training.latest_checkpoint(output_dir)]
    if is_best:
        paths.append(os.path.join(output_dir, f'model_best{epoch}.pth.tar'))
    return paths


def save_checkpoint(dev, model_without_ddp, optimizer, schedule, epoch, best_acc1, is_best, args,
                    classes, position=None, ema=None):
    """checkpoint_<epoch>_<device>.pth.tar and checkpoint.pth (--resume auto's), and the same file as
    model_best<epoch>.pth.tar on a new best, with
    the class names in label order (`classes`) and the run's arguments (`args`), for inference.py.

    After a mid-epoch stop (at `position`: samples of the epoch's order trained) the file also holds what a
    resume needs to continue exactly.
    """
    fields = {'epoch': epoch, 'arch': args.model, 'best_acc1': best_acc1, **training.schedule_fields(schedule, ema),
              'args': checkpoints.plain_args(args)}
    return training.save_checkpoint(dev, model_without_ddp, optimizer, fields,
                                    checkpoint_paths(args.output_dir, epoch, args.device, is_best),
                                    model_name=args.model, classes=classes, model_key='state_dict', position=position)


def check_aux_heads(state_dict, model, path):
    """A checkpoint with auxiliary classifiers cannot feed a model without them, and vice versa."""
    def has_aux(keys):
        return any(k.startswith(('aux1.', 'aux2.')) for k in keys)
    saved, wanted = has_aux(state_dict), has_aux(model.state_dict())
    if saved != wanted:
        how = 'with' if saved else 'without'
        fix = 'drop --no-aux-logits' if saved else 'add --no-aux-logits'
        raise UsageError(f"--resume: '{path}' was trained {how} the auxiliary classifiers; {fix} to resume it")


def resume(path, dev, model_without_ddp, optimizer, schedule, model_name, classes, ema=None, blurpool=False):
    """Load model, optimizer and schedule from `path` (a model with BlurPool when `blurpool`, --blurpool); returns
    training.Resumed (best_acc1 in its checkpoint)."""
    print(f"=> loading checkpoint '{path}'")
    checkpoint = checkpoints.load(path, model_name, len(classes),
                                  ('epoch', 'state_dict', 'best_acc1', 'optimizer', 'lr_scheduler'), classes=classes,
                                  blurpool=blurpool)
    check_aux_heads(checkpoint['state_dict'], model_without_ddp, path)
    resumed = training.resume(checkpoint, dev, model_without_ddp, optimizer, schedule, 'state_dict', ema)
    print(f"=> loaded checkpoint '{path}' (epoch {checkpoint['epoch']})")
    return resumed


def drop_aux_heads(model):
    """GoogLeNet without its auxiliary classifiers, as torchvision builds it for aux_logits=False."""
    model.aux_logits = False
    model.aux1 = None
    model.aux2 = None
    return model


def build_model(name, num_classes, pretrained, aux_logits, resuming, blurpool=False):
    """torchvision's model; for googlenet, with auxiliary classifiers unless `aux_logits` is False; with BlurPool
    when `blurpool` (--blurpool; GoogLeNet has no convolution the rule wraps, check_args refuses it).

    GoogLeNet is built with its aux heads and they are removed afterwards, because torchvision's
    ImageNet weights (--pretrained) can only be loaded that way.
    """
    if name != 'googlenet':
        return training.build_model(name, num_classes, pretrained, blurpool)
    model = training.build_model(name, num_classes, pretrained, blurpool, aux_logits=True, transform_input=pretrained,
                                 init_weights=not (pretrained or resuming))
    return model if aux_logits else drop_aux_heads(model)


def load_data(args, dev, ranks):
    """The loaders (loaders.build), with this trainer's options: no file-list cache; with --seed each sample's
    augmentation is seeded (as train.py's --deterministic) so runs repeat; without it the training order
    shuffles from seed 0, the DistributedSampler default, so that every rank draws the same order."""
    seeded = args.seed is not None
    settings = recipe_flags.loader_settings(args, seed=args.seed if seeded else 0, seeded=seeded,
                                            batch_size=args.batch_size)
    return loaders.build(args.data_path, settings, ranks, dev.loader_placement())


def check_args(args):
    """Refuse values that cannot work, before any data is read or any file written."""
    least_crop = GOOGLENET_MIN_INPUT if args.model == 'googlenet' else 1
    cli.check_at_least((
        ('--batch-size', args.batch_size, 1), ('--epochs', args.epochs, 1), ('--workers', args.workers, 0),
        ('--print-interval', args.print_interval, 1), ('--num-train-steps', args.num_train_steps, 1),
        ('--save-checkpoint', args.save_checkpoint, 0), ('--start-epoch', args.start_epoch, 0),
        ('--train-crop-size', args.train_crop_size, least_crop), ('--val-crop-size', args.val_crop_size, least_crop),
        ('--val-resize-size', args.val_resize_size, args.val_crop_size)))
    training.check_model_and_resume(args.model, args.resume, args.output_dir,
                                   '--evaluate' if args.evaluate else None)
    training.check_blurpool(args.model, args.blurpool)
    loaders.check_kind(args.dl_worker_type, args.data_path)
    recipe_flags.check(args)
    if args.min_res is not None and args.min_res < least_crop:
        raise UsageError(f'--min-res must be at least {least_crop} for {args.model}, got {args.min_res}')
    metrics.check_tensorboard(args.tensorboard, args.output_dir)
    training.check_precision(TORCH_DEVICE_KIND[args.device], training.amp_dtype(args.is_amp, args.amp_dtype),
                             args.is_hmp)


def main(args):
    check_args(args)
    if args.print_schedule:
        return recipe_flags.print_schedule(args, recipe_flags.launched_world_size(args.world_size))
    hmp = training.hmp_config(args.is_hmp, args.hmp_bf16, args.hmp_fp32, args.hmp_opt_level, args.hmp_verbose)
    device = devices.DeviceSettings(TORCH_DEVICE_KIND[args.device], channels_last=True, hmp=hmp,
                                    lazy_mode=args.enable_lazy, index=args.gpu, compile=args.compile,
                                    amp_dtype=training.amp_dtype(args.is_amp, args.amp_dtype), tf32=args.tf32,
                                    deterministic=args.seed is not None)
    dev, ranks = training.start(device, output_dir=args.output_dir, writes=not args.evaluate, dist_url=args.dist_url,
                                dist_timeout=args.dist_timeout)
    vars(args).update(ranks._asdict())  # for print(args), as the original's distributed set-up
    dev.mark_points = devices.EXAMPLES_MARK_POINTS
    print(args)
    print('Using', dev.torch_device)
    if args.seed is not None:
        training.seed_everything(args.seed, deterministic=True)
        if dev.kind == 'cuda':
            from classification import determinism
            print(determinism.SEED_WARNING, file=sys.stderr)

    dataset = load_data(args, dev, ranks)
    args.dl_worker_type = dataset.kind  # the loader that really runs
    train_loader, val_loader, train_sampler = dataset.train, dataset.val, dataset.train_sampler
    num_classes = len(dataset.classes)

    print('Creating model ', args.model)
    model = training.place_model(dev, build_model(args.model, num_classes, args.pretrained, not args.no_aux_logits,
                                                  bool(args.resume), args.blurpool))
    criterion = training.make_criterion(args.label_smoothing)
    optimizer = recipe_flags.make_optimizer(dev, model, args)
    global_batch = ranks.world_size * args.batch_size
    schedule = recipe_flags.make_schedule(optimizer, args, len(train_loader), global_batch)

    model, model_without_ddp = training.wrap_ddp(dev, model, ranks.distributed, args.model, args.bucket_cap_mb,
                                                 **DDP_SETTINGS)
    model = training.compile_model(dev, model, args.compile)
    extras = recipe_flags.make_extras(args, schedule, model_without_ddp, num_classes, global_batch)
    ema = extras.ema

    best_acc1, resumed = 0.0, training.NOT_RESUMED
    resume_path = training.checkpoint_to_resume(args.resume, args.output_dir)
    if resume_path:
        resumed = resume(resume_path, dev, model_without_ddp, optimizer, schedule, args.model, dataset.classes, ema,
                         args.blurpool)
        best_acc1, args.start_epoch = resumed.checkpoint['best_acc1'], resumed.start_epoch

    metrics_file = metrics.open_run(args.output_dir, ranks.rank, args.tensorboard)
    metrics_file.header(args=checkpoints.plain_args(args), recipe=args.recipe, device=dev.name(),
                        precision=dev.precision_settings(),
                        world_size=ranks.world_size, batch_size=args.batch_size,
                        steps_per_epoch=min(len(train_loader), args.num_train_steps),
                        start=metrics.RunStart(args.start_epoch, resumed.position, resume_path),
                        test_only=args.evaluate)
    if args.evaluate:
        evaluated = resumed.checkpoint.get('epoch')  # the epoch the checkpoint finished (None: none)
        validate(val_loader, model_without_ddp, criterion, dev, args.print_interval, args.num_train_steps,
                 epoch=evaluated, metrics_file=metrics_file, tta_flip=args.tta_flip)
        if ema is not None:
            validate(val_loader, ema, criterion, dev, args.print_interval, args.num_train_steps, label='EMA',
                     epoch=evaluated, metrics_file=metrics_file, tta_flip=args.tta_flip)
        return

    epoch_time = AverageMeter('EpochTime', ':6.3f')
    epoch_progress_total = max(args.epochs - args.start_epoch, 0)
    start_time = epoch_start = time.time()
    stop = stopping.GracefulStop(ranks.distributed, args.dist_timeout, ranks.rank, cli.rerun_status(args.resume))
    faults.watch_surroundings(launched=ranks.distributed)
    images_trained = 0

    def save(position):
        return save_checkpoint(dev, model_without_ddp, optimizer, schedule, epoch, best_acc1, False, args,
                               dataset.classes, position, ema)

    for epoch in range(args.start_epoch, args.epochs):
        first_step = training.start_epoch(epoch, resumed, train_sampler, dev, args.batch_size, args.seed,
                                          augment=schedule.augments(epoch),
                                          resolution=recipe_flags.training_resolution(args, epoch))
        print('training epoch ', epoch)
        train_start = time.time()
        images, stopped_at = train(train_loader, model, criterion, optimizer, epoch, dev, args.print_interval,
                                   num_train_steps=args.num_train_steps, warm_up=epoch == args.start_epoch,
                                   stop=stop, first_step=first_step, extras=extras,
                                   model_without_ddp=model_without_ddp, metrics_file=metrics_file,
                                   compiles=args.compile and epoch == args.start_epoch)
        train_time = time.time() - train_start
        images_trained += images
        position = training.unfinished_position(stopped_at, first_step, train_sampler, args.batch_size)
        if position is not None:
            return training.stop_and_save(stop, save, epoch, position, stopped_at - 1)
        schedule.after_epoch()
        distributed.broadcast_buffers(model_without_ddp)

        acc1 = None
        if training.evaluates_after(epoch, args.epochs, args.epochs_between_evals, args.eval_offset_epochs):
            print('validating epoch ', epoch)
            acc1 = validate(val_loader, model_without_ddp, criterion, dev, args.print_interval, args.num_train_steps,
                            stop, epoch=epoch, metrics_file=metrics_file, tta_flip=args.tta_flip)
            if ema is not None:
                validate(val_loader, ema, criterion, dev, args.print_interval, args.num_train_steps, stop, label='EMA',
                         epoch=epoch, metrics_file=metrics_file, tta_flip=args.tta_flip)
        epoch_time.update(time.time() - epoch_start)
        metrics_file.epoch(epoch, images=images, train_time=train_time, epoch_time=epoch_time.value,
                           resolution=recipe_flags.training_resolution(args, epoch))
        epoch_start = time.time()
        ProgressMeter(epoch_progress_total, [epoch_time], prefix=f'END OF EPOCH [{epoch}]:').display(
            epoch - args.start_epoch + 1)

        is_best = acc1 is not None and acc1 > best_acc1
        best_acc1 = best_acc1 if acc1 is None else max(acc1, best_acc1)
        if args.save_checkpoint > 0 and (epoch + 1) % args.save_checkpoint == 0:
            print('saving ckpt epoch ', epoch)
            save_checkpoint(dev, model_without_ddp, optimizer, schedule, epoch, best_acc1, is_best, args,
                            dataset.classes, ema=ema)
        if stop.at_epoch_end() and epoch + 1 < args.epochs:
            return training.stop_and_save(stop, save, epoch)

    total_time = time.time() - start_time
    if ranks.distributed:
        distributed.say(f'| rank {ranks.rank}: trained on {images_trained} images')  # one write: mpirun merges ranks
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')
    return training.status_after_the_last_epoch(stop)


def get_args_parser(add_help=True):
    parser = cli.ArgumentParser(description='PyTorch GoogleNet Training', add_help=add_help)
    parser.add_argument('--amp', dest='is_amp', action='store_true',
                        help='enable GPU amp mode: torch.autocast (--amp-dtype; float16 with a GradScaler), gpu and cpu')
    parser.add_argument('-b', '--batch-size', default=256, type=int, metavar='N',
                        help='per-process mini-batch size (default: 256)')
    parser.add_argument('--data-path', metavar='DIR', required=True,
                        help='path to dataset (with train/ and val/ folders), or synthetic: random batches made '
                             'once on the device')
    parser.add_argument('--device', default='hpu', choices=['cpu', 'hpu', 'gpu'],
                        help='cpu, hpu or gpu (CUDA)')
    parser.add_argument('--dist-url', default='env://', help='url used to set up distributed training')
    distributed.add_timeout_flag(parser)
    cli.add_loader_kind_arg(parser, default='MP')
    parser.add_argument('-e', '--evaluate', dest='evaluate', action='store_true',
                        help='evaluate model on validation set')
    parser.add_argument('--enable-lazy', action='store_true',
                        help='run in lazy mode on hpu (otherwise eager)')
    parser.add_argument('--epochs', default=90, type=int, metavar='N', help='number of total epochs to run')
    parser.add_argument('--gpu', default=0, type=int, metavar='N',
                        help='CUDA device of a single-process --device gpu run')
    cli.add_hmp_args(parser, os.path.join(HERE, 'ops_bf16_googlenet.txt'), os.path.join(HERE, 'ops_fp32_googlenet.txt'))
    cli.add_precision_and_gpu_args(parser)
    parser.add_argument('--lr', '--learning-rate', default=0.1, type=float, metavar='LR',
                        help='initial learning rate', dest='lr')
    parser.add_argument('--lr-step-size', default=30, type=int, help='decrease lr every step-size epochs')
    parser.add_argument('--lr-gamma', default=0.1, type=float, help='decrease lr by a factor of lr-gamma')
    parser.add_argument('--model', default='googlenet', help='model')
    parser.add_argument('--momentum', default=0.9, type=float, metavar='M', help='momentum')
    parser.add_argument('--no-aux-logits', action='store_true', help='disable aux logits in GoogleNet')
    parser.add_argument('--num-train-steps', type=int, default=sys.maxsize, metavar='T',
                        help='number of training (and validation) steps per epoch (default: all)')
    parser.add_argument('-p', '--print-interval', default=1, type=int, metavar='N',
                        help='print frequency (default: 1)')
    parser.add_argument('--pretrained', dest='pretrained', action='store_true', help='use pre-trained model')
    parser.add_argument('--resume', default=None, type=str, metavar='PATH|auto',
                        help='path to latest checkpoint (default: None); auto: --output-dir\'s checkpoint.pth when it '
                             'exists, else a fresh start (a stop signal with epochs left then exits 75: run the same '
                             'command again)')
    parser.add_argument('--save-checkpoint', default=1, const=5, type=int, nargs='?', metavar='N',
                        help='save a checkpoint every N epochs (bare flag: 5; 0: never; default: 1)')
    parser.add_argument('--seed', default=None, type=int, help='seed for initializing training')
    parser.add_argument('--start-epoch', default=0, type=int, metavar='N',
                        help='manual epoch number (useful on restarts)')
    parser.add_argument('--wd', '--weight-decay', default=1e-4, type=float, metavar='W',
                        help='weight decay (default: 1e-4)', dest='weight_decay')
    parser.add_argument('-j', '--workers', default=10, type=int, metavar='N',
                        help='number of data loading workers (default: 10)')
    # Added: where checkpoints go (the original writes to the current directory, still the default),
    # and train.py's image sizes, so small images and quick runs are possible.
    parser.add_argument('--output-dir', default='.', help='where to write checkpoints (default: current directory)')
    parser.add_argument('--world-size', default=1, type=int,
                        help='ranks, for --print-schedule and --recipe outside a launcher (a launcher\'s variables win)')
    cli.add_image_size_args(parser)
    cli.add_compile_arg(parser)
    cli.add_tensorboard_arg(parser)
    cli.add_recipe_args(parser)
    ignored = cli.compatibility_group(parser)
    ignored.add_argument('--dataset-type', default='Imagenet', choices=['Imagenet'],
                         help='Imagenet, the one type: any train/ and val/ ImageFolder is read')
    ignored.add_argument('--distributed', action='store_true',
                         help='distributed mode follows the launcher (mpirun, torchrun)')
    ignored.add_argument('--process-per-node', default=8, type=int, metavar='N',
                         help='processes per node: the launcher places the ranks')
    return parser


if __name__ == '__main__':
    sys.exit(cli.run_cli(distributed.reporting_stopped_peers(main),
                         recipe_flags.parse_args(get_args_parser(), sys.argv[1:])))
