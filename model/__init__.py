"""Models: the ResNet family from model/resnet.py, every other name from torchvision.models."""
import torch
import torchvision

from .resnet import *  # noqa: F401,F403
from . import resnet

LOCAL_MODELS = {name: getattr(resnet, name) for name in resnet.__all__ if name[0].islower()}


class ModelError(ValueError):
    """A model that cannot be built as asked (unknown name, weights unavailable)."""


def available_models():
    names = set(LOCAL_MODELS)
    names.update(name for name in torchvision.models.list_models(module=torchvision.models))
    return sorted(names)


def _builder(name):
    if name in LOCAL_MODELS:
        return LOCAL_MODELS[name]
    if name in torchvision.models.list_models(module=torchvision.models):
        return torchvision.models.get_model_builder(name)
    raise ModelError(f"unknown model '{name}'; choose one of: {', '.join(available_models())}")


def _pretrained_state(name, builder, **kwargs):
    """ImageNet weights for `name` (torchvision's V1 file), or a clear ModelError when unavailable."""
    try:
        if name in LOCAL_MODELS:
            return builder(pretrained=True, **kwargs).state_dict()
        return builder(weights='IMAGENET1K_V1', **kwargs).state_dict()
    except ValueError as err:
        raise ModelError(f'no pretrained weights for {name}: {err}') from None
    except (OSError, RuntimeError) as err:  # urllib's URLError is an OSError
        hub = torch.hub.get_dir()
        raise ModelError(f'could not fetch pretrained weights for {name} ({err.__class__.__name__}: {err}); '
                         f'without network access place the weight file in {hub}/checkpoints/ '
                         'or train without --pretrained') from None


def create_model(name, num_classes=1000, pretrained=False, **kwargs):
    """Build `name` with a `num_classes`-way head; with `pretrained`, every layer but a resized
    head starts from ImageNet weights."""
    builder = _builder(name)
    if not pretrained:
        return builder(num_classes=num_classes, **kwargs)
    state = _pretrained_state(name, builder, **kwargs)
    model = builder(num_classes=num_classes, **kwargs)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(kept, strict=False)
    if len(kept) != len(own):
        print(f'Loaded pretrained {name} weights; {len(own) - len(kept)} tensors of the '
              f'{num_classes}-class head start fresh')
    return model
