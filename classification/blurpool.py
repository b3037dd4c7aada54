"""BlurPool (`--blurpool`), FFCV's definition (libffcv/ffcv-imagenet, `use_blurpool: 1`): every nn.Conv2d that
downsamples (stride > 1 in either dimension) and has at least 16 input channels is preceded by a fixed depthwise
3x3 blur, the outer product of [1, 2, 1] with itself divided by 16 (stride 1, padding 1, one filter per channel),
an anti-aliasing low-pass before the subsampling (Zhang, "Making Convolutional Networks Shift-Invariant Again").

The filter is a registered buffer, not a parameter: the optimizer never sees it, checkpoints and the EMA carry
it, and the device layer lays it out as it lays out the conv weights (channels-last; on hpu, filters-last). Each
matching conv becomes nn.Sequential(BlurPool2d(c), conv), so its weights move from `<name>.weight` to
`<name>.1.weight`: such a model's checkpoints do not load into torchvision's class. Imports nothing of ours.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_IN_CHANNELS = 16  # FFCV's rule: convs on fewer channels (the stem's on RGB) keep their own subsampling


def blur_kernel():
    """The 3x3 blur: [1, 2, 1] outer [1, 2, 1], divided by 16 (its values sum to 1)."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return torch.outer(row, row) / 16.0


class BlurPool2d(nn.Module):
    """The fixed depthwise 3x3 blur of `channels` channels, stride 1, padding 1 (same spatial size)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.register_buffer('filter', blur_kernel().expand(channels, 1, 3, 3).clone())

    def forward(self, x):
        return F.conv2d(x, self.filter.to(x.dtype), stride=1, padding=1, groups=self.channels)

    def extra_repr(self):
        return f'{self.channels}'


def matches(module):
    """FFCV's rule: an nn.Conv2d with stride > 1 in either dimension and at least 16 input channels."""
    return isinstance(module, nn.Conv2d) and max(module.stride) > 1 and module.in_channels >= MIN_IN_CHANNELS


def apply_blurpool(model):
    """Replace, in place, every conv that `matches` with nn.Sequential(BlurPool2d(in_channels), conv), as FFCV's
    apply_blurpool walks the children. Returns how many it wrapped (0: the rule finds none in this model)."""
    wrapped = 0
    for name, child in model.named_children():
        if matches(child):
            setattr(model, name, nn.Sequential(BlurPool2d(child.in_channels), child))
            wrapped += 1
        else:
            wrapped += apply_blurpool(child)
    return wrapped


def has_blurpool(model):
    """Whether `model` holds BlurPool layers (the identity a checkpoint records)."""
    return any(isinstance(module, BlurPool2d) for module in model.modules())
