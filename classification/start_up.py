"""A stop signal while a trainer starts (importing torch, meeting the other ranks, scanning the dataset, building
the model, resuming), before stopping.GracefulStop answers it: nothing is trained yet, so nothing can be lost;
the run ends at once with one line and the status its stop would have had (cli.stop_exit_status), never by the
signal's default action, which a scheduler records as a crash (SLURM: `tasks 0-1: Terminated`).

The answer cannot wait for the main thread, which may sit in C for as long as --dist-timeout (the ranks'
rendezvous) without returning to Python: the signal only wakes a thread, through signal.set_wakeup_fd, and
that thread ends the process. Torch-free, so the trainers install it on their first lines.
"""
import os
import signal
import sys
import threading

from .cli import STOP_SIGNALS, rerun_status_of_command, stop_exit_status

_guard = None
_ignored_at_start = None  # the stop signals the process started with ignored, read by `guard`


class _StartUpGuard:
    def __init__(self, rerun_status):
        self.rerun_status = rerun_status
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.handed_over = False
        for signum in answered_signals():  # a Python handler, so that the signal reaches the wakeup fd
            signal.signal(signum, _ignore_in_the_main_thread)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, name='start-up stop signals', daemon=True).start()

    def _watch(self):
        signum = None
        while signum not in STOP_SIGNALS:  # the fd gets every signal with a Python handler (torch's SIGCHLD too)
            received = os.read(self.read_fd, 1)
            if not received or self.handed_over:
                return
            signum = received[0]
        status = stop_exit_status(signum, self.rerun_status)
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        try:
            os.write(2, f'{signal.Signals(signum).name} received before training started: nothing trained, nothing '
                        f'to save; exiting {status}\n'.encode())
        except OSError:  # the output stream is gone: the exit status still says what happened
            pass
        os._exit(status)

    def hand_over(self):
        self.handed_over = True
        signal.set_wakeup_fd(-1)
        os.close(self.write_fd)  # the watching thread reads the end of the pipe and returns


def _ignore_in_the_main_thread(signum, frame):
    """The watching thread answers (the main thread may be held in C)."""


def guard(argv):
    """From here until `hand_over`, a stop signal ends the process with one line (the trainers' first lines).
    argv: the command line, read only for `--resume auto` (cli.rerun_status_of_command)."""
    global _guard, _ignored_at_start
    if _guard is None and threading.current_thread() is threading.main_thread():
        _ignored_at_start = ignored_now()
        _guard = _StartUpGuard(rerun_status_of_command(argv))


def hand_over():
    """The run's stop handlers are installed (stopping.GracefulStop): they answer the stop signals from now on."""
    global _guard
    if _guard is not None:
        _guard.hand_over()
        _guard = None


def ignored_now():
    return {signum for signum in STOP_SIGNALS if signal.getsignal(signum) == signal.SIG_IGN}


def answered_signals():
    """The stop signals a run answers: all of cli.STOP_SIGNALS but those it started with ignored (`nohup`
    ignores SIGHUP, a shell's `&` SIGINT), which stay ignored, as the one who started it asked."""
    ignored = ignored_now() if _ignored_at_start is None else _ignored_at_start
    return [signum for signum in STOP_SIGNALS if signum not in ignored]
