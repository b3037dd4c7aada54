"""Progress of the long steps that print nothing else (the dataset scan, sample_data.py), on stderr.

On a terminal, one line rewritten in place with `\\r` (a bar when the total is known); in a log (stderr not a
terminal), one line every LOG_INTERVAL_S seconds and one at the end. A task that ends within QUIET_S seconds
prints nothing, so the output of small runs does not change. Only the process that reports (rank 0) should
show it: the caller says so with `enabled`. Torch-free and dependency-free.
"""
import sys
import time

QUIET_S = 2.0          # nothing is shown for a task that ends sooner
TTY_INTERVAL_S = 0.2   # redraws of the terminal line
LOG_INTERVAL_S = 10.0  # lines in a log
BAR_WIDTH = 24


class Progress:
    """`with Progress('Scanning train', total=1000, unit='class folders') as bar: bar.update(done, '12 files')`.

    `stream` (default stderr), `clock` (time.monotonic) and `tty` (default stream.isatty()) are for tests.
    """

    def __init__(self, label, total=None, unit='', *, enabled=True, stream=None, clock=None, tty=None):
        self.label, self.total, self.unit = label, total, unit
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.tty = tty if tty is not None else _isatty(self.stream)
        self.started = self.clock()
        self.shown_at = None  # when a line was last written (None: not yet)
        self.done, self.extra = 0, ''

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self.enabled and self.tty and self.shown_at is not None:
            self.stream.write('\n')  # the error's line starts on a line of its own
            self.stream.flush()
        return False

    def update(self, done, extra=''):
        """`done` of `total` finished; `extra` is shown after the count (e.g. the files found so far)."""
        self.done, self.extra = done, extra
        if not self.enabled:
            return
        now = self.clock()
        if now - self.started < QUIET_S:
            return
        interval = TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S
        if self.shown_at is None or now - self.shown_at >= interval:
            self._show(now)

    def close(self):
        """The last line, when anything was shown (the terminal line is ended)."""
        if self.enabled and self.shown_at is not None:
            self._show(self.clock(), final=True)

    def line(self, now, final=False):
        count = f'{self.done:,}' + (f'/{self.total:,}' if self.total is not None else '')
        text = f'{self.label}: ' + (f'{self.bar()} ' if self.tty and self.total else '') + count
        text += f' {self.unit}' if self.unit else ''
        text += f', {self.extra}' if self.extra else ''
        return text + (f' in {now - self.started:.0f} s' if final else f', {now - self.started:.0f} s')

    def bar(self):
        filled = int(BAR_WIDTH * min(self.done / self.total, 1.0))
        return '[' + '#' * filled + '.' * (BAR_WIDTH - filled) + ']'

    def _show(self, now, final=False):
        text = self.line(now, final)
        if self.tty:
            self.stream.write('\r' + text + '\x1b[K' + ('\n' if final else ''))
        else:
            self.stream.write(text + '\n')
        self.stream.flush()
        self.shown_at = now


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
