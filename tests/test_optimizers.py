"""optimizers.py: the LARS update against hand computations, its state across a checkpoint, and which
parameters of resnet50 and mobilenet_v2 go to which weight-decay / LARS group."""
import io
import re

import pytest
import torch
import torch.nn as nn
import torchvision

from classification import optimizers
from classification.optimizers import LARS


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def flat(t):
    return t.detach().flatten().tolist()


def step_with(optimizer, grads):
    """One optimizer step with the given gradients (set by hand, no backward)."""
    for p, g in grads.items():
        p.grad = tensor(g)
    optimizer.step()


# --- The update, by hand ------------------------------------------------------------------------------------------

def tiny_params():
    """A 2x2 weight with ||w|| = 5 and a 2-element bias."""
    return nn.Parameter(tensor([[3.0, 0.0], [0.0, 4.0]])), nn.Parameter(tensor([1.0, -2.0]))


G1_W, G1_B = [[0.6, 0.0], [0.0, 0.8]], [0.5, 0.5]     # ||g1_w|| = 1
G2_W, G2_B = [[0.0, 0.3], [0.4, 0.0]], [-1.0, 0.25]   # ||g2_w|| = 0.5


def tiny_lars(nesterov=False):
    w, b = tiny_params()
    opt = LARS([{'params': [w]}, {'params': [b], 'lars': False}], lr=0.1, momentum=0.9, weight_decay=0.1,
               trust_coefficient=0.5, nesterov=nesterov)
    return w, b, opt


def test_lars_two_steps_by_hand():
    w, b, opt = tiny_lars()
    step_with(opt, {w: G1_W, b: G1_B})
    # w: trust = 0.5 * 5 / (1 + 0.1 * 5) = 5/3, update = g + 0.1 w = [.9, 0, 0, 1.2], v = 0.1 * 5/3 * update.
    # b (lars=False): no decay, no trust: v = 0.1 * g.
    assert flat(w) == pytest.approx([3 - 0.15, 0.0, 0.0, 4 - 0.2], abs=1e-15)
    assert flat(b) == pytest.approx([1 - 0.05, -2 - 0.05], abs=1e-15)
    assert flat(opt.state[w]['momentum_buffer']) == pytest.approx([0.15, 0.0, 0.0, 0.2], abs=1e-15)

    step_with(opt, {w: G2_W, b: G2_B})
    # w1 = [2.85, 0, 0, 3.8]: ||w1|| = 4.75, ||g2|| = 0.5; the trust ratio is recomputed.
    trust = 0.5 * 4.75 / (0.5 + 0.1 * 4.75)
    update = [0.0 + 0.1 * 2.85, 0.3, 0.4, 0.0 + 0.1 * 3.8]
    v = [0.9 * v1 + 0.1 * trust * u for v1, u in zip([0.15, 0.0, 0.0, 0.2], update)]
    assert flat(opt.state[w]['momentum_buffer']) == pytest.approx(v, abs=1e-14)
    assert flat(w) == pytest.approx([w1 - v2 for w1, v2 in zip([2.85, 0.0, 0.0, 3.8], v)], abs=1e-14)
    vb = [0.9 * 0.05 + 0.1 * -1.0, 0.9 * 0.05 + 0.1 * 0.25]                      # [-0.055, 0.07]
    assert flat(b) == pytest.approx([0.95 - vb[0], -2.05 - vb[1]], abs=1e-14)   # [1.005, -2.12]


def test_lars_nesterov_two_steps_by_hand():
    w, b, opt = tiny_lars(nesterov=True)
    step_with(opt, {w: G1_W, b: G1_B})
    # v1 as without nesterov; w -= 0.9 v1 + scaled_lr * update = 1.9 v1.
    assert flat(w) == pytest.approx([3 - 1.9 * 0.15, 0.0, 0.0, 4 - 1.9 * 0.2], abs=1e-15)   # [2.715, 0, 0, 3.62]
    assert flat(b) == pytest.approx([1 - 1.9 * 0.05, -2 - 1.9 * 0.05], abs=1e-15)

    step_with(opt, {w: G2_W, b: G2_B})
    # ||w1|| = 0.905 * 5 = 4.525.
    trust = 0.5 * 4.525 / (0.5 + 0.1 * 4.525)
    step = [0.1 * trust * u for u in [0.1 * 2.715, 0.3, 0.4, 0.1 * 3.62]]
    v = [0.9 * v1 + s for v1, s in zip([0.15, 0.0, 0.0, 0.2], step)]
    expected = [w1 - (0.9 * v2 + s) for w1, v2, s in zip([2.715, 0.0, 0.0, 3.62], v, step)]
    assert flat(w) == pytest.approx(expected, abs=1e-14)
    vb = [0.9 * 0.05 + 0.1 * -1.0, 0.9 * 0.05 + 0.1 * 0.25]
    expected_b = [0.905 - (0.9 * vb[0] + 0.1 * -1.0), -2.095 - (0.9 * vb[1] + 0.1 * 0.25)]
    assert flat(b) == pytest.approx(expected_b, abs=1e-14)


def test_zero_weight_norm_gives_trust_one():
    w = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    step_with(opt, {w: [[1.0, 2.0], [3.0, 4.0]]})
    assert flat(w) == pytest.approx([-0.1, -0.2, -0.3, -0.4], abs=1e-15)   # v = 0.1 * 1 * (g + 0.1 * 0)


def test_zero_grad_norm_gives_trust_one():
    w = nn.Parameter(tensor([[3.0, 0.0], [0.0, 4.0]]))
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.001)
    step_with(opt, {w: [[0.0, 0.0], [0.0, 0.0]]})
    assert flat(w) == pytest.approx([3 - 0.03, 0.0, 0.0, 4 - 0.04], abs=1e-15)   # v = 0.1 * 1 * (0 + 0.1 w)


def test_both_norms_zero_stays_zero_without_nan():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = LARS([w], lr=0.1, weight_decay=0.1)
    step_with(opt, {w: [0.0, 0.0, 0.0]})
    assert flat(w) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize('nesterov', [False, True])
def test_lars_false_group_is_momentum_sgd_without_weight_decay(nesterov):
    torch.manual_seed(0)
    start = torch.randn(3, 3, dtype=torch.float64)
    ours, theirs = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    # The group's weight decay (the constructor's 0.1) does not apply where lars is False.
    lars = LARS([{'params': [ours], 'lars': False}], lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    sgd = torch.optim.SGD([theirs], lr=0.05, momentum=0.9, dampening=0, weight_decay=0, nesterov=nesterov)
    for _ in range(5):
        grad = torch.randn(3, 3, dtype=torch.float64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_params_without_grad_are_skipped():
    w, b = tiny_params()
    opt = LARS([w, b], lr=0.1)
    step_with(opt, {w: G1_W})
    assert flat(b) == [1.0, -2.0] and b not in opt.state
    assert w in opt.state


def test_deleting_or_zeroing_the_momentum_buffer_restarts_momentum():
    def first_step_from(weights):
        w = nn.Parameter(tensor(weights))
        step_with(LARS([w], lr=0.1, weight_decay=0.1, trust_coefficient=0.5), {w: G2_W})
        return flat(w)

    for reset in ('delete', 'zero'):
        w, _, opt = tiny_lars()
        step_with(opt, {w: G1_W})
        after_one = flat(w)
        if reset == 'delete':
            del opt.state[w]['momentum_buffer']
        else:
            opt.state[w]['momentum_buffer'].zero_()
        step_with(opt, {w: G2_W})
        assert flat(w) == first_step_from([after_one[:2], after_one[2:]])


@pytest.mark.parametrize('argument, value', [('lr', -0.1), ('momentum', -0.5), ('weight_decay', -1e-4),
                                             ('trust_coefficient', 0.0), ('trust_coefficient', -0.001)])
def test_bad_arguments_are_refused_by_name(argument, value):
    w, _ = tiny_params()
    options = {'lr': 0.1, argument: value}
    with pytest.raises(ValueError, match=argument):
        LARS([w], **options)


def test_bad_group_option_is_refused_by_name():
    w, b = tiny_params()
    with pytest.raises(ValueError, match='weight_decay'):
        LARS([{'params': [w]}, {'params': [b], 'weight_decay': -1.0}], lr=0.1)


def test_sparse_gradients_are_refused():
    w = nn.Parameter(torch.zeros(4, 2))
    w.grad = torch.sparse_coo_tensor([[0, 2], [1, 0]], [1.0, 2.0], (4, 2), check_invariants=True)
    with pytest.raises(RuntimeError, match='sparse'):
        LARS([w], lr=0.1).step()


# --- Across a checkpoint --------------------------------------------------------------------------------------------

def small_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def train_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def lars_for(model, nesterov=False):
    return LARS(optimizers.param_groups(model, 5e-4, lars=True), lr=0.5, momentum=0.9, weight_decay=5e-4,
                trust_coefficient=0.02, nesterov=nesterov)


@pytest.mark.parametrize('nesterov', [False, True])
def test_resuming_from_a_state_dict_gives_bitwise_the_same_parameters(nesterov):
    straight = small_net()
    opt = lars_for(straight, nesterov)
    train_steps(straight, opt, 3, seed=1)
    buffer = io.BytesIO()
    torch.save({'model': straight.state_dict(), 'optimizer': opt.state_dict()}, buffer)
    train_steps(straight, opt, 3, seed=2)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed = small_net()
    resumed.load_state_dict(checkpoint['model'])
    resumed_opt = lars_for(resumed, nesterov)
    resumed_opt.load_state_dict(checkpoint['optimizer'])
    assert [(g['names'], g['lars']) for g in resumed_opt.param_groups] == [(g['names'], g['lars'])
                                                                         for g in opt.param_groups]
    train_steps(resumed, resumed_opt, 3, seed=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_extra_group_keys_survive_the_state_dict():
    opt = lars_for(small_net())
    saved = opt.state_dict()['param_groups']
    assert [g['names'] for g in saved] == [['0.weight', '4.weight'], ['0.bias', '1.weight', '1.bias', '4.bias']]
    assert [g['lars'] for g in saved] == [True, False]


# --- Groups -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def resnet50():
    return torchvision.models.resnet50(num_classes=10)


@pytest.fixture(scope='module')
def mobilenet_v2():
    return torchvision.models.mobilenet_v2()


def batchnorm_names(model):
    """The expected norm-layer parameters, from the module types."""
    return {f'{name}.{kind}' for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)
            for kind in ('weight', 'bias')}


def names_with_decay(groups, decay):
    return {n for g in groups if g['weight_decay'] == decay for n in g['names']}


def check_each_parameter_once_in_model_order(model, groups):
    all_names = [n for n, _ in model.named_parameters()]
    grouped = [n for g in groups for n in g['names']]
    assert sorted(grouped) == sorted(all_names)
    position = {n: i for i, n in enumerate(all_names)}
    for g in groups:
        assert [position[n] for n in g['names']] == sorted(position[n] for n in g['names'])
        named = dict(model.named_parameters())
        assert all(p is named[n] for p, n in zip(g['params'], g['names']))


def test_default_is_one_group_of_model_parameters(resnet50):
    groups = optimizers.param_groups(resnet50, 1e-4)
    assert len(groups) == 1 and groups[0]['weight_decay'] == 1e-4
    assert len(groups[0]['params']) == len(list(resnet50.parameters())) == 161
    assert all(a is b for a, b in zip(groups[0]['params'], resnet50.parameters()))
    assert groups[0]['names'] == [n for n, _ in resnet50.named_parameters()]
    assert optimizers.describe(groups) == '161 params, all with weight decay 0.0001'


def test_default_group_trains_like_sgd_over_model_parameters():
    a, b = small_net(), small_net()
    train_steps(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4), 2, seed=4)
    train_steps(b, torch.optim.SGD(optimizers.param_groups(b, 1e-4), lr=0.1, momentum=0.9, weight_decay=1e-4), 2,
                seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_resnet50_norm_weight_decay(resnet50):
    norm = batchnorm_names(resnet50)
    assert len(norm) == 106
    assert {'bn1.weight', 'bn1.bias', 'layer1.0.bn1.weight', 'layer1.0.bn3.bias', 'layer1.0.downsample.1.weight',
            'layer4.2.bn2.bias', 'layer4.0.downsample.1.bias'} <= norm
    by_name = {n for n, _ in resnet50.named_parameters() if re.search(r'(^|\.)(bn\d|downsample\.1)\.(weight|bias)$', n)}
    assert by_name == norm
    groups = optimizers.param_groups(resnet50, 1e-4, norm_weight_decay=0.0)
    check_each_parameter_once_in_model_order(resnet50, groups)
    assert [(len(g['params']), g['weight_decay']) for g in groups] == [(55, 1e-4), (106, 0.0)]
    assert names_with_decay(groups, 0.0) == norm
    assert 'fc.bias' in groups[0]['names'] and 'fc.weight' in groups[0]['names']


def test_resnet50_norm_and_bias_weight_decay(resnet50):
    norm = batchnorm_names(resnet50)
    groups = optimizers.param_groups(resnet50, 1e-4, norm_weight_decay=0.0, bias_weight_decay=0.0)
    check_each_parameter_once_in_model_order(resnet50, groups)
    assert names_with_decay(groups, 0.0) == norm | {'fc.bias'}
    # torchvision's precedence: a BatchNorm bias is a bias first, so the norm group holds the norm weights.
    other, norm_group, bias_group = groups
    assert set(norm_group['names']) == {n for n in norm if n.endswith('.weight')}
    assert set(bias_group['names']) == {n for n in norm if n.endswith('.bias')} | {'fc.bias'}
    assert [len(g['params']) for g in groups] == [54, 53, 54]
    assert [g['weight_decay'] for g in groups] == [1e-4, 0.0, 0.0]


def test_resnet50_bias_weight_decay_alone(resnet50):
    groups = optimizers.param_groups(resnet50, 1e-4, bias_weight_decay=0.0)
    assert [(len(g['params']), g['weight_decay']) for g in groups] == [(107, 1e-4), (54, 0.0)]
    assert set(groups[1]['names']) == {n for n, _ in resnet50.named_parameters() if n.endswith('.bias')}


def test_resnet50_lars_groups(resnet50):
    skipped = batchnorm_names(resnet50) | {'fc.bias'}
    groups = optimizers.param_groups(resnet50, 5e-5, lars=True)
    check_each_parameter_once_in_model_order(resnet50, groups)
    assert [(len(g['params']), g['weight_decay'], g['lars']) for g in groups] == [(54, 5e-5, True),
                                                                                (107, 0.0, False)]
    assert set(groups[1]['names']) == skipped
    assert set(groups[0]['names']) == {n for n, p in resnet50.named_parameters() if p.dim() > 1}
    assert optimizers.describe(groups) == ('161 params: 54 with weight decay 5e-05, '
                                           '107 norm/bias without (LARS skips them)')


def test_mobilenet_v2_groups(mobilenet_v2):
    norm = batchnorm_names(mobilenet_v2)
    assert len(norm) == 104
    assert {'features.0.1.weight', 'features.0.1.bias', 'features.1.conv.0.1.weight', 'features.1.conv.2.bias',
            'features.2.conv.1.1.weight', 'features.17.conv.3.bias', 'features.18.1.weight'} <= norm
    assert not any('bn' in n for n in norm)

    groups = optimizers.param_groups(mobilenet_v2, 4e-5, norm_weight_decay=0.0)
    check_each_parameter_once_in_model_order(mobilenet_v2, groups)
    assert [(len(g['params']), g['weight_decay']) for g in groups] == [(54, 4e-5), (104, 0.0)]
    assert names_with_decay(groups, 0.0) == norm

    groups = optimizers.param_groups(mobilenet_v2, 4e-5, norm_weight_decay=0.0, bias_weight_decay=0.0)
    assert names_with_decay(groups, 0.0) == norm | {'classifier.1.bias'}

    groups = optimizers.param_groups(mobilenet_v2, 4e-5, lars=True)
    assert [(len(g['params']), g['lars']) for g in groups] == [(53, True), (105, False)]
    assert set(groups[1]['names']) == norm | {'classifier.1.bias'}
    assert sum(len(g['params']) for g in groups) == 158


def test_frozen_parameters_are_left_out_and_shared_ones_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.norm = nn.Linear(3, 3), nn.Linear(3, 3), nn.LayerNorm(3)
            self.b.weight = self.a.weight
            self.norm.bias.requires_grad_(False)

    model = Tied()
    groups = optimizers.param_groups(model, 1e-4, norm_weight_decay=0.0, bias_weight_decay=0.0)
    assert [g['names'] for g in groups] == [['a.weight'], ['norm.weight'], ['a.bias', 'b.bias']]


def test_lars_refuses_a_norm_or_bias_decay_it_would_not_apply(resnet50):
    with pytest.raises(ValueError, match='norm_weight_decay'):
        optimizers.param_groups(resnet50, 5e-5, norm_weight_decay=1e-5, lars=True)
    assert len(optimizers.param_groups(resnet50, 5e-5, norm_weight_decay=0.0, bias_weight_decay=0.0, lars=True)) == 2


def test_lars_skip_mask_agrees_with_the_groups(resnet50):
    groups = optimizers.param_groups(resnet50, 5e-5, lars=True)
    mask = optimizers.lars_skip_mask(groups)
    assert mask == [True] * 54 + [False] * 107
    skipped = batchnorm_names(resnet50) | {'fc.bias'}
    (one,) = optimizers.single_group(groups)
    assert one['weight_decay'] == 5e-5 and len(one['params']) == len(mask) == 161
    assert [name not in skipped for name in one['names']] == mask
    named = dict(resnet50.named_parameters())
    assert all(p is named[n] for p, n in zip(one['params'], one['names']))
    assert optimizers.lars_skip_mask(optimizers.param_groups(resnet50, 1e-4)) == [True] * 161


def test_single_group_refuses_groups_fused_lars_cannot_express(resnet50):
    groups = optimizers.param_groups(resnet50, 5e-5, lars=True)
    groups[1]['weight_decay'] = 1e-5
    with pytest.raises(ValueError, match='skips'):
        optimizers.single_group(groups)
