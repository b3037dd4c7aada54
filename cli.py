"""Command-line plumbing shared by the trainers and the demo wrappers, free of torch so that the
wrappers (and `--dry-run`) start at once: the error types that end a run with one line, `run_cli`,
an ArgumentParser whose errors are one line, and the True/False flag parser of the originals."""
import argparse
import contextlib
import signal
import sys

# The signals that ask a run to stop after the current step and save: SIGTERM (schedulers' preemption)
# and SIGUSR1 (SLURM's --signal; mpirun forwards it to every rank without killing them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CleanExit(Exception):
    """An expected way for a run to fail: reported as one line on stderr, no traceback."""
    exit_code = 1


class UsageError(CleanExit):
    """Bad input from the user: one line naming the flag or file and what to do, exit status 2."""
    exit_code = 2


def run_cli(main, *args):
    """Run `main(*args)`, turning a CleanExit into one line on stderr and its exit status."""
    try:
        return main(*args)
    except CleanExit as err:
        sys.stderr.write(f'error: {err}\n')  # not print(): on ranks > 0 print is silenced
        sys.stderr.flush()
        raise SystemExit(err.exit_code)
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


def compatibility_group(parser):
    """The group of flags the originals take that these scripts accept, so their command lines run unchanged,
    and ignore (each help says why)."""
    return parser.add_argument_group('accepted for compatibility with the original scripts, and ignored')
