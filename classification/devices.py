"""The device layer: everything that differs between Gaudi (hpu), CUDA and the CPU lives here.

The trainers call the same hooks on every device (`mark_step`, `autocast`, `make_optimizer`, ...);
on CPU and CUDA most hooks are plain PyTorch or no-ops, on HPU they drive Habana's bridge, which is
imported only when `--device hpu` is asked for, so the trainers run on machines without it.
"""
import contextlib
import inspect
import os
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import distributed
from .cli import UsageError


@dataclass
class HmpConfig:
    """Habana mixed precision: ops in the bf16 list run in bfloat16, ops in the fp32 list in float32."""
    bf16_path: str
    fp32_path: str
    opt_level: str = 'O1'
    verbose: bool = False


@dataclass(frozen=True)
class DeviceSettings:
    """The run's device choices, as one value: --device (`kind`), --channels-last, --hmp and its op lists
    (HmpConfig or None), Habana's lazy mode, the CUDA device of a single-process run (`index`; a launcher's
    local rank overrides it), --compile, --amp's dtype (`amp_dtype`: torch.float16, torch.bfloat16 or None),
    --tf32 (CUDA) and --deterministic (train.py) / --seed (main.py): repeatable kernels."""
    kind: str = 'cpu'
    channels_last: bool = True
    hmp: HmpConfig = None
    lazy_mode: bool = True
    index: int = 0
    compile: bool = False
    amp_dtype: torch.dtype = None
    tf32: bool = True
    deterministic: bool = False


class LoaderPlacement(NamedTuple):
    """What the input pipelines take from the device layer: where batches go, whether host memory is pinned
    for them, how loader workers start, and the memory format the model takes its images in (the CUDA
    prefetcher lays batches out so, prefetch.py; to_device's own contiguous() is then a no-op)."""
    device: torch.device
    pin_memory: bool
    worker_start_method: str
    memory_format: torch.memory_format = torch.contiguous_format


# Where a lazy-mode graph is cut (htcore.mark_step) in train.py 1.4.0, as a function of the run.
def reference_mark_points(model_name, distributed):
    points = {'eval_input'}
    if model_name in ('resnext101_32x4d', 'resnet152'):
        points.add('before_forward')
    if 'mobilenet_v2' in model_name and not distributed:
        points.add('before_backward')
    if not distributed:
        points.update({'after_backward', 'after_step'})
    return frozenset(points)


# ... and in the GoogLeNet trainer (main.py), whatever the run.
EXAMPLES_MARK_POINTS = frozenset({'before_forward', 'after_backward', 'after_step', 'eval_input'})


def no_buffer_broadcast():
    """DDP option that stops rank 0's buffers being re-broadcast at every forward (a cost the original
    avoided); torch 2.14 renamed it, Habana's torch 1.10 knows only the old name."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {'forward_sync_buffers': False} if 'forward_sync_buffers' in params else {'broadcast_buffers': False}


def ddp_bucket_cap_mb(model_name):
    """Gradient bucket size meant by the original (its precedence bug made it always 200)."""
    return 200 if model_name in ('resnet152', 'resnext101_32x4d', 'resnext101_32x8d') else 100


class CPUDevice:
    kind = 'cpu'
    collective_backend = 'gloo'
    # Habana's port copies the logits to the CPU for top-k; elsewhere top-k runs where the logits are.
    accuracy_on_device = True
    generator_kinds = ('cpu',)  # the random generators rng_state() saves
    # Loader workers are forked from a clean single-threaded server process: a plain fork of a trainer
    # that already runs gloo/NCCL and OpenMP threads can deadlock in the child (seen: a validation
    # worker hung inside fork under mpirun).
    worker_start_method = 'forkserver'

    def __init__(self, channels_last=True, hmp=None, lazy_mode=True, amp_dtype=None):
        self.lazy_mode = lazy_mode
        self.channels_last = channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mark_points = frozenset()
        self.precision = self._start_precision(hmp)
        self.amp_dtype = amp_dtype
        # --amp float16 scales the loss so that small gradients survive in float16; bfloat16 needs no scaling.
        self.scaler = torch.amp.GradScaler(self.torch_device.type) if amp_dtype == torch.float16 else None

    @property
    def torch_device(self):
        return torch.device('cpu')

    @property
    def collective_device(self):
        """Where tensors for all_reduce of metrics must live for this device's backend."""
        return self.torch_device

    def name(self):
        """What runs the steps, in words, for the metrics file: the CPU model here."""
        from . import mixed_precision
        return mixed_precision.cpu_model()

    def _start_precision(self, hmp):
        """Return the context that applies --hmp around forward and loss (None without --hmp)."""
        if hmp is None:
            return None
        from . import mixed_precision
        precision = mixed_precision.from_op_files(hmp.bf16_path, hmp.fp32_path)
        self._warn_if_bf16_is_slow()
        return precision

    def _warn_if_bf16_is_slow(self):
        """Without native bf16, --hmp makes a CPU step slower than fp32 (without oneDNN bf16 kernels several
        times): say so and go on, as the user asked for bf16 and it is slow, not wrong. Once per host: ranks
        are not known yet."""
        from . import mixed_precision
        warning = mixed_precision.slow_bf16_warning(mixed_precision.cpu_bf16_support())
        if warning and distributed.discover_ranks()[2] == 0:
            print(warning, file=sys.stderr, flush=True)

    def init_distributed(self, local_rank):
        """Prepare this process, the `local_rank`-th of its host, for the collective backend; return the
        backend's name."""
        return self.collective_backend

    def mark_step(self, point):
        """Cut the lazy graph at a named point of the step (HPU lazy mode only)."""

    def synchronize(self):
        """Wait until the device has finished the work queued so far (timing). CPU ops run synchronously."""

    synchronize_means = 'ops are synchronous, nothing to wait for'  # what synchronize() does, for reports

    # Why --compile cannot run on this device (None: it can).
    compile_refusal = None

    def compile(self, model):
        """torch.compile(model) (the default inductor backend), one graph per input shape: a new batch size
        compiles again instead of switching every shape to a dynamic graph."""
        return torch.compile(model, dynamic=False)

    def autocast(self):
        """Context for forward and loss: torch.autocast with --amp, the op-list mixed precision with --hmp."""
        if self.amp_dtype is not None:
            return torch.autocast(self.torch_device.type, dtype=self.amp_dtype)
        return self.precision if self.precision is not None else contextlib.nullcontext()

    def precision_settings(self):
        """What decides the arithmetic of this run, for the metrics header: --amp's dtype, --hmp, and on CUDA
        TF32 and the deterministic kernels."""
        amp = str(self.amp_dtype).replace('torch.', '') if self.amp_dtype is not None else None
        return {'amp': amp, 'loss_scaling': self.scaler is not None, 'hmp': self.precision is not None}

    def read_scalars(self, tensors):
        """The values of 0-d tensors as Python floats, in one device-to-host transfer (a logged step's loss,
        accuracies and the finite check together: one wait for the device instead of one per value)."""
        if not tensors:
            return []
        return torch.stack([t.detach().reshape(()).to(torch.float64) for t in tensors]).tolist()

    def optimizer_step_context(self):
        return contextlib.nullcontext()

    def prepare_model(self, model):
        return model.to(self.torch_device, memory_format=self.memory_format)

    def prepare_eval_model(self, model):
        """A model that only predicts (inference.py), weights loaded: on the device, in the layout training gives
        it (on hpu with channels-last, filters-last weights as after_optimizer_created makes them), in eval mode."""
        model = self.prepare_model(model)
        self.after_optimizer_created(model, None)
        return model.eval()

    def make_optimizer(self, params, lr, momentum, weight_decay, kind='sgd', nesterov=False, trust_coefficient=0.001):
        """SGD (fused, except under a loss scaler) or LARS over `params` (parameter groups)."""
        if kind == 'lars':
            from . import optimizers
            return optimizers.LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                   trust_coefficient=trust_coefficient, nesterov=nesterov)
        # Fused SGD advances its momentum on a step the float16 loss scaler skips (torch 2.11-2.14: it handles
        # the overflow itself and the buffer takes the inf gradients), so the weights blow up one step later.
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                               fused=self.scaler is None)

    def after_optimizer_created(self, model, optimizer):
        """Last layout changes once model and optimizer exist (HPU weight permutation)."""

    def ddp_kwargs(self, model_name, bucket_cap_mb=None, habana_bucket_cap_mb=None):
        """DDP's options: torch's gradient bucket size (25 MB, all-reduced while the backward goes on) unless
        --bucket-cap-mb (`bucket_cap_mb`) sets one; `habana_bucket_cap_mb`, a trainer's Habana value, counts on
        hpu only."""
        buckets = {'bucket_cap_mb': bucket_cap_mb} if bucket_cap_mb else {}
        return dict(buckets, gradient_as_bucket_view=True, **no_buffer_broadcast())

    def to_device(self, image, target):
        """Copy a batch to the device (a no-op for the FAST loader's, already there) and lay the images out as
        the model wants."""
        image = image.to(self.torch_device, non_blocking=True)
        target = target.to(self.torch_device, non_blocking=True)
        return image.contiguous(memory_format=self.memory_format), target

    @contextlib.contextmanager
    def checkpoint_state(self, model, optimizer):
        """Yield (model state, optimizer state) in torchvision's layout, ready to save: on the host, so that
        torch.load(path, weights_only=True) reads the file on a machine without this device."""
        yield state_to_cpu(model.state_dict()), state_to_cpu(optimizer.state_dict())

    def load_training_state(self, model, optimizer, model_state, optimizer_state):
        model.load_state_dict(model_state)
        if optimizer is not None and optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)

    def module_state(self, module):
        """A module's state in torchvision's layout, on the host, ready to save (the EMA model)."""
        return state_to_cpu(module.state_dict())

    def load_module_state(self, module, state):
        module.load_state_dict(state)

    def pin_memory(self):
        return False

    def loader_placement(self):
        """The input pipelines' LoaderPlacement on this device (after init_distributed: it picks the GPU)."""
        return LoaderPlacement(self.torch_device, self.pin_memory(), self.worker_start_method, self.memory_format)

    def rng_state(self):
        """The random generators' state (dropout, mixup/cutmix), saved so that a run resumed mid-epoch repeats:
        {generator kind: ByteTensor on the host}."""
        return {'cpu': torch.get_rng_state()}

    def _set_generator_state(self, kind, state):
        """Restore the generator `kind` ('cpu', 'cuda', ...) of this device; False when it has none."""
        if kind != 'cpu':
            return False
        torch.set_rng_state(state)
        return True

    def set_rng_state(self, state):
        """Restore the generators `state` (rng_state() of a run on any device kind) has and this device uses;
        one `note:` line names what could not be restored (a checkpoint of another device kind)."""
        state = state or {}
        restored = {kind for kind, value in state.items() if self._set_generator_state(kind, value)}
        note = rng_restore_note(self.kind, set(state), restored, set(self.generator_kinds))
        if note:
            print(note)


class CUDADevice(CPUDevice):
    kind = 'cuda'
    collective_backend = 'nccl'
    generator_kinds = ('cpu', 'cuda')

    def __init__(self, channels_last=True, hmp=None, lazy_mode=True, index=0, amp_dtype=None, tf32=True):
        if not torch.cuda.is_available():
            raise UsageError('--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False); '
                             'check the driver and CUDA_VISIBLE_DEVICES, or use --device cpu')
        if not 0 <= index < torch.cuda.device_count():
            raise UsageError(f'--gpu {index}: this machine has {torch.cuda.device_count()} CUDA device(s)')
        self.index = index
        # cuDNN's autotuner picks the fastest kernels, not repeatable ones: off when determinism.enable ran.
        torch.backends.cudnn.benchmark = not torch.backends.cudnn.deterministic
        self.tf32 = tf32
        set_tf32(tf32)
        super().__init__(channels_last, hmp, lazy_mode, amp_dtype)

    @property
    def torch_device(self):
        return torch.device('cuda', self.index)

    def _warn_if_bf16_is_slow(self):
        """bf16 runs on the GPU: the CPU's bf16 support does not matter."""

    def synchronize(self):
        torch.cuda.synchronize(self.index)

    synchronize_means = 'torch.cuda.synchronize()'

    def name(self):
        return torch.cuda.get_device_name(self.index)

    def init_distributed(self, local_rank):
        self.index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(self.index)
        return self.collective_backend

    def ddp_kwargs(self, model_name):
        return dict(super().ddp_kwargs(model_name), device_ids=[self.index])

    def pin_memory(self):
        return True

    def precision_settings(self):
        return dict(super().precision_settings(), tf32=self.tf32, cudnn_benchmark=torch.backends.cudnn.benchmark,
                    deterministic=torch.are_deterministic_algorithms_enabled())

    def rng_state(self):
        return dict(super().rng_state(), cuda=torch.cuda.get_rng_state(self.index))

    def _set_generator_state(self, kind, state):
        if kind != 'cuda':
            return super()._set_generator_state(kind, state)
        torch.cuda.set_rng_state(state, self.index)
        return True


class HPUDevice(CPUDevice):
    """Gaudi through Habana's PyTorch bridge (SynapseAI 1.4-era API: htcore, hpex.hmp, FusedSGD, hccl)."""
    kind = 'hpu'
    collective_backend = 'hccl'
    worker_start_method = 'spawn'  # forked loader workers do not work with the Synapse runtime
    accuracy_on_device = False

    def __init__(self, channels_last=True, hmp=None, lazy_mode=True, amp_dtype=None):
        self.htcore = self._load_bridge(lazy_mode)
        self.hmp = None
        super().__init__(channels_last, hmp, lazy_mode, amp_dtype)

    def read_scalars(self, tensors):
        """One read per value, as Habana's port does (.item() each; the copies are its own)."""
        return [t.item() for t in tensors]

    @staticmethod
    def _load_bridge(lazy_mode):
        # Read by the bridge when it loads, so they must be set before the import.
        os.environ['PT_HPU_LAZY_MODE'] = '1' if lazy_mode else '2'
        for name, value in (('MAX_WAIT_ATTEMPTS', '50'), ('HCL_CPU_AFFINITY', '1'),
                            ('PT_HPU_ENABLE_SYNC_OUTPUT_HOST', 'false')):
            os.environ.setdefault(name, value)
        try:
            import habana_frameworks.torch.core as htcore
        except ImportError as err:
            raise UsageError('--device hpu: the Habana PyTorch bridge (habana_frameworks.torch) is not '
                             f'installed ({err}); it comes with Habana\'s SynapseAI container. '
                             'Use --device cuda or --device cpu on other machines') from None
        try:
            from habana_frameworks.torch.utils.library_loader import load_habana_module
        except ImportError:  # removed from the bridge after SynapseAI 1.4
            load_habana_module = None
        if load_habana_module is not None:
            load_habana_module()
        return htcore

    def _start_precision(self, hmp):
        """hmp.convert() applies to the whole process, so no context is needed around forward."""
        if hmp is None:
            return None
        from . import mixed_precision
        # Same checks as on CPU/CUDA, so a typo fails before the bridge reads the files.
        for path, flag in ((hmp.bf16_path, '--hmp-bf16'), (hmp.fp32_path, '--hmp-fp32')):
            mixed_precision.resolve_ops(mixed_precision.read_op_list(path, flag), flag, path)
        from habana_frameworks.torch.hpex import hmp as habana_hmp
        habana_hmp.convert(opt_level=hmp.opt_level, bf16_file_path=hmp.bf16_path,
                           fp32_file_path=hmp.fp32_path, isVerbose=hmp.verbose)
        self.hmp = habana_hmp
        return None

    @property
    def torch_device(self):
        return torch.device('hpu')

    def name(self):
        return 'hpu'

    def init_distributed(self, local_rank):
        os.environ['ID'] = str(local_rank)
        os.environ['LOCAL_RANK'] = str(local_rank)
        import habana_frameworks.torch.core.hccl  # noqa: F401  (registers the hccl backend)
        torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 200 * 1024 * 1024
        return self.collective_backend

    def mark_step(self, point):
        if self.lazy_mode and point in self.mark_points:
            self.htcore.mark_step()

    compile_refusal = ("--compile: on hpu, Habana's lazy mode is the graph compiler (--run-lazy-mode True, "
                       "main.py --enable-lazy); torch.compile(backend='hpu_backend') needs SynapseAI 1.12+, which this "
                       'port does not target: leave out --compile')

    synchronize_means = 'htcore.mark_step() and hpu.synchronize()'

    def synchronize(self):
        """Run the queued lazy graph and wait for it (the bridge's hpu.synchronize where it has one)."""
        self.htcore.mark_step()
        try:
            import habana_frameworks.torch.hpu as hthpu
        except ImportError:
            return
        hthpu.synchronize()

    def optimizer_step_context(self):
        return self.hmp.disable_casts() if self.hmp is not None else contextlib.nullcontext()

    def prepare_model(self, model):
        if self.channels_last:
            print('Converting model params to channels_last format on Habana')
        return model.to(self.torch_device)

    def make_optimizer(self, params, lr, momentum, weight_decay, kind='sgd', nesterov=False, trust_coefficient=0.001):
        """Lazy mode: Habana's FusedSGD, or for LARS its FusedLars over FusedResourceApplyMomentum as Habana's
        1.7+ train.py builds it (one group and a per-parameter mask: True where LARS scales). Eager: torch's SGD
        and optimizers.LARS."""
        if not self.lazy_mode:
            if kind == 'lars':
                return super().make_optimizer(params, lr, momentum, weight_decay, kind, nesterov, trust_coefficient)
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        from habana_frameworks.torch.hpex import optimizers as hpex_optimizers
        extra = {'nesterov': True} if nesterov else {}
        if kind != 'lars':
            return hpex_optimizers.FusedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **extra)
        from . import optimizers
        if nesterov:
            raise UsageError('--nesterov: Habana\'s fused LARS has no Nesterov momentum; drop it or use '
                             '--run-lazy-mode False (this port\'s LARS)')
        group = optimizers.single_group(params)
        momentum_optimizer = hpex_optimizers.FusedResourceApplyMomentum(
            [{'params': group[0]['params']}], lr=lr, momentum=momentum, weight_decay=group[0]['weight_decay'])
        return hpex_optimizers.FusedLars(momentum_optimizer, optimizers.lars_skip_mask(params),
                                         eeta=trust_coefficient, eps=0.0)

    def _permutes_weights(self):
        return self.channels_last and not self.htcore.is_enabled_weight_permute_pass()

    def _permute(self, model, optimizer, to_filters_last):
        if not self._permutes_weights():
            return
        permute_params(model, to_filters_last)
        self.htcore.mark_step()
        if optimizer is not None:
            permute_momentum(optimizer, to_filters_last)
            self.htcore.mark_step()

    def after_optimizer_created(self, model, optimizer):
        self._permute(model, optimizer, to_filters_last=True)

    def ddp_kwargs(self, model_name, bucket_cap_mb=None, habana_bucket_cap_mb=None):
        """Habana's buckets, chosen for HCCL: the trainer's value, else train.py's per model."""
        return dict(bucket_cap_mb=bucket_cap_mb or habana_bucket_cap_mb or ddp_bucket_cap_mb(model_name),
                    gradient_as_bucket_view=model_name in ('mobilenet_v2', 'resnet152'), **no_buffer_broadcast())

    @contextlib.contextmanager
    def checkpoint_state(self, model, optimizer):
        self._permute(model, optimizer, to_filters_last=False)
        try:
            model_state = state_to_cpu(model.state_dict())
            optimizer_state = state_to_cpu(optimizer.state_dict())
        finally:
            self._permute(model, optimizer, to_filters_last=True)
        yield model_state, optimizer_state

    def load_training_state(self, model, optimizer, model_state, optimizer_state):
        self._permute(model, optimizer, to_filters_last=False)
        super().load_training_state(model, optimizer, model_state, optimizer_state)
        self._permute(model, optimizer, to_filters_last=True)

    def module_state(self, module):
        """On the host, conv weights back in KCRS when this run permutes them (the EMA copies the permuted model)."""
        state = module.state_dict()
        order = RSCK_TO_KCRS if self._permutes_weights() else None
        return {k: (v.permute(order) if order and v.ndim == 4 else v).detach().to('cpu').contiguous()
                for k, v in state.items()}

    def load_module_state(self, module, state):
        order = KCRS_TO_RSCK if self._permutes_weights() else None
        module.load_state_dict({k: (v.permute(order).contiguous() if order and v.ndim == 4 else v)
                                for k, v in state.items()})

    def pin_memory(self):
        return True


# Habana's convolution kernels want filters-last (RSCK) weights; checkpoints and torchvision use KCRS.
KCRS_TO_RSCK = (2, 3, 1, 0)
RSCK_TO_KCRS = (3, 2, 0, 1)


def permute_params(model, to_filters_last):
    """Permute every 4-D parameter (the conv weights) and 4-D buffer (a fixed filter: blurpool.BlurPool2d's) between
    KCRS and RSCK, in place: every 4-D tensor of the model's state, as module_state and load_module_state take them."""
    order = KCRS_TO_RSCK if to_filters_last else RSCK_TO_KCRS
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 4:
                param.data = param.data.permute(order).contiguous()
        for module in model.modules():
            for name, buffer in list(module._buffers.items()):
                if buffer is not None and buffer.ndim == 4:
                    module._buffers[name] = buffer.permute(order).contiguous()


def permute_momentum(optimizer, to_filters_last):
    """Permute every 4-D momentum buffer the same way as the weights it belongs to."""
    order = KCRS_TO_RSCK if to_filters_last else RSCK_TO_KCRS
    with torch.no_grad():
        for state in optimizer.state.values():
            buf = state.get('momentum_buffer')
            if buf is not None and buf.ndim == 4:
                state['momentum_buffer'] = buf.permute(order).contiguous()


def state_to_cpu(obj):
    """A state_dict (nested dicts and lists) with every tensor on the host (tensors already there unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to('cpu')
    if isinstance(obj, dict):
        return {k: state_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [state_to_cpu(v) for v in obj]
    return obj


def rng_restore_note(device_kind, saved, restored, used):
    """The `note:` line of a mid-epoch resume whose random states do not match this device: the `saved`
    generator kinds not restored (written on another device kind) and the `used` ones the checkpoint lacks
    (they go on from the run's seed, so dropout and the batch mixes draw other numbers than the uninterrupted
    run); None when every state was restored."""
    unused, missing = sorted(saved - restored), sorted(used - saved)
    parts = []
    if unused:
        parts.append(f"its {', '.join(unused)} random state is not used on --device {device_kind}")
    if missing:
        parts.append(f"it has no {', '.join(missing)} random state (written on another device kind): that "
                     'generator goes on from the seed, so random draws on it differ from the uninterrupted run')
    return 'note: --resume: the checkpoint comes from another device kind; ' + '; '.join(parts) if parts else None


def set_tf32(enabled):
    """--tf32: float32 matmuls and cuDNN convolutions in TF32 on Ampere and later GPUs (NVIDIA's
    DeepLearningExamples train their fp32 rows so; torch alone leaves matmuls in full float32)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


DEVICES = {'cpu': CPUDevice, 'cuda': CUDADevice, 'hpu': HPUDevice}


def create(kind, channels_last=True, hmp=None, lazy_mode=True, index=0, amp_dtype=None, tf32=True):
    """The device object for `--device kind`; fails with one clear line if it cannot run here.

    `index` picks the CUDA device of a single-process run (a launcher's local rank overrides it); `tf32`
    (--tf32) counts on CUDA only.
    """
    if kind not in DEVICES:
        raise UsageError(f"--device: unknown device '{kind}'; choose hpu, cuda or cpu")
    extra = {'index': index, 'tf32': tf32} if kind == 'cuda' else {}
    return DEVICES[kind](channels_last=channels_last, hmp=hmp, lazy_mode=lazy_mode, amp_dtype=amp_dtype, **extra)
