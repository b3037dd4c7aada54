"""What the trainers optimise with: LARS, and the parameter groups that weight decay and LARS see.

`LARS` is the layer-wise adaptive rate scaling that every fast MLPerf ResNet-50 result trains with
(TF `MLPERF_LARSOptimizer`, MXNet `SGDwFASTLARS`, Habana `FusedLars`), written in plain PyTorch so it runs
on CPU, CUDA and HPU tensors alike. `param_groups` splits a model's parameters as torchvision's references
`utils.set_weight_decay` does (--norm-weight-decay, --bias-weight-decay), and, for LARS, into the
parameters LARS scales and the normalisation-layer parameters and biases it skips. `lars_skip_mask` and
`single_group` give the same split in the shape Habana's FusedLars takes; `describe` is the start-up line.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn

# The layers torchvision's set_weight_decay counts as normalisation (norm_classes' default).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
               nn.LocalResponseNorm)


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer flags as one value: --lr, --momentum, --weight-decay, --optimizer (`kind`: sgd or lars),
    --nesterov, --norm-weight-decay, --bias-weight-decay (None: as --weight-decay) and LARS's trust coefficient."""
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    kind: str = 'sgd'
    nesterov: bool = False
    norm_weight_decay: float = None
    bias_weight_decay: float = None
    trust_coefficient: float = 0.001


# --- LARS -------------------------------------------------------------------------------------------------------

def _check_options(options):
    """ValueError naming the first option out of range (for the defaults and for every group)."""
    for name, minimum, strict in (('lr', 0.0, False), ('momentum', 0.0, False), ('weight_decay', 0.0, False),
                                  ('trust_coefficient', 0.0, True), ('eps', 0.0, False)):
        value = options[name]
        if value < minimum or (strict and value == minimum):
            raise ValueError(f"LARS: {name} must be {'>' if strict else '>='} {minimum:g}, got {value}")
    if options['nesterov'] and options['momentum'] <= 0:
        raise ValueError('LARS: nesterov needs a momentum > 0')


def trust_ratio(weight, grad, weight_decay, trust_coefficient, eps):
    """trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps), or 1 where either norm is 0 (a
    zero-initialised weight, or a weight with no gradient this step, takes the plain LR instead of none or
    NaN). A 0-dim tensor on the parameter's device: no host round trip per parameter."""
    w_norm = torch.linalg.vector_norm(weight)
    g_norm = torch.linalg.vector_norm(grad)
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


class LARS(torch.optim.Optimizer):
    """Momentum SGD with layer-wise adaptive rate scaling, as MLPerf's `MLPERF_LARSOptimizer`.

    For a parameter w with gradient g in a group with lars=True (the default):

        trust     = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)   if ||w|| > 0 and ||g|| > 0
                    1                                                                  otherwise
        update    = g + weight_decay * w
        scaled_lr = lr * trust

    and in a group with lars=False (normalisation-layer weights and biases, and other biases: MLPerf and
    Habana "skip scaling and decay" for them, whatever the group's weight_decay says):

        update    = g
        scaled_lr = lr

    then momentum, with the LR inside the velocity (as TF's and Habana's, not as torch.optim.SGD's):

        v = momentum * v + scaled_lr * update              (v = 0 before the first step)
        w = w - v                                          nesterov: w = w - (momentum * v + scaled_lr * update)

    v lives in state[p]['momentum_buffer'], the key torch.optim.SGD uses, so code that resets momentum by
    deleting or zeroing it works for both. Because the LR is inside v, a lars=False group matches SGD(momentum,
    dampening=0, weight_decay=0) while the LR stays constant, and differs (as MLPerf's does) when it changes;
    for the same reason an SGD checkpoint's buffers are not LARS velocities.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=0.0,
                 nesterov=False):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, lars=True)
        _check_options(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        _check_options(self.param_groups[-1])

    def __setstate__(self, state):
        # Groups saved without an option (an older checkpoint) take the default, as torch's optimizers do.
        super().__setstate__(state)
        for group in self.param_groups:
            for name in ('nesterov', 'lars', 'trust_coefficient', 'eps'):
                group.setdefault(name, self.defaults[name])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError('LARS does not support sparse gradients (use torch.optim.SGD for '
                                       'sparse embeddings)')
                _momentum_step(p, self._scaled_update(p, group), self.state[p], group['momentum'],
                               group['nesterov'])
        return loss

    @staticmethod
    def _scaled_update(p, group):
        """scaled_lr * update, a new tensor."""
        if not group['lars']:
            return p.grad.mul(group['lr'])
        weight_decay = group['weight_decay']
        trust = trust_ratio(p, p.grad, weight_decay, group['trust_coefficient'], group['eps'])
        return p.grad.add(p, alpha=weight_decay).mul_(group['lr'] * trust)


def _momentum_step(p, scaled_update, state, momentum, nesterov):
    """v = momentum * v + scaled_update; w -= v (nesterov: w -= momentum * v + scaled_update). An absent (or
    None) buffer is v = 0, so the first step is scaled_update itself."""
    buf = state.get('momentum_buffer')
    if buf is None:
        buf = state['momentum_buffer'] = scaled_update.clone()
    else:
        buf.mul_(momentum).add_(scaled_update)
    p.sub_(scaled_update.add_(buf, alpha=momentum) if nesterov else buf)


# --- Parameter groups ---------------------------------------------------------------------------------------------

def _kind(module, local_name, norm_weight_decay, bias_weight_decay, lars):
    """'bias', 'norm' or 'other' for one parameter, with torchvision's precedence: a parameter named bias goes
    to the bias group when bias_weight_decay is given (a BatchNorm bias too), a normalisation layer's to the
    norm group when norm_weight_decay is given. With lars both are asked: LARS skips them whatever was given."""
    if local_name == 'bias' and (bias_weight_decay is not None or lars):
        return 'bias'
    if isinstance(module, NORM_LAYERS) and (norm_weight_decay is not None or lars):
        return 'norm'
    return 'other'


def param_groups(model, weight_decay, norm_weight_decay=None, bias_weight_decay=None, lars=False):
    """The model's trainable parameters, each once and in model order within a group, as optimizer groups
    {'params', 'weight_decay', 'names'} (and 'lars' with lars=True); empty groups are left out.

    Without norm/bias decay and without lars: one group of all parameters, so the optimizer is today's
    SGD over model.parameters(). Otherwise torchvision's groups, in its order: the rest at weight_decay, the
    normalisation layers' at norm_weight_decay, the biases at bias_weight_decay. With lars: two groups, the
    parameters LARS scales ('lars': True, weight_decay) and the normalisation-layer parameters and biases it
    skips ('lars': False, weight decay 0); a non-zero norm/bias decay is refused there, since LARS (here and in
    Habana's FusedLars) applies no decay to what it skips. 'names' survives state_dict()/load_state_dict().
    """
    if lars and (norm_weight_decay or bias_weight_decay):
        raise ValueError('LARS applies no weight decay to normalisation layers and biases (MLPerf, Habana '
                         f'FusedLars): norm_weight_decay={norm_weight_decay}, bias_weight_decay={bias_weight_decay}'
                         ' would have no effect; leave them unset or 0')
    modules = dict(model.named_modules())
    split = {'other': [], 'norm': [], 'bias': []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            module_name, _, local_name = name.rpartition('.')
            split[_kind(modules[module_name], local_name, norm_weight_decay, bias_weight_decay, lars)].append((name, p))
    if lars:
        options = [(split['other'], {'weight_decay': weight_decay, 'lars': True}),
                   (split['norm'] + split['bias'], {'weight_decay': 0.0, 'lars': False})]
        options[1][0].sort(key=_model_order(model))
    else:
        options = [(split['other'], {'weight_decay': weight_decay}),
                   (split['norm'], {'weight_decay': norm_weight_decay}),
                   (split['bias'], {'weight_decay': bias_weight_decay})]
    return [{'params': [p for _, p in named], **extra, 'names': [n for n, _ in named]}
            for named, extra in options if named]


def _model_order(model):
    position = {name: i for i, (name, _) in enumerate(model.named_parameters())}
    return lambda named: position[named[0]]


def lars_skip_mask(groups):
    """One boolean per parameter, in the order of the groups' params: True where LARS applies (a group's
    'lars', True where absent, as LARS's default).

    Habana's FusedLars reads mask[i] for the i-th parameter *of each group*, not of all groups together, so
    give it one group in this same order, `single_group(groups)`, and this mask."""
    return [bool(group.get('lars', True)) for group in groups for _ in group['params']]


def single_group(groups):
    """The groups as the one group Habana's FusedLars(optimizer, lars_skip_mask(groups), ...) needs: their
    params (and names) in order, with the weight decay of the LARS groups. FusedLars applies a group's decay
    only where the mask is True, so the skipped parameters still get none, as in LARS here."""
    decays = {group['weight_decay'] for group in groups if group.get('lars', True)}
    if len(decays) > 1:
        raise ValueError(f'single_group: the LARS groups have different weight decays {sorted(decays)}')
    if any(group['weight_decay'] for group in groups if not group.get('lars', True)):
        raise ValueError('single_group: a group LARS skips has a weight decay, which FusedLars would not apply')
    merged = {'params': [p for group in groups for p in group['params']],
              'weight_decay': decays.pop() if decays else 0.0}
    if all('names' in group for group in groups):
        merged['names'] = [n for group in groups for n in group['names']]
    return [merged]


def describe(groups):
    """One line for the start-up print, e.g. '161 params: 54 with weight decay 5e-05, 107 norm/bias without
    (LARS skips them)'."""
    total = sum(len(group['params']) for group in groups)
    if len(groups) == 1 and 'lars' not in groups[0]:
        return f"{total} params, all with weight decay {groups[0]['weight_decay']:g}"
    parts = []
    for group in groups:
        if not group.get('lars', True):
            parts.append(f"{len(group['params'])} norm/bias without (LARS skips them)")
        else:
            parts.append(f"{len(group['params'])} with weight decay {group['weight_decay']:g}")
    return f'{total} params: ' + ', '.join(parts)
