"""Learning-rate schedules: the 1.4.0 StepLR per epoch (the default, unchanged), and per-iteration schedules
composed from torch.optim.lr_scheduler: linear or constant warm-up (LinearLR, ConstantLR) followed by cosine
(CosineAnnealingLR), step (StepLR) or polynomial decay to an end LR, the multi-phase "LR collapse" of the
SURFsara/Intel-Caffe recipe (LambdaLR over the closed form of spec 2.4; each phase with its own warm-up, decay
horizon, power, weight decay and augmentation, and momentum reset at its start), and FFCV's cyclic schedule
(LambdaLR over its closed form, spec 4: linear up to the peak epoch, then down to 0).

`Schedule` is what the trainers hold: `after_step()` after every optimizer step, `after_epoch()` after every
epoch, `augments(epoch)` for the loaders, and a state_dict that resumes exactly, mid-epoch included. torch is
imported where a schedule is built, so that recipes (and the demo wrappers) parse phases without it.
"""
import math
import re
import warnings
from dataclasses import dataclass, replace

from .cli import UsageError

SCHEDULERS = ('steplr', 'cosineannealinglr', 'polynomiallr', 'collapse', 'cyclic')
WARMUP_METHODS = ('linear', 'constant')
IMAGENET_TRAIN_IMAGES = 1281167  # ImageNet-1k's training split: --print-schedule's default --dataset-size


@dataclass(frozen=True)
class Phase:
    """One phase of a multi-phase schedule (one `caffe train` run of the LR-collapse recipe), in iterations.

    Within the phase, at iteration i from its start: a linear warm-up from warmup_start_lr to base_lr while
    i < warmup_iterations, else base_lr * (1 - i / horizon) ** power: the decay is evaluated at the raw i, not
    i - warmup_iterations (Caffe's poly_cyc), so the LR drops where the warm-up ends, as in the recipe.
    """
    iterations: int
    base_lr: float
    warmup_iterations: int = 0
    warmup_start_lr: float = 0.0
    horizon: int = 0            # decay horizon (Caffe's lr_iter); 0: the phase's length
    power: float = 1.0
    weight_decay: float = None  # None: keep the previous phase's (the first phase: --weight-decay)
    augment: bool = True        # False: no scale/aspect augmentation (random crop of the resized image + flip)

    def lr(self, i):
        if i < self.warmup_iterations:
            w = self.warmup_iterations
            return ((w - i) * self.warmup_start_lr + i * self.base_lr) / w
        horizon = self.horizon or self.iterations
        return self.base_lr * max(0.0, 1.0 - i / horizon) ** self.power

    def scaled(self, factor):
        """This phase for a global batch `factor` times the reference: LRs times factor, lengths divided by it."""
        def iters(n):
            return max(int(round(n / factor)), 1) if n else 0
        return replace(self, iterations=iters(self.iterations), base_lr=self.base_lr * factor,
                       warmup_iterations=iters(self.warmup_iterations), warmup_start_lr=self.warmup_start_lr * factor,
                       horizon=iters(self.horizon))

    def describe(self):
        parts = [str(self.iterations), f'{self.base_lr:g}']
        if self.warmup_iterations:
            parts.append(f'warmup={self.warmup_iterations}@{self.warmup_start_lr:g}')
        if self.horizon:
            parts.append(f'horizon={self.horizon}')
        if self.power != 1.0:
            parts.append(f'power={self.power:g}')
        if self.weight_decay is not None:
            parts.append(f'wd={self.weight_decay:g}')
        if not self.augment:
            parts.append('noaug')
        return ','.join(parts)


PHASE_FORMAT = 'ITERATIONS,LR[,warmup=ITERATIONS@LR][,horizon=ITERATIONS][,power=P][,wd=W][,noaug]'


def parse_phase(text):
    """A --lr-phases item, e.g. '7800,1.6,warmup=1560@0.1,horizon=18720,wd=5e-5' or '1560,0.143,power=2,noaug'."""
    def bad(why):
        return UsageError(f"--lr-phases: '{text}' {why}; each phase is {PHASE_FORMAT}")
    fields = text.split(',')
    if len(fields) < 2:
        raise bad('needs at least its length in iterations and its LR')
    try:
        values = dict(iterations=int(fields[0]), base_lr=float(fields[1]))
        for field in fields[2:]:
            key, _, value = field.partition('=')
            if key == 'noaug' and not value:
                values['augment'] = False
            elif key == 'warmup' and re.fullmatch(r'\d+@[^@]+', value):
                length, start = value.split('@')
                values.update(warmup_iterations=int(length), warmup_start_lr=float(start))
            elif key == 'horizon':
                values['horizon'] = int(value)
            elif key == 'power':
                values['power'] = float(value)
            elif key == 'wd':
                values['weight_decay'] = float(value)
            else:
                raise bad(f"has an unknown part '{field}'")
    except ValueError:
        raise bad('has a value that is not a number') from None
    phase = Phase(**values)
    if phase.iterations < 1 or phase.base_lr < 0 or phase.warmup_iterations < 0 or phase.horizon < 0:
        raise bad('needs a positive length and non-negative LR, warm-up and horizon')
    if phase.warmup_iterations >= phase.iterations:
        raise bad('has a warm-up as long as the phase or longer')
    if phase.horizon and phase.horizon < phase.iterations:
        raise bad('has a decay horizon shorter than the phase (the LR would reach 0 before it ends)')
    return phase


class Phases:
    """Phases end to end from global iteration 0; after the last one the LR stays at its end value."""

    def __init__(self, phases):
        self.phases = list(phases)
        self.starts = [0]
        for phase in self.phases:
            self.starts.append(self.starts[-1] + phase.iterations)
        self.total = self.starts[-1]

    def index(self, t):
        """The phase global iteration t falls in (the last one past the end)."""
        for i in range(len(self.phases) - 1, -1, -1):
            if t >= self.starts[i]:
                return i
        return 0

    def lr(self, t):
        i = self.index(t)
        return self.phases[i].lr(min(t, self.total) - self.starts[i])

    def weight_decay(self, t, default):
        """The weight decay in force at iteration t: the last one a phase up to t set."""
        value = default
        for phase in self.phases[:self.index(t) + 1]:
            if phase.weight_decay is not None:
                value = phase.weight_decay
        return value


@dataclass(frozen=True)
class ScheduleConfig:
    """The schedule flags (--lr-scheduler and its companions), in the trainer's units."""
    name: str = 'steplr'
    lr: float = 0.1
    weight_decay: float = 1e-4
    epochs: int = 90
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    warmup_method: str = 'linear'
    warmup_decay: float = 0.01
    lr_min: float = 0.0
    power: float = 2.0
    decay_epochs: float = 0.0   # polynomial decay horizon in epochs (0: --epochs)
    phases: tuple = ()          # collapse: Phase items, in iterations at this run's global batch
    peak_epoch: float = 2.0     # cyclic: the epoch the LR peaks at (FFCV's lr_peak_epoch)

    @property
    def per_iteration(self):
        return not (self.name == 'steplr' and not self.warmup_epochs)


def check(config):
    """Refuse schedule flags that cannot work, before any data is read; one line naming the flag."""
    if config.name not in SCHEDULERS:
        raise UsageError(f"--lr-scheduler: unknown schedule '{config.name}'; choose one of {', '.join(SCHEDULERS)}")
    if config.warmup_method not in WARMUP_METHODS:
        raise UsageError(f"--lr-warmup-method: '{config.warmup_method}'; choose linear or constant")
    if config.warmup_epochs < 0 or config.warmup_epochs >= config.epochs:
        raise UsageError(f'--lr-warmup-epochs must be at least 0 and below --epochs {config.epochs}, '
                         f'got {config.warmup_epochs:g}')
    if config.warmup_epochs and not 0 < config.warmup_decay <= 1 and config.name != 'polynomiallr':
        raise UsageError(f'--lr-warmup-decay must be in (0, 1] (the warm-up starts at that fraction of --lr), '
                         f'got {config.warmup_decay:g}; only polynomiallr warms up from 0')
    if config.warmup_epochs and not 0 <= config.warmup_decay <= 1:
        raise UsageError(f'--lr-warmup-decay must be in [0, 1], got {config.warmup_decay:g}')
    if config.name == 'collapse':
        if not config.phases:
            raise UsageError('--lr-scheduler collapse needs --lr-phases (or --recipe lr-collapse-72e)')
        if config.warmup_epochs:
            raise UsageError('--lr-warmup-epochs: the collapse phases carry their own warm-ups; leave it at 0')
    elif config.phases:
        raise UsageError(f'--lr-phases only applies to --lr-scheduler collapse, not {config.name}')
    if config.name == 'cyclic':
        if not 0 < config.peak_epoch <= config.epochs:
            raise UsageError(f'--lr-peak-epoch must be above 0 and at most --epochs {config.epochs}, '
                             f'got {config.peak_epoch:g}')
        if config.warmup_epochs:
            raise UsageError('--lr-warmup-epochs: the cyclic schedule ramps up to --lr-peak-epoch itself; '
                             'leave it at 0')
    if config.name == 'polynomiallr' and config.decay_epochs and config.decay_epochs <= config.warmup_epochs:
        raise UsageError(f'--lr-decay-epochs {config.decay_epochs:g} must be longer than the warm-up '
                         f'({config.warmup_epochs:g} epochs)')
    if config.lr_min < 0 or (config.name != 'collapse' and config.lr_min > config.lr):
        raise UsageError(f'--lr-min must be between 0 and --lr {config.lr:g}, got {config.lr_min:g}')


def _warmup(optimizer, config, iterations):
    from torch.optim import lr_scheduler
    if config.warmup_method == 'constant':
        return lr_scheduler.ConstantLR(optimizer, factor=config.warmup_decay, total_iters=iterations)
    return lr_scheduler.LinearLR(optimizer, start_factor=config.warmup_decay, total_iters=iterations)


def _polynomial_factor(config, warmup, decay):
    """MLPerf's LARS schedule as a factor of --lr: a linear ramp from warmup_decay (0: from 0) over `warmup`
    iterations, then (1 - min(t - warmup, decay) / decay) ** power from 1 down to lr_min / lr."""
    end = config.lr_min / config.lr if config.lr else 0.0
    start = config.warmup_decay

    def factor(t):
        if t < warmup:
            return start + (1.0 - start) * t / warmup if config.warmup_method == 'linear' else start
        done = min(t - warmup, decay) / decay
        return end + (1.0 - end) * (1.0 - done) ** config.power
    return factor


CYCLIC_START = 1e-4  # FFCV's cyclic schedule starts at this fraction of --lr


def _cyclic_epoch_value(x, peak, epochs):
    """FFCV's get_cyclic_lr as a fraction of --lr: np.interp(x, [0, peak, epochs], [1e-4, 1, 0]) (0 from `epochs`
    on, as np.interp gives when the peak is the last epoch)."""
    if x >= epochs:
        return 0.0
    if x <= peak:
        return CYCLIC_START + (1.0 - CYCLIC_START) * x / peak
    return (epochs - x) / (epochs - peak)


def _cyclic_factor(config, iterations_per_epoch):
    """FFCV's cyclic schedule as a factor of --lr at iteration t: linear within each epoch e between the values at
    e and e + 1, as its train_loop's np.interp(arange(iters), [0, iters], [lr(e), lr(e + 1)]).

    Verified (tests/test_cyclic_lr.py): with a whole --lr-peak-epoch (FFCV's own lr_peak_epoch is an int) this is
    the piecewise-linear function evaluated at the fractional epoch t / iterations_per_epoch, since no bend falls
    inside an epoch. With a fractional peak the two differ in the epoch holding it: this follows FFCV's chord
    between the ends of that epoch, so the LR there stays below --lr."""
    def factor(t):
        epoch, i = divmod(t, iterations_per_epoch)
        start = _cyclic_epoch_value(epoch, config.peak_epoch, config.epochs)
        end = _cyclic_epoch_value(epoch + 1, config.peak_epoch, config.epochs)
        return start + (end - start) * i / iterations_per_epoch
    return factor


def build_scheduler(optimizer, config, iterations_per_epoch, global_batch):
    """The torch scheduler of `config`: stepped per epoch for the default StepLR, per iteration otherwise."""
    from torch.optim import lr_scheduler
    if not config.per_iteration:
        return lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    total = config.epochs * iterations_per_epoch
    warmup = int(round(config.warmup_epochs * iterations_per_epoch))
    if config.name == 'collapse':
        phases = Phases(config.phases)
        for group in optimizer.param_groups:
            group['lr'] = 1.0  # the phases carry absolute LRs: LambdaLR multiplies initial_lr by them
        return lr_scheduler.LambdaLR(optimizer, lambda t: phases.lr(t))
    if config.name == 'cyclic':
        return lr_scheduler.LambdaLR(optimizer, _cyclic_factor(config, iterations_per_epoch))
    if config.name == 'polynomiallr':
        horizon = int(round((config.decay_epochs or config.epochs) * iterations_per_epoch))
        return lr_scheduler.LambdaLR(optimizer, _polynomial_factor(config, warmup, max(horizon - warmup + 1, 1)))
    if config.name == 'cosineannealinglr':
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=config.lr_min)
    else:
        main = lr_scheduler.StepLR(optimizer, step_size=max(config.step_size * iterations_per_epoch, 1),
                                   gamma=config.gamma)
    if not warmup:
        return main
    return lr_scheduler.SequentialLR(optimizer, [_warmup(optimizer, config, warmup), main], milestones=[warmup])


class Schedule:
    """A schedule and where it stands: `iteration` counts optimizer steps from the start of training.

    Collapse phases also act on the optimizer when one begins: momentum buffers zeroed (the recipe restarted
    Caffe from the previous phase's weights alone) and the phase's weight decay set on the decayed groups (those
    with --weight-decay; the no-decay groups stay at 0).
    """

    def __init__(self, optimizer, config, iterations_per_epoch, global_batch):
        self.optimizer = optimizer
        self.config = config
        self.iterations_per_epoch = max(iterations_per_epoch, 1)
        self.global_batch = global_batch
        self.decayed_groups = [i for i, group in enumerate(optimizer.param_groups)
                               if group.get('weight_decay', 0) == config.weight_decay and config.weight_decay]
        self.phases = Phases(config.phases) if config.name == 'collapse' else None
        self.iteration = 0
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)  # the schedulers' "step before optimizer.step" notes
            self.scheduler = build_scheduler(optimizer, config, self.iterations_per_epoch, global_batch)
        self._enter_phase(0)

    @property
    def per_iteration(self):
        return self.config.per_iteration

    def overrun_note(self):
        """A line when --epochs runs past the end of the phases (their last LR, 0 for a decay to the horizon,
        holds for the rest), else None."""
        if self.phases is None or self.phases.total >= self.config.epochs * self.iterations_per_epoch:
            return None
        end = self.phases.total / self.iterations_per_epoch
        return (f'note: the --lr-phases end at iteration {self.phases.total} (epoch {end:.2f}); the rest of the '
                f'{self.config.epochs} epochs trains at their last LR, {self.phases.lr(self.phases.total):g}')

    def lr(self):
        return self.optimizer.param_groups[0]['lr']

    def after_step(self):
        if not self.per_iteration:
            return
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            self.scheduler.step()
        self.iteration += 1
        if self.phases is not None and self.iteration in self.phases.starts[1:-1]:
            self._enter_phase(self.iteration, reset_momentum=True)

    def after_epoch(self):
        if not self.per_iteration:
            self.scheduler.step()

    def augments(self, epoch):
        """Whether epoch `epoch` trains with scale/aspect augmentation: off from the first epoch that starts
        inside a noaug phase (the loaders' workers take the setting per epoch)."""
        if self.phases is None:
            return True
        return self.phases.phases[self.phases.index(epoch * self.iterations_per_epoch)].augment

    def _enter_phase(self, t, reset_momentum=False):
        if self.phases is None:
            return
        weight_decay = self.phases.weight_decay(t, self.config.weight_decay)
        for i in self.decayed_groups:
            self.optimizer.param_groups[i]['weight_decay'] = weight_decay
        if reset_momentum:
            for state in self.optimizer.state.values():
                buf = state.get('momentum_buffer')
                if buf is not None:
                    buf.zero_()  # in place: the same as a fresh buffer, in the device's layout

    def state_dict(self):
        """Where the schedule stands, beside the torch scheduler's own state (saved as 'lr_scheduler', the key
        torchvision's checkpoints use)."""
        return {'iteration': self.iteration, 'iterations_per_epoch': self.iterations_per_epoch,
                'global_batch': self.global_batch, 'name': self.config.name}

    def resume(self, scheduler_state, saved, epoch, position):
        """Continue from a checkpoint: `scheduler_state` the torch scheduler's, `saved` this state_dict (None in
        checkpoints of the 1.4.0 format), resuming at `epoch`, `position` samples into it. When the run's global
        batch or epoch length changed, the saved counter means something else, so the schedule is rebuilt and
        advanced to where the resumed run stands in this run's iterations. Returns a line to print, or None."""
        iteration = epoch * self.iterations_per_epoch + position // self.global_batch
        if not self.per_iteration:
            if scheduler_state is not None:
                self.scheduler.load_state_dict(scheduler_state)
            return None
        same = (saved is not None and saved.get('name') == self.config.name and scheduler_state is not None
                and saved.get('global_batch') == self.global_batch
                and saved.get('iterations_per_epoch') == self.iterations_per_epoch)
        if same:
            self.scheduler.load_state_dict(scheduler_state)
            self.iteration = saved['iteration']
            return None
        self.advance_to(iteration)
        if saved is None:
            return f'Schedule: the checkpoint has no per-iteration schedule; {self.config.name} starts at iteration ' \
                   f'{iteration}'
        return (f'Schedule: the checkpoint\'s ran at global batch {saved.get("global_batch")} with '
                f'{saved.get("iterations_per_epoch")} iterations per epoch, this run at {self.global_batch} with '
                f'{self.iterations_per_epoch}: rebuilt and advanced to iteration {iteration}')

    def advance_to(self, iteration):
        """Step the scheduler to `iteration` without training (a resume in another geometry)."""
        if not self.per_iteration:
            return
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)
            for _ in range(iteration - self.iteration):
                self.scheduler.step()
        self.iteration = iteration
        self._enter_phase(iteration)


def iterations_per_epoch(dataset_size, world_size, batch_size, num_train_steps):
    """Optimizer steps per epoch: this rank's batches (samplers.train_batches of its share), at most
    --num-train-steps."""
    from . import samplers
    share = math.ceil(dataset_size / world_size)
    return max(min(samplers.train_batches(share, batch_size), num_train_steps), 1)


def _simulated(config, ipe, global_batch):
    """A Schedule over one dummy parameter, to read the LR and weight decay it gives at every iteration."""
    import torch
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    return Schedule(optimizer, config, ipe, global_batch)


def _row(t, ipe, schedule, note=''):
    group = schedule.optimizer.param_groups[0]
    augment = 'on' if schedule.augments(t // ipe) else 'off'
    return (f'iteration {t:>7d}  epoch {t / ipe:8.3f}  lr {group["lr"]:.9g}  wd {group["weight_decay"]:g}  '
            f'augmentation {augment}{note}')


def schedule_lines(config, ipe, global_batch):
    """--print-schedule: the LR and weight decay at the first iteration of every epoch, and around every phase
    boundary and warm-up end iteration by iteration, with momentum resets and the augmentation state."""
    schedule = _simulated(config, ipe, global_batch)
    total = config.epochs * ipe
    marks = {}
    if schedule.phases is not None:
        for start, phase in zip(schedule.phases.starts, schedule.phases.phases):
            for t in (start - 1, start, start + phase.warmup_iterations - 1, start + phase.warmup_iterations):
                marks[t] = ''
            marks[start] = '  (phase start: momentum reset)' if start else '  (phase start)'
        marks[schedule.phases.total - 1] = '  (last iteration of the phases)'
    elif config.per_iteration and config.warmup_epochs:
        warmup = int(round(config.warmup_epochs * ipe))
        marks.update({warmup - 1: '  (last warm-up iteration)', warmup: ''})
    elif config.name == 'cyclic':
        peak = int(round(config.peak_epoch * ipe))
        marks.update({peak - 1: '', peak: '  (--lr-peak-epoch)', peak + 1: '', total - 1: '  (last iteration)'})
    lines = [f'Schedule {config.name}: {config.epochs} epochs x {ipe} iterations at global batch {global_batch}'
             + (', stepped per iteration' if config.per_iteration else ', stepped per epoch (StepLR)')]
    if schedule.phases is not None:
        lines.append('Phases at this batch: ' + ' '.join(p.describe() for p in schedule.phases.phases))
    if schedule.overrun_note():
        lines.append(schedule.overrun_note())
    for t in range(total):
        if t in marks or t % ipe == 0:
            lines.append(_row(t, ipe, schedule, marks.get(t, '')))
        if config.per_iteration:
            schedule.after_step()
        elif (t + 1) % ipe == 0:
            schedule.after_epoch()
    return lines
