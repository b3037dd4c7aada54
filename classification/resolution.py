"""Progressive resizing: the training resolution per epoch, FFCV's rule (ffcv-imagenet's `get_resolution`;
docs/recipes.md, *Progressive resizing*).

Epochs are counted from 0, as the trainers count them. Up to --start-ramp the run trains at --min-res; from
--end-ramp on at --max-res; in between at the linear interpolation between the two, rounded to a multiple of
--res-rounding (FFCV: 32). The loaders take the epoch's resolution from the training sampler's keys
(samplers.train_key), so persistent workers and a mid-epoch resume follow the schedule. Validation keeps its
own sizes (--val-resize-size, --val-crop-size).
"""
from dataclasses import dataclass

import numpy as np

from .cli import UsageError

RES_ROUNDING = 32  # FFCV rounds the ramp's resolutions to multiples of 32


@dataclass(frozen=True)
class ProgressiveResizing:
    min_res: int
    max_res: int
    start_ramp: int
    end_ramp: int
    rounding: int = RES_ROUNDING

    def at(self, epoch):
        """The training resolution of `epoch` (0-based)."""
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        interpolated = np.interp(epoch, [self.start_ramp, self.end_ramp], [self.min_res, self.max_res])
        return int(np.round(interpolated / self.rounding)) * self.rounding

    def resolutions(self, epochs):
        """{resolution: number of epochs} over epochs 0 .. epochs - 1."""
        counts = {}
        for epoch in range(epochs):
            counts[self.at(epoch)] = counts.get(self.at(epoch), 0) + 1
        return counts

    def describe(self):
        return (f'{self.min_res} px to epoch {self.start_ramp}, ramp to {self.max_res} px at epoch {self.end_ramp} '
                f'(multiples of {self.rounding}), {self.max_res} px after')

    def as_record(self):
        return {'min_res': self.min_res, 'max_res': self.max_res, 'start_ramp': self.start_ramp,
                'end_ramp': self.end_ramp, 'res_rounding': self.rounding}


FLAGS = ('--min-res', '--max-res', '--start-ramp', '--end-ramp')


def from_flags(min_res=None, max_res=None, start_ramp=None, end_ramp=None, rounding=RES_ROUNDING):
    """The schedule of the four flags, None when none is given; a UsageError naming the flag for a partial or
    impossible one."""
    values = (min_res, max_res, start_ramp, end_ramp)
    if all(value is None for value in values):
        return None
    missing = [flag for flag, value in zip(FLAGS, values) if value is None]
    if missing:
        raise UsageError(f'progressive resizing needs {", ".join(FLAGS)} together: {", ".join(missing)} missing')
    for flag, value in (('--min-res', min_res), ('--max-res', max_res), ('--res-rounding', rounding)):
        if value <= 0:
            raise UsageError(f'{flag} must be positive (got {value})')
    if min_res > max_res:
        raise UsageError(f'--min-res ({min_res}) must not exceed --max-res ({max_res})')
    if start_ramp < 0:
        raise UsageError(f'--start-ramp must be an epoch, 0 or more (got {start_ramp})')
    if end_ramp < start_ramp:
        raise UsageError(f'--end-ramp ({end_ramp}) must not come before --start-ramp ({start_ramp}): the ramp '
                         'would end before it starts')
    schedule = ProgressiveResizing(min_res, max_res, start_ramp, end_ramp, rounding)
    for epoch in range(start_ramp, end_ramp + 1):
        if schedule.at(epoch) <= 0:
            raise UsageError(f'--res-rounding {rounding} rounds epoch {epoch}\'s resolution to 0: use a smaller one')
    return schedule


def from_arguments(values):
    """from_flags of a run's parsed arguments as a dict (vars(args), or checkpoints.plain_args' copy); None
    without the four flags (main.py's and train.py's parsers both have them)."""
    flags = [values.get(name) for name in ('min_res', 'max_res', 'start_ramp', 'end_ramp')]
    rounding = values.get('res_rounding')
    return from_flags(*flags, RES_ROUNDING if rounding is None else rounding)
