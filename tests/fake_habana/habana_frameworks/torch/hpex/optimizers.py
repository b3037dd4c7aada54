import torch

from habana_frameworks import record


class FusedSGD(torch.optim.SGD):
    """Stands in for Habana's fused SGD kernel: the same update rule, recorded."""

    def step(self, closure=None):
        record('optimizer_step')
        return super().step(closure)


class FusedResourceApplyMomentum(torch.optim.SGD):
    """Stands in for Habana's momentum kernel that FusedLars wraps: recorded with its groups' options."""

    def __init__(self, params, lr, momentum, weight_decay):
        record('FusedResourceApplyMomentum', lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class FusedLars(torch.optim.Optimizer):
    """Stands in for Habana's FusedLars(optimizer, skip_mask, eeta, eps): records the mask and steps the wrapped
    optimizer (the double does not reproduce the fused kernel's arithmetic)."""

    def __init__(self, optimizer, skip_mask, eeta=0.001, eps=1e-8):
        record('FusedLars', skip_mask=list(skip_mask), eeta=eeta, eps=eps)
        self.optim = optimizer
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.state = optimizer.state

    def step(self, closure=None):
        record('optimizer_step')
        return self.optim.step(closure)
