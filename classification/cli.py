"""Command-line plumbing shared by the trainers and the demo wrappers, free of torch so that the
wrappers (and `--dry-run`) start at once: the error types that end a run with one line, `run_cli`,
an ArgumentParser whose errors are one line, and the True/False flag parser of the originals."""
import argparse
import contextlib
import os
import signal
import sys

# The signals that ask a run to stop after the current step and save: SIGTERM (schedulers' preemption)
# and SIGUSR1 (SLURM's --signal; mpirun forwards it to every rank without killing them).
# A scheduler's stop: the run saves and exits 0 (SIGTERM: SLURM, Kubernetes, PBS; SIGUSR1: SLURM's --signal and
# the one mpirun forwards without killing; SIGUSR2: SGE's -notify, LSF's warning action).
CLEAN_STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
# Every signal the trainer answers by saving, then exiting 128 + N for the last three: the terminal or ssh
# session gone (SIGHUP), Ctrl-C or LSF's bkill (SIGINT; a second one stops at once), a CPU-time limit (SIGXCPU).
STOP_SIGNALS = CLEAN_STOP_SIGNALS + (signal.SIGHUP, signal.SIGINT, signal.SIGXCPU)
# --resume auto: the output folder's checkpoint.pth when there is one, else a fresh start.
AUTO_RESUME = 'auto'
# The exit status of a run under --resume auto that a scheduler's stop ended with epochs left: it saved and asks
# to be run again (sysexits.h's EX_TEMPFAIL), which a job script tells from a finished run (0) and requeues.
RERUN_EXIT_STATUS = 75


def stop_exit_status(signum, rerun_status=0):
    """The exit status of a run that stop signal `signum` ended: `rerun_status` after a scheduler's stop
    (CLEAN_STOP_SIGNALS; 0, or RERUN_EXIT_STATUS for a run with work left under --resume auto), 128 + N after
    another signal N."""
    return rerun_status if signum in CLEAN_STOP_SIGNALS else 128 + signum


def rerun_status(resume):
    """The status a scheduler's stop with epochs left exits with: RERUN_EXIT_STATUS under --resume auto, else 0."""
    return RERUN_EXIT_STATUS if resume == AUTO_RESUME else 0


def rerun_status_of_command(argv):
    """rerun_status read from a command line, before its parser runs (a stop can come while torch imports)."""
    words = list(argv)
    given = [b for a, b in zip(words, words[1:]) if a == '--resume'] + [w[len('--resume='):] for w in words
                                                                        if w.startswith('--resume=')]
    return max(map(rerun_status, given), default=0)


class CleanExit(Exception):
    """An expected way for a run to fail: reported as one line on stderr, no traceback."""
    exit_code = 1


class UsageError(CleanExit):
    """Bad input from the user: one line naming the flag or file and what to do, exit status 2."""
    exit_code = 2


def run_cli(main, *args):
    """Run `main(*args)` and return the process's exit status: main's when it returns an int (a stop's,
    stopping.GracefulStop.exit_status), else 0; a CleanExit becomes one line on stderr and its status."""
    try:
        status = main(*args)
        return status if type(status) is int else 0
    except CleanExit as err:
        sys.stderr.write(f'error: {err}\n')  # not print(): on ranks > 0 print is silenced
        sys.stderr.flush()
        raise SystemExit(err.exit_code)
    except BrokenPipeError:  # output piped into `head` and the like: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)
    finally:
        end_loader_workers()


def end_loader_workers():
    """Loader workers ignore SIGTERM (samplers.seed_worker), so multiprocessing's clean-up at exit, which
    sends them SIGTERM and then waits, would wait forever for workers that are still running (a loader
    that an error left behind, persistent workers). End them here instead."""
    import multiprocessing
    children = multiprocessing.active_children()
    if children:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report them as crashed
    for child in children:
        child.kill()
        child.join(timeout=10)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread, e.g. while helper processes start: a child inherits the mask
    (across exec too), so it never receives a stop signal sent to the whole process group, and a signal
    that arrives meanwhile is delivered here when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def parse_bool(value):
    """'True'/'False' flags as the original scripts take them, but a typo is an error, not False."""
    lowered = str(value).strip().lower()
    if lowered in ('true', '1', 'yes'):
        return True
    if lowered in ('false', '0', 'no'):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")


def whole_seconds(value):
    """A time limit in whole seconds, at least 1 (--dist-timeout)."""
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds of at least 1, got '{value}'")
    return int(text)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (plus a pointer to --help) instead of the usage dump."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def check_at_least(limits):
    """Refuse each (flag, value, least) of `limits` whose value is below its least."""
    for flag, value, least in limits:
        if value < least:
            raise UsageError(f'{flag} must be at least {least}, got {value}')


LOADER_KINDS = ('MP', 'HABANA', 'FAST', 'DALI')
LOADER_HELP = ('MP: torch DataLoader with PIL transforms; HABANA: habana_dataloader, or the fast JPEG pipeline '
               'where it is not installed; FAST: the fast JPEG pipeline; DALI: NVIDIA DALI (decodes on the GPU on '
               f'cuda, with its CPU operators elsewhere; pip install nvidia-dali-cuda130)')


def add_loader_kind_arg(parser, default, help=LOADER_HELP):
    parser.add_argument('--dl-worker-type', default=default, type=str.upper, choices=LOADER_KINDS, help=help)


def add_hmp_args(parser, bf16_default, fp32_default):
    """Habana mixed precision flags, shared by both trainers (they differ only in the defaults)."""
    parser.add_argument('--hmp', dest='is_hmp', action='store_true', help='enable hmp mode')
    parser.add_argument('--hmp-bf16', default=bf16_default, help='path to bf16 ops list in hmp O1 mode')
    parser.add_argument('--hmp-fp32', default=fp32_default, help='path to fp32 ops list in hmp O1 mode')
    parser.add_argument('--hmp-opt-level', default='O1', help='choose optimization level for hmp')
    parser.add_argument('--hmp-verbose', action='store_true', help='enable verbose mode for hmp')


def positive_number(value):
    """argparse type of a size that must be above zero (--bucket-cap-mb)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{value}'") from None
    if not number > 0 or number == float('inf'):
        raise argparse.ArgumentTypeError(f'expected a positive number, got {value}')
    return number


def add_precision_and_gpu_args(parser):
    """Added, both trainers: --amp's dtype, TF32, DDP's bucket size and the CUDA input prefetch (--amp itself
    is each trainer's own flag: torchvision's in train.py, the original's in main.py); docs/devices.md."""
    group = parser.add_argument_group('mixed precision and GPU speed (docs/devices.md)')
    group.add_argument('--amp-dtype', default=None, choices=('float16', 'bfloat16'),
                       help='--amp: float16 (with loss scaling; any GPU, the one choice before compute capability '
                            '8.0: V100, T4) or bfloat16 (no scaling; A100, H100 and later, hpu, CPUs with AMX) '
                            '(default: float16)')
    group.add_argument('--tf32', default='True', type=parse_bool,
                       help='cuda: float32 matmuls and convolutions in TF32 on Ampere and later (True/False; '
                            'default: True, as NVIDIA\'s DeepLearningExamples)')
    group.add_argument('--bucket-cap-mb', default=None, type=positive_number, metavar='MB',
                       help='DDP gradient bucket size (default: torch\'s 25 on cuda and cpu; Habana\'s 100/200 on hpu)')
    group.add_argument('--prefetch', default='True', type=parse_bool,
                       help='cuda: copy and normalise the next batch on a side stream during the step (True/False; '
                            'default: True)')


def add_image_size_args(parser):
    """Added (upstream torchvision 0.12+ names and the reference sizes), so small images and quick runs work."""
    parser.add_argument('--train-crop-size', default=224, type=int, help='RandomResizedCrop size')
    parser.add_argument('--val-resize-size', default=256, type=int, help='validation resize size')
    parser.add_argument('--val-crop-size', default=224, type=int, help='validation center crop size')


def add_compile_arg(parser):
    """--compile, both trainers: torch.compile the model on cuda and cpu (docs/training.md, Synthetic data and
    benchmark modes)."""
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the model (cuda, cpu; on hpu lazy mode is the graph compiler); the '
                             'first step of each batch shape compiles and is left out of img/s')


def add_tensorboard_arg(parser):
    """Added, both trainers: the metrics file's scalars also as TensorBoard events (docs/metrics.md)."""
    parser.add_argument('--tensorboard', action='store_true',
                        help='also write the metrics as TensorBoard scalars into <output-dir>/tensorboard '
                             '(needs the tensorboard package)')


def compatibility_group(parser):
    """The group of flags the originals take that these scripts accept, so their command lines run unchanged,
    and ignore (each help says why)."""
    return parser.add_argument_group('accepted for compatibility with the original scripts, and ignored')


def add_recipe_args(parser):
    """The recipe flags both trainers take (names from torchvision's references, NVIDIA's main.py and Habana's
    1.7+ train.py; docs/recipes.md). Their defaults are the 1.4.0 behaviour."""
    group = parser.add_argument_group('recipes (docs/recipes.md): schedules, optimizers, regularisation')
    group.add_argument('--recipe', default='habana-1.4', metavar='NAME',
                       help='a named recipe, expanded to flags that any flag given here overrides; '
                            '"--recipe list" describes them (default: habana-1.4, the 1.4.0 behaviour)')
    group.add_argument('--print-schedule', action='store_true',
                       help='print the LR, weight decay, momentum resets and augmentation per epoch (and per '
                            'iteration around phase boundaries) for these flags and world size, then exit')
    group.add_argument('--dataset-size', default=None, type=int, metavar='N',
                       help='training images for --print-schedule and for an epoch of --data-path synthetic '
                            '(default: ImageNet-1k\'s 1281167)')
    group.add_argument('--lr-scheduler', default='steplr',
                       help='steplr (per epoch, the default; per iteration with a warm-up), cosineannealinglr, '
                            'polynomiallr (MLPerf/LARS: to --lr-min), collapse (--lr-phases), cyclic (FFCV: linear '
                            'from 1e-4 x --lr up to --lr at --lr-peak-epoch, then to 0 at --epochs)')
    group.add_argument('--lr-warmup-epochs', '--lars_warmup_epochs', default=0.0, type=float,
                       help='warm-up length in epochs (per iteration)')
    group.add_argument('--lr-warmup-method', default='linear', help='linear or constant')
    group.add_argument('--lr-warmup-decay', default=0.01, type=float,
                       help='the warm-up starts at this fraction of --lr (0: from 0, polynomiallr only)')
    group.add_argument('--lr-min', '--lars_end_learning_rate', default=0.0, type=float,
                       help='the LR cosine and polynomial decays end at')
    group.add_argument('--lr-power', default=2.0, type=float, help='polynomiallr: the decay\'s power')
    group.add_argument('--lr-decay-epochs', '--lars_decay_epochs', default=0.0, type=float,
                       help='polynomiallr: decay horizon in epochs, warm-up included (default: --epochs)')
    group.add_argument('--lr-peak-epoch', default=2.0, type=float, metavar='EPOCH',
                       help='cyclic: the epoch the LR peaks at, in (0, --epochs] (default: 2, FFCV\'s)')
    group.add_argument('--lr-phases', default=None, nargs='+', metavar='PHASE',
                       help='collapse: phases end to end, each ITERATIONS,LR[,warmup=ITERATIONS@LR]'
                            '[,horizon=ITERATIONS][,power=P][,wd=W][,noaug], in iterations at this run\'s global '
                            'batch, LRs absolute (--lr is not used)')
    group.add_argument('--optimizer', default='sgd', type=str.lower, choices=('sgd', 'lars'),
                       help='sgd (the device\'s fused SGD where it has one) or lars (Habana\'s fused LARS on hpu)')
    group.add_argument('--lars-trust-coefficient', default=0.001, type=float, help='LARS trust coefficient (eta)')
    group.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=False, help='Nesterov momentum')
    group.add_argument('--label-smoothing', default=0.0, type=float, help='label smoothing of the loss')
    group.add_argument('--mixup-alpha', default=0.0, type=float, help='mixup on each batch, Beta(alpha, alpha)')
    group.add_argument('--cutmix-alpha', default=0.0, type=float,
                       help='cutmix on each batch (with mixup: one of the two per batch)')
    group.add_argument('--blurpool', action=argparse.BooleanOptionalAction, default=False,
                       help='FFCV\'s BlurPool: a fixed 3x3 blur before every conv of stride > 1 on >= 16 channels; '
                            'changes the model (its weights no longer load into torchvision\'s class)')
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=False,
                       help='keep, evaluate and save an exponential moving average of the weights')
    group.add_argument('--model-ema-steps', default=32, type=int, help='steps between EMA updates')
    group.add_argument('--model-ema-decay', default=0.99998, type=float,
                       help='EMA decay per image of the global batch, as torchvision\'s (adjusted for batch, '
                            'steps and epochs)')
    group.add_argument('--norm-weight-decay', default=None, type=float,
                       help='weight decay of normalisation layers\' weights and biases (default: --wd)')
    group.add_argument('--bias-weight-decay', default=None, type=float,
                       help='weight decay of the other biases (default: --wd)')
    group.add_argument('--clip-grad-norm', default=None, type=float, help='clip the gradients\' norm to this')
    group.add_argument('--auto-augment', default=None, help='MP loader: ra, ta_wide, augmix or imagenet')
    group.add_argument('--ra-magnitude', default=9, type=int, help='RandAugment magnitude')
    group.add_argument('--augmix-severity', default=3, type=int, help='AugMix severity')
    group.add_argument('--random-erase', default=0.0, type=float, help='MP loader: random erasing probability')
    group.add_argument('--epochs-between-evals', '-ebe', '--epochs_between_evals', default=1, type=int,
                       metavar='N',
                       help='evaluate every N epochs (and after the last)')
    group.add_argument('--eval-offset-epochs', '-eoe', '--eval_offset_epochs', default=0, type=int,
                       metavar='K',
                       help='the first evaluation after epoch K (then every --epochs-between-evals)')
    # Habana 1.7+'s spellings of the LARS values, for its commands as they are (the others are aliases above):
    # they set the same values as --lr and --wd, which the trainers define (a default of their own would win).
    group.add_argument('--lars_base_learning_rate', dest='lr', type=float, default=argparse.SUPPRESS, metavar='LR',
                       help='Habana 1.7+\'s name for --lr')
    group.add_argument('--lwd', '--lars-weight-decay', dest='weight_decay', type=float, default=argparse.SUPPRESS,
                       metavar='W', help='Habana 1.7+\'s name for --wd')
    add_resolution_args(parser)
    return group


def add_resolution_args(parser):
    """FFCV's training and test resolutions (docs/recipes.md, *Progressive resizing* and *Test-time flip*)."""
    group = parser.add_argument_group('resolution (FFCV): progressive resizing and test-time flip')
    group.add_argument('--min-res', default=None, type=int, metavar='PX',
                       help='progressive resizing: the training resolution up to --start-ramp (with --max-res, '
                            '--start-ramp and --end-ramp; default: off, --train-crop-size every epoch)')
    group.add_argument('--max-res', default=None, type=int, metavar='PX',
                       help='progressive resizing: the training resolution from --end-ramp on')
    group.add_argument('--start-ramp', default=None, type=int, metavar='EPOCH',
                       help='progressive resizing: the last epoch (from 0) at --min-res')
    group.add_argument('--end-ramp', default=None, type=int, metavar='EPOCH',
                       help='progressive resizing: the first epoch at --max-res; in between, linear')
    group.add_argument('--res-rounding', default=32, type=int, metavar='PX',
                       help='progressive resizing: the ramp\'s resolutions are multiples of this (FFCV: 32)')
    group.add_argument('--tta-flip', action=argparse.BooleanOptionalAction, default=False,
                       help='validate on the sum of the logits of each image and of its mirror (FFCV\'s lr_tta)')
