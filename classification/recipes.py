"""Named training recipes (`--recipe NAME`, `--recipe list`): each expands to explicit trainer flags for the
model and the actual global batch (world size x --batch-size), and any flag on the command line overrides it.

Free of torch, so the demo wrappers can list recipes and pass them on at once. The values and the published
results come from ../shared/reference (spec-recipes-and-peers.md, spec-torchvision.md, spec-habana-1.4.0.md).
"""
import argparse
from typing import Callable, NamedTuple

from .cli import UsageError

DEFAULT = 'habana-1.4'


class Recipe(NamedTuple):
    name: str
    source: str
    reported: str
    reference_batch: str            # the global batch its values are published for, in words
    flags: Callable                 # (model, global_batch) -> (list of flag tokens, notes printed at start)
    models: tuple = ()              # models it has values for; () any
    cuda_amp: bool = False          # with --device cuda it also sets --amp (fp16 autocast + GradScaler)


def linear_lr(lr, reference_batch, global_batch):
    """Goyal et al.'s linear scaling rule: the LR grows with the global batch."""
    return lr * global_batch / reference_batch


def number(value):
    return f'{value:.15g}'


# --- habana-1.4 --------------------------------------------------------------------------------------------------

def habana_flags(model, global_batch):
    return [], ['the trainers\' own defaults, unchanged (StepLR per epoch or --custom-lr-values)']


# --- nvidia-90e / nvidia-250e (spec 1.5) --------------------------------------------------------------------------

NVIDIA_MODELS = {  # per-GPU batch, reference global batch (8 GPUs), weight decay
    'resnet50': (256, 2048, 3.0517578125e-05),
    'resnext101_32x4d': (128, 1024, 6.103515625e-05),
}
NVIDIA_LR_PER_256 = 0.256


def nvidia_flags(epochs, mixup):
    def flags(model, global_batch):
        batch, reference, weight_decay = NVIDIA_MODELS[model]
        lr = linear_lr(NVIDIA_LR_PER_256, 256, global_batch)
        tokens = ['--batch-size', str(batch), '--epochs', str(epochs), '--lr', number(lr), '--momentum', '0.875',
                  '--wd', number(weight_decay), '--norm-weight-decay', '0', '--lr-scheduler', 'cosineannealinglr',
                  '--lr-warmup-epochs', '8', '--lr-warmup-method', 'linear', '--lr-warmup-decay', '0.125',
                  '--label-smoothing', '0.1', '--mixup-alpha', number(mixup)]
        notes = [f'lr 0.256 per 256 images, scaled linearly: {number(lr)} at global batch {global_batch} '
                 f'(NVIDIA\'s 8-GPU run: {number(linear_lr(NVIDIA_LR_PER_256, 256, reference))} at {reference})',
                 'warm-up per iteration from lr/8 (NVIDIA sets it once per epoch: lr*(e+1)/8)']
        return tokens, notes
    return flags


# --- lr-collapse-72e (spec 2.2-2.5) ---------------------------------------------------------------------------------

COLLAPSE_BATCH = 4096
COLLAPSE_PHASES = (  # at global batch 4096, spec 2.4
    '7800,1.6,warmup=1560@0.1,horizon=18720,power=1,wd=5e-5',
    '3750,1.02,horizon=7500,power=2',
    '4750,0.764,warmup=1000@0.255,horizon=7500,power=2',
    '4750,0.572,warmup=1000@0.19,horizon=7500,power=2',
    '1560,0.143,power=2,wd=2e-4,noaug',
)


def collapse_phases(global_batch):
    """The phases for `global_batch`: LRs scaled linearly from 4096, lengths in iterations scaled inversely."""
    from . import schedules
    factor = global_batch / COLLAPSE_BATCH
    return [schedules.parse_phase(text).scaled(factor).describe() if global_batch != COLLAPSE_BATCH else text
            for text in COLLAPSE_PHASES]


def collapse_flags(model, global_batch):
    tokens = ['--batch-size', '256', '--epochs', '72', '--momentum', '0.9', '--wd', '5e-5',
              '--lr-scheduler', 'collapse', '--lr-phases', *collapse_phases(global_batch)]
    notes = [f'phases written for global batch {COLLAPSE_BATCH}: LRs x {global_batch}/{COLLAPSE_BATCH}, lengths in '
             'iterations x the inverse (the same epochs)',
             '72 epochs: the recipe\'s 22 610 iterations are 72.29 epochs; the last 0.29 (LR below 6e-4) are not run',
             'the final phase: weight decay 2e-4, no scale/aspect augmentation from the first epoch that starts in it']
    return tokens, notes


# --- lars (Habana 1.7+, MLPerf; spec-habana 9, spec 3.1-3.2) ----------------------------------------------------------

LARS_PUBLISHED = (  # global batch, base LR, warm-up epochs, decay epochs, who ran it
    (2048, 9.0, 3, 36, 'Habana Model-References 1.7+ and MLPerf Gaudi2, 8 cards x 256'),
    (3200, 11.0, 2, 37, 'NVIDIA MLPerf v3.0-v4.0, 8 H100 x 400'),
    (3264, 10.5, 2, 37, 'NVIDIA MLPerf v1.1-v2.0, 8 A100 x 408'),
)


def lars_row(global_batch):
    return min(LARS_PUBLISHED, key=lambda row: (abs(row[0] - global_batch), row[0]))


def lars_flags(model, global_batch):
    batch, lr, warmup, decay, who = lars_row(global_batch)
    tokens = ['--optimizer', 'lars', '--batch-size', '256', '--epochs', '35', '--lr', number(lr), '--momentum', '0.9',
              '--wd', '5e-5', '--lr-scheduler', 'polynomiallr', '--lr-power', '2', '--lr-min', '1e-4',
              '--lr-warmup-epochs', str(warmup), '--lr-warmup-decay', '0', '--lr-decay-epochs', str(decay),
              '--label-smoothing', '0.1', '--epochs-between-evals', '4', '--eval-offset-epochs', '3']
    notes = [f'LARS values published for global batch {batch} ({who}), the nearest to this run\'s {global_batch}; '
             'LARS base LRs are published per batch, not scaled by a rule',
             'LARS skips trust-ratio scaling and weight decay for BatchNorm parameters and biases']
    return tokens, notes


# --- torchvision-v2 (spec-torchvision 3.3) ---------------------------------------------------------------------------

def torchvision_v2_flags(model, global_batch):
    lr = linear_lr(0.5, 1024, global_batch)
    tokens = ['--batch-size', '128', '--epochs', '600', '--lr', number(lr), '--lr-scheduler', 'cosineannealinglr',
              '--lr-warmup-epochs', '5', '--lr-warmup-method', 'linear', '--lr-warmup-decay', '0.01',
              '--auto-augment', 'ta_wide', '--random-erase', '0.1', '--label-smoothing', '0.1', '--mixup-alpha', '0.2',
              '--cutmix-alpha', '1.0', '--wd', '2e-5', '--norm-weight-decay', '0.0', '--train-crop-size', '176',
              '--val-resize-size', '232', '--model-ema', '--model-ema-steps', '32', '--model-ema-decay', '0.99998',
              '--dl-worker-type', 'MP']
    notes = [f'lr 0.5 at global batch 1024 (8 GPUs x 128), scaled linearly: {number(lr)} at {global_batch}',
             'left out: the repeated-augmentation sampler (--ra-sampler --ra-reps 4); every rank reads its own share',
             'MP loader: TrivialAugmentWide and random erasing run in the PIL pipeline']
    return tokens, notes


# --- ffcv-rn50-*, ffcv-rn18-* (spec-gpu-and-time-to-accuracy 1 and 4) -----------------------------------------------

FFCV_MODELS = {  # per-GPU batch, reference global batch, LR there, weight decay, GPUs of the published runs
    'resnet50': (512, 4096, 1.7, 1e-4, '8 x A100'),
    'resnet18': (1024, 1024, 0.5, 5e-5, '1 x A100'),
}
FFCV_RAMPS = {16: (11, 13), 24: (17, 20), 32: (23, 27), 40: (29, 34), 56: (41, 48), 88: (65, 76)}  # epochs: ramp
FFCV_PUBLISHED = {  # epochs: (top-1 %, minutes) from FFCV's README
    'resnet50': {16: (73.8, 14.9), 24: (75.6, 21.7), 32: (76.6, 28.7), 40: (77.2, 35.6), 56: (78.0, 49.4),
                 88: (78.4, 77.2)},
    'resnet18': {16: (66.9, 35.0), 24: (68.8, 51.6), 32: (70.0, 68.9), 40: (70.6, 85.5), 56: (71.3, 119.4),
                 88: (72.4, 187.3)},
}
FFCV_MIN_RES, FFCV_MAX_RES, FFCV_VAL_RES = 160, 192, 256
FFCV_VAL_CROP_RATIO = 224 / 256
FFCV_VAL_RESIZE = round(FFCV_VAL_RES / FFCV_VAL_CROP_RATIO)  # 293: the shorter side whose 256 px centre crop is ~224/256 of it


def ffcv_flags(epochs):
    def flags(model, global_batch):
        batch, reference, lr, weight_decay, gpus = FFCV_MODELS[model]
        start_ramp, end_ramp = FFCV_RAMPS[epochs]
        scaled = linear_lr(lr, reference, global_batch)
        tokens = ['--batch-size', str(batch), '--epochs', str(epochs), '--lr', number(scaled), '--momentum', '0.9',
                  '--wd', number(weight_decay), '--norm-weight-decay', '0', '--label-smoothing', '0.1',
                  '--lr-scheduler', 'cyclic', '--lr-peak-epoch', '2',
                  '--min-res', str(FFCV_MIN_RES), '--max-res', str(FFCV_MAX_RES), '--start-ramp', str(start_ramp),
                  '--end-ramp', str(end_ramp), '--val-resize-size', str(FFCV_VAL_RESIZE),
                  '--val-crop-size', str(FFCV_VAL_RES), '--tta-flip', '--blurpool']
        notes = [f'lr {number(lr)} at global batch {reference} ({gpus} x {batch}), scaled linearly: {number(scaled)} '
                 f'at {global_batch}',
                 f'train at {FFCV_MIN_RES} px to epoch {start_ramp}, ramp to {FFCV_MAX_RES} px at epoch {end_ramp}; '
                 f'validate at {FFCV_VAL_RES} px (centre crop of a {FFCV_VAL_RESIZE} px resize: FFCV\'s 224/256 '
                 'crop ratio) with the mirror\'s logits added',
                 'fp16 autocast + GradScaler (--amp) on CUDA, as FFCV; fp32 elsewhere (fp16 is ~70x slower on a CPU)',
                 'BlurPool changes the model: its checkpoints do not load into torchvision\'s class']
        return tokens, notes
    return flags


def ffcv_recipes():
    for name, model in (('rn50', 'resnet50'), ('rn18', 'resnet18')):
        batch, reference, lr, _, gpus = FFCV_MODELS[model]
        for epochs, (top1, minutes) in FFCV_PUBLISHED[model].items():
            yield Recipe(f'ffcv-{name}-{epochs}e',
                         f'FFCV ffcv-imagenet {name}_configs/{name}_{epochs}_epochs.yaml (spec-gpu-and-time-to-accuracy 4)',
                         f'{model} {top1} top-1 in {epochs} epochs, {minutes} min on {gpus}',
                         f'{reference} ({gpus} x {batch}); lr {number(lr)}, scaled linearly', ffcv_flags(epochs),
                         (model,), cuda_amp=True)


RECIPES = {recipe.name: recipe for recipe in (
    Recipe('habana-1.4', 'Habana Model-References 1.4.0 train.py/main.py defaults (= torchvision 0.10\'s reference)',
           'torchvision ResNet-50 V1 weights, same recipe at 8 x 32: 76.130 top-1 (Habana\'s README cites none)',
           'any', habana_flags),
    Recipe('nvidia-90e', 'NVIDIA DeepLearningExamples ConvNets configs.yml, 90-epoch scripts (spec 1.5)',
           'ResNet-50 77.12 +- 0.11 (A100 AMP), 76.95 (TF32); ResNeXt101-32x4d 79.47 (AMP), 79.38 (TF32)',
           '2048 (RN50, 8 x 256) / 1024 (RNXT, 8 x 128); 0.256 per 256', nvidia_flags(90, 0.0),
           tuple(NVIDIA_MODELS)),
    Recipe('nvidia-250e', 'NVIDIA DeepLearningExamples ConvNets configs.yml, 250-epoch scripts, mixup 0.2 (spec 1.5)',
           'ResNet-50 78.43 +- 0.11 (A100 AMP), 78.38 (TF32); ResNeXt101-32x4d 80.19 (AMP), 80.27 (TF32)',
           '2048 (RN50, 8 x 256) / 1024 (RNXT, 8 x 128); 0.256 per 256', nvidia_flags(250, 0.2),
           tuple(NVIDIA_MODELS)),
    Recipe('lr-collapse-72e', 'SURFsara fork of Intel Caffe, resnet50_custom_lr (arXiv 1711.04291; spec 2)',
           'ResNet-50 76.3 top-1 / 93.2 top-5 in 72 epochs (64 Xeon nodes, ~240 min)', '4096 (128 workers x 32)',
           collapse_flags),
    Recipe('lars', 'Habana Model-References 1.7+ --optimizer lars; MLPerf ResNet-50 closed division (spec 3)',
           'MLPerf target 75.9 top-1 in 35 epochs (Gaudi2 8 cards: 16.40 min, MLPerf v3.1 PyTorch)',
           '2048 (Habana), 3200 / 3264 (NVIDIA): the published row nearest the run', lars_flags),
    Recipe('torchvision-v2', 'torchvision\'s "new recipe" (#3995) for the IMAGENET1K_V2 weights (spec-torchvision 3.3)',
           'ResNet-50 80.858 top-1 / 95.434 top-5 (600 epochs); MobileNetV2 72.154 with the same command',
           '1024 (8 GPUs x 128)', torchvision_v2_flags),
    *ffcv_recipes(),
)}


def listing():
    """--recipe list: every recipe, its source, the batch its values are for and what its source reports."""
    lines = []
    for recipe in RECIPES.values():
        models = f' (models: {", ".join(recipe.models)})' if recipe.models else ''
        lines += [f'{recipe.name}{models}', f'    source:    {recipe.source}',
                  f'    reference: global batch {recipe.reference_batch}', f'    reported:  {recipe.reported}']
    return '\n'.join(lines)


def check_name(name):
    if name != 'list' and name not in RECIPES:
        raise UsageError(f"--recipe: unknown recipe '{name}'; choose one of {', '.join(RECIPES)} "
                         '(--recipe list describes them)')


def recipe_batch_size(recipe, model, default):
    """The per-rank batch a recipe sets (its tokens do not depend on the batch they are asked for)."""
    tokens = recipe.flags(model, default)[0]
    return int(tokens[tokens.index('--batch-size') + 1]) if '--batch-size' in tokens else default


def given_dests(parser, argv):
    """The destinations of the flags given in argv (argparse sets a default only where the namespace lacks one)."""
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions
                                      if action.dest is not argparse.SUPPRESS})
    parsed, _ = parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def token_groups(parser, tokens):
    """[(dest, [flag, values...])] of a recipe's tokens, each flag with the values that follow it."""
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    groups = []
    for token in tokens:
        if token.startswith('--') and token in by_flag:
            groups.append((by_flag[token].dest, [token]))
        else:
            groups[-1][1].append(token)
    return groups


def expand(parser, argv, world_size):
    """argv with the recipe it names (--recipe, default habana-1.4) expanded in front of it: the recipe's flags
    for the model and global batch the command gives, less those the command sets itself. Returns (argv, lines
    to print at start, or [] for the default recipe)."""
    given = given_dests(parser, argv)
    args, _ = parser.parse_known_args(argv)
    name = getattr(args, 'recipe', DEFAULT)
    check_name(name)
    if name == 'list':
        return argv, []
    recipe = RECIPES[name]
    if recipe.models and args.model not in recipe.models:
        raise UsageError(f"--recipe {name}: its source publishes values for {', '.join(recipe.models)} only, "
                         f"not --model {args.model}")
    batch = args.batch_size if 'batch_size' in given else recipe_batch_size(recipe, args.model, args.batch_size)
    tokens, notes = recipe.flags(args.model, world_size * batch)
    if recipe.cuda_amp and getattr(args, 'device', None) == 'cuda':
        tokens = [*tokens, '--amp']
    kept = [part for dest, group in token_groups(parser, tokens) if dest not in given for part in group]
    if name == DEFAULT:
        return argv, []
    overridden = sorted({group[0] for dest, group in token_groups(parser, tokens) if dest in given})
    lines = [f'Recipe {name}: {recipe.source}; reported: {recipe.reported}',
             *(f'  {note}' for note in notes),
             f'  global batch {world_size * batch} = {world_size} rank(s) x {batch}'
             + (f'; your flags override the recipe\'s {", ".join(overridden)}' if overridden else '')]
    return kept + list(argv), lines
