"""gan_baseline.py: the three losses at known logits against their closed forms, the gradient penalty of critics with
known input gradients, DiffAugment's shapes, exactness and gradients, the mode-counting metric on hand-made points,
the networks' shapes, and tiny CPU runs of main() (synthetic digits in MNIST's file format, an image folder, grid25)."""
import math
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from closed_form import (
    check_foreign_and_broken_checkpoints,
    check_nothing_is_lost,
    check_resume_after_a_stop_is_exact,
    check_stop_signal_saves,
    check_the_average_keeps_no_graph,
    check_truncated_mnist_is_named,
    check_unknown_flag,
    ckpt_step,
    run_alone,
    small_inception,
    write_mnist,
)

import gan_baseline as gb

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = torch.tensor([0.0, 2.0, -1.0, 5.0], dtype=torch.float64)  # D's logits on real samples
FAKE = torch.tensor([0.0, -3.0, 1.0, 0.5], dtype=torch.float64)  # and on fakes


def test_losses_at_known_logits():
    """Each loss against its formula written with math.log / exp, logit by logit."""
    sig = lambda a: 1 / (1 + math.exp(-a))
    mean = lambda xs: sum(xs) / len(xs)
    assert gb.d_loss_fn('bce', R, FAKE).item() == pytest.approx(
        mean([-math.log(sig(r)) for r in R.tolist()]) + mean([-math.log(1 - sig(f)) for f in FAKE.tolist()]), rel=1e-12)
    assert gb.d_loss_fn('bce', torch.zeros(3), torch.zeros(3)).item() == pytest.approx(2 * math.log(2))  # D = 1/2
    assert gb.g_loss_fn('bce', FAKE).item() == pytest.approx(mean([-math.log(sig(f)) for f in FAKE.tolist()]), rel=1e-12)
    assert gb.g_loss_fn('bce', FAKE, saturating=True).item() == pytest.approx(
        mean([math.log(1 - sig(f)) for f in FAKE.tolist()]), rel=1e-12)
    assert gb.d_loss_fn('wgan-gp', R, FAKE).item() == pytest.approx(mean(FAKE.tolist()) - mean(R.tolist()))
    assert gb.d_loss_fn('hinge', R, FAKE).item() == pytest.approx(
        mean([max(0, 1 - r) for r in R.tolist()]) + mean([max(0, 1 + f) for f in FAKE.tolist()]))  # 1.25 + 0.875
    for kind in ('wgan-gp', 'hinge'):
        assert gb.g_loss_fn(kind, FAKE).item() == pytest.approx(-mean(FAKE.tolist()))


def test_saturating_loss_vanishes_where_d_rejects_the_fakes():
    """At a fake's logit f = -8 (D sure it is fake), d/df log(1 - sigmoid(f)) = -sigmoid(f) = -3.4e-4, while the
    non-saturating -log sigmoid(f) has d/df = -(1 - sigmoid(f)) ~ -1: the reason for the non-saturating form."""
    for saturating, expect in ((True, -1 / (1 + math.exp(8))), (False, -1 / (1 + math.exp(-8)))):
        f = torch.tensor([-8.0], dtype=torch.float64, requires_grad=True)
        gb.g_loss_fn('bce', f, saturating).backward()
        assert f.grad.item() == pytest.approx(expect, rel=1e-12)


@pytest.mark.parametrize('norm', [1.0, 0.3, 2.5])
def test_gradient_penalty_of_a_linear_critic(norm):
    """D(x) = w . x + b has input gradient w everywhere, so the penalty is (|w| - 1)^2 exactly: 0 for a unit w. The
    loss-scale path (float16 training) divides the scale back out: the same value at scale 1024."""
    g = torch.Generator().manual_seed(0)
    D = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1)).double()
    w = torch.randn(1, 3 * 8 * 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        D[1].weight.copy_(w / w.norm() * norm)
    real, fake = (torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(2))
    u = torch.rand(6, 1, 1, 1, generator=g, dtype=torch.float64)
    for scale in (1.0, 1024.0):
        assert gb.gradient_penalty(D, real, fake, u, scale).item() == pytest.approx((norm - 1) ** 2, abs=1e-12)


def test_gradient_penalty_is_per_sample():
    """D(x) = |x|^2 / 2 has gradient x_hat, so the penalty is the batch mean of (|x_hat_i| - 1)^2, each norm over one
    sample (not over the batch); and the penalty passes gradients to D's parameters (create_graph)."""
    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, x):
            return self.a * x.flatten(1).square().sum(1) / 2

    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64), torch.zeros(5, 2, 4, 4, dtype=torch.float64)
    u = torch.rand(5, 1, 1, 1, generator=g, dtype=torch.float64)
    D = Quadratic()
    gp = gb.gradient_penalty(D, real, fake, u)
    norms = (u * real).flatten(1).norm(dim=1)
    assert gp.item() == pytest.approx(((norms - 1) ** 2).mean().item(), rel=1e-12)
    gp.backward()  # d/da mean (a |x_i| - 1)^2 = mean 2 (a |x_i| - 1) |x_i| at a = 1
    assert D.a.grad.item() == pytest.approx((2 * (norms - 1) * norms).mean().item(), rel=1e-12)


@pytest.mark.parametrize('policy', [['translation'], ['color'], ['cutout'], ['translation', 'color', 'cutout']])
def test_diff_augment_keeps_shapes_and_passes_gradients(policy):
    x = torch.randn(8, 3, 16, 16, requires_grad=True)
    y = gb.diff_augment(x, policy, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_translation_is_an_integer_shift_with_zero_fill_and_cutout_a_square():
    """Each translated image equals its input shifted by some (dy, dx) in [-S/8, S/8]^2, zeros shifted in; each cutout
    image equals its input with the pixels of one axis-aligned square of side at most S/2 zeroed."""
    S, r = 16, 2
    x = torch.rand(32, 2, S, S) + 1  # no zeros, so zeros in the output mark fill
    y = gb.diff_augment(x, ['translation'], torch.Generator().manual_seed(0))
    pad = nn.functional.pad(x, (r, r, r, r))
    for i in range(len(x)):
        assert any(torch.equal(y[i], pad[i, :, r + dy:r + dy + S, r + dx:r + dx + S])
                   for dy in range(-r, r + 1) for dx in range(-r, r + 1)), i
    y = gb.diff_augment(x, ['cutout'], torch.Generator().manual_seed(0))
    for i in range(len(x)):
        zero = (y[i] == 0).all(0)
        assert torch.equal(y[i][:, ~zero], x[i][:, ~zero]) and (y[i] == 0).any(0).equal(zero)
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        assert zero.sum() == len(rows) * len(cols) and len(rows) <= S // 2 and len(cols) <= S // 2  # a full rectangle


def test_mode_coverage_on_hand_made_points():
    """grid25 with 2,500 points: a mode counts from 20 points (20% of its uniform 100) within 3 std."""
    centres, std = gb.toy_modes('grid25')
    assert centres.shape == (25, 2) and std == 0.05 and set(centres[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    every = centres.repeat_interleave(100, 0)  # 100 points on each mode
    assert gb.mode_coverage(every, centres, std) == (25, 1.0)
    one = centres[7].expand(2500, 2)  # full collapse
    assert gb.mode_coverage(one, centres, std) == (1, 1.0)
    offset = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x = torch.cat([centres[0] + 2.9 * std * offset.expand(20, 2),  # 20 near mode 0: covered
                   centres[1] + 2.9 * std * offset.expand(19, 2),  # 19 near mode 1: too few
                   centres[2] + 3.1 * std * offset.expand(100, 2),  # 100 just outside 3 std of mode 2
                   torch.zeros(2361, 2, dtype=torch.float64) + 1.0])  # between modes (1, 1): near none
    modes, near = gb.mode_coverage(x, centres, std)
    assert modes == 1 and near == pytest.approx(39 / 2500)
    ring, std8 = gb.toy_modes('ring8')
    assert torch.allclose(ring.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64)) and std8 == 0.02
    assert gb.mode_coverage(ring.repeat(100, 1), ring, std8) == (8, 1.0)


@pytest.mark.parametrize('size, ch', [(16, 3), (32, 1), (64, 3)])
def test_networks_shapes(size, ch):
    c = gb.get_config(['--dataset', 'mnist' if ch == 1 else 'folder', '--image-size', str(size), '--channels', '8',
                       '--z-dim', '12', '--loss', 'wgan-gp', '--spectral-norm', 'true'])
    G, D = gb.make_models(c)
    x = G(torch.randn(5, 12))
    assert x.shape == (5, ch, size, size) and x.abs().max() <= 1 and D(x).shape == (5,)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())  # wgan-gp / spectral norm: none in the critic
    c = gb.get_config(['--dataset', 'grid25'])
    G, D = gb.make_models(c)
    assert c['z_dim'] == 2 and G(torch.randn(4, 2)).shape == (4, 2) and D(torch.randn(4, 2)).shape == (4,)


def test_slerp_keeps_the_norm_and_ends_at_the_endpoints():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 100, generator=g, dtype=torch.float64), torch.randn(3, 100, generator=g, dtype=torch.float64)
    z1 = z1 / z1.norm(dim=1, keepdim=True) * z0.norm(dim=1, keepdim=True)
    assert torch.allclose(gb.slerp(z0, z1, 0.0), z0) and torch.allclose(gb.slerp(z0, z1, 1.0), z1)
    assert torch.allclose(gb.slerp(z0, z1, 0.5).norm(dim=1), z0.norm(dim=1))
    assert ((z0 + z1) / 2).norm(dim=1).max() < 0.8 * z0.norm(dim=1).min()  # the linear midpoint's, about 1/sqrt(2)


TINY = ['--channels', '8', '--batch-size', '32', '--epochs', '2', '--n-samples', '10', '--log-every', '4',
        '--eval-samples', '20', '--device', 'cpu']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('mnist')))


def flags(data, out, *extra):
    return TINY + ['--data-dir', data, '--out-dir', str(out)] + list(extra)


def test_the_average_keeps_no_graph(data, tmp_path):
    check_the_average_keeps_no_graph(gb, flags(data, tmp_path, '--max-steps', '3', '--ema', '0.9'))


@pytest.mark.parametrize('loss', ['bce', 'wgan-gp'])
def test_train_resume_sample_only(loss, data, tmp_path, capsys):
    """16 D steps at once, and 8 + 8 with --resume: the same G, D, EMA and optimizer state; then samples.npz."""
    extra = ['--loss', loss, '--ema', '0.9']
    gb.main(flags(data, tmp_path / 'a', *extra))
    out = capsys.readouterr().out
    assert 'step 16/16' in out and 'img/s' in out and '20 training images | confident' in out
    assert 'eval | step 8 | epoch 1.00 | confident' in out and 'eval | step 16 | epoch 2.00' in out
    for f in ('ckpt.pt', 'samples.png', 'interpolation.png', 'fid.png', 'config.json', 'gan_baseline.py', 'classifier.pt'):
        assert (tmp_path / 'a' / f).exists(), f
    gb.main(flags(data, tmp_path / 'b', *extra, '--max-steps', '8', '--classifier', str(tmp_path / 'a' / 'classifier.pt')))
    gb.main(flags(data, tmp_path / 'b', *extra, '--resume', 'true', '--classifier', str(tmp_path / 'a' / 'classifier.pt')))
    wa, wb = (torch.load(tmp_path / p / 'ckpt.pt', weights_only=True) for p in 'ab')
    assert wa['step'] == wb['step'] == 16 and wa['script'] == 'gan_baseline.py' and len(wa['evals']) == 2
    for part in ('G', 'D', 'ema'):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    assert wa['opt_d']['state'][0]['step'].item() == 16
    assert wa['opt_g']['state'][0]['step'].item() == (16 if loss == 'bce' else 3)  # wgan-gp: a G step after every 5th D step
    capsys.readouterr()
    gb.main(flags(data, tmp_path / 'a', *extra, '--sample-only', 'true', '--n-samples', '12'))
    images = np.load(tmp_path / 'a' / 'samples.npz')['images']
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8  # MNIST cropped back from 32
    assert 'eval | step 16 | confident' in capsys.readouterr().out


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_process_group_saves_and_resumes_exactly(data, tmp_path, sig):
    argv = flags(data, tmp_path / 'stopped', '--epochs', '200', '--save-every', '1000')
    check_stop_signal_saves(os.path.join(HERE, 'gan_baseline.py'), argv, tmp_path / 'stopped' / 'ckpt.pt', 8, sig)
    check_resume_after_a_stop_is_exact(gb.main, argv, tmp_path / 'stopped', ('G', 'D', 'ema'))


def test_toy_run_counts_modes_and_writes_points(tmp_path, capsys):
    gb.main(['--dataset', 'ring8', '--toy-points', '1024', '--hidden', '32', '--epochs', '2', '--fid-every', '1',
             '--out-dir', str(tmp_path), '--loss', 'hinge', '--eval-samples', '400', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert '400 training points (the floor) | modes 8/8 | within 3 std' in out and 'eval | step 4 | epoch 1.00 | modes' in out
    gb.main(['--dataset', 'ring8', '--hidden', '32', '--loss', 'hinge', '--out-dir', str(tmp_path), '--sample-only', 'true',
             '--n-samples', '50', '--device', 'cpu'])
    points = np.load(tmp_path / 'samples.npz')['points']
    assert points.shape == (50, 2) and points.dtype == np.float32


def test_wgan_gp_under_compile(tmp_path, capsys):
    """torch.compile has no double backward: the penalty goes through the uncompiled critic, the rest is compiled."""
    gb.main(['--dataset', 'ring8', '--toy-points', '1024', '--hidden', '16', '--epochs', '2', '--loss', 'wgan-gp',
             '--compile', 'true', '--device', 'cpu', '--out-dir', str(tmp_path), '--eval-samples', '100', '--n-samples',
             '10', '--log-every', '8', '--fid-every', '0'])
    line = re.search(r'^step 8/8 \| d (\S+) \| g (\S+) \| gp (\S+) ', capsys.readouterr().out, re.M)
    assert line and all(math.isfinite(float(v)) for v in line.groups()) and ckpt_step(tmp_path / 'ckpt.pt') == 8


def test_float16_skipped_steps_are_the_scalers_not_a_divergence(data, tmp_path, capsys):
    """float16: the GradScaler starts at 2^16, so the penalty's input gradient overflows in the first steps; the
    scaler skips those (weights untouched, scale halved), and the boundary, which checks only the weights under
    float16, goes on (on a GPU the run had stopped: 'a loss is nan in steps 1-3'). CPU autocast has float16, so
    train() is called past main's CUDA-only check."""
    c = gb.get_config(flags(data, tmp_path, '--loss', 'wgan-gp', '--max-steps', '8', '--epochs', '5', '--log-every', '8'))
    c['dtype'] = 'float16'
    gb.train(c, torch.device('cpu'), 0, 1)
    assert 'step 8/8' in capsys.readouterr().out
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 8 and ckpt['scaler_d']['scale'] < 2 ** 16 and all(w.isfinite().all() for w in ckpt['G'].values())


def test_folder_bfloat16_wgan_gp_with_augmentation_and_a_stand_in_fid(tmp_path, capsys, monkeypatch):
    """An RGB folder at 16 pixels, bf16 autocast through the gradient penalty's double backward, spectral norm,
    DiffAugment; FID and IS through torch-fidelity with a stand-in for its Inception network (not on these
    machines)."""
    from PIL import Image
    os.makedirs(tmp_path / 'imgs' / 'sub')
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / 'imgs' / ('sub' if i % 2 else '')
                                                                                 / f'{i}.png')
    small_inception(monkeypatch, tmp_path)
    gb.main(['--dataset', 'folder', '--data-dir', str(tmp_path / 'imgs'), '--image-size', '16', '--dtype', 'bfloat16',
             '--loss', 'wgan-gp', '--spectral-norm', 'true', '--augment', 'translation,color,cutout', '--fid', '30',
             '--out-dir', str(tmp_path / 'run'), '--channels', '8', '--batch-size', '8', '--epochs', '2', '--n-samples', '4',
             '--device', 'cpu', '--workers', '1'])
    out = capsys.readouterr().out
    assert '40 folder images (3, 16, 16) | wgan-gp, 5 D step(s)' in out and 'bfloat16' in out and 'step 10/10' in out
    fid, isc = (float(out.split(f'| {k} ')[1].split()[0]) for k in ('fid', 'is'))
    assert fid > 0 and math.isfinite(fid) and 1 <= isc <= 3  # the stand-in's logits have 3 classes
    gb.main(['--dataset', 'folder', '--data-dir', str(tmp_path / 'imgs'), '--image-size', '16', '--out-dir',
             str(tmp_path / 'nofid'), '--channels', '8', '--batch-size', '8', '--epochs', '1', '--device', 'cpu', '--workers', '1'])
    assert 'step 5/5' in capsys.readouterr().out and (tmp_path / 'nofid' / 'samples.png').exists()  # was a traceback
    assert not (tmp_path / 'nofid' / 'fid.png').exists()  # nothing was measured, so no curve


def test_nothing_is_lost(data, tmp_path, monkeypatch, capsys):
    check_nothing_is_lost(gb.main, flags(data, tmp_path, '--max-steps', '4'), ['--channels', '16'], monkeypatch, capsys)


def test_fid_without_torch_fidelity_fails_before_training(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_fidelity', None)  # as if not installed: find_spec gives None
    with pytest.raises(SystemExit) as e:
        gb.main(flags(data, tmp_path, '--fid', '100'))
    assert 'pip install torch-fidelity' in str(e.value) and not (tmp_path / 'ckpt.pt').exists()


def test_torchrun_ddp_on_cpu(data, tmp_path):
    """Two processes with gloo, each half the batch, gradients averaged; rank 0 writes the checkpoint."""
    r = run_alone([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master-port=29523',
                   os.path.join(HERE, 'gan_baseline.py'), *flags(data, tmp_path, '--epochs', '1', '--loss', 'hinge')])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 process(es)' in r.stdout and ckpt_step(tmp_path / 'ckpt.pt') == 8


def test_gradients_are_averaged_over_ranks(tmp_path):
    """all_reduce_grads in a 2-process gloo group: each rank's gradient becomes the mean of both."""
    code = (f"import os, sys, torch, torch.distributed as dist; sys.path.insert(0, {HERE!r}); import gan_baseline as gb\n"
            "dist.init_process_group('gloo'); r = dist.get_rank(); m = torch.nn.Linear(3, 2)\n"
            "for p in m.parameters(): p.grad = torch.full_like(p, float(r + 1))\n"
            "gb.all_reduce_grads(m, 2); assert all(torch.equal(p.grad, torch.full_like(p, 1.5)) for p in m.parameters())\n"
            "dist.destroy_process_group()")
    (tmp_path / 'avg.py').write_text(code)
    r = run_alone([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master-port=29524',
                   str(tmp_path / 'avg.py')], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize('extra, says', [
    (['--image-size', '28'], 'mnist runs at 32 pixels'),
    (['--dataset', 'folder', '--image-size', '48'], '4 * 2^k pixels'),
    (['--saturating', 'true', '--loss', 'hinge'], 'a form of bce'),
    (['--augment', 'flip'], 'translation, color and cutout'),
    (['--dataset', 'grid25', '--augment', 'color'], 'for images, not points'),
    (['--dataset', 'grid25', '--fid', '100'], 'for images, not points'),
    (['--dtype', 'float16'], 'needs CUDA'),
    (['--resume', 'true'], 'no readable checkpoint'),
])
def test_bad_flags_exit_with_one_line(tmp_path, extra, says):
    with pytest.raises(SystemExit) as e:
        gb.main(['--out-dir', str(tmp_path / 'run'), '--device', 'cpu'] + extra)
    assert says in str(e.value) and '\n' not in str(e.value)


def test_missing_data_wrong_checkpoints_and_nan_loss(data, tmp_path, monkeypatch):
    for dataset, says in (('mnist', 'missing or damaged'), ('folder', 'no images')):  # (cifar10 would download 170 MB online)
        with pytest.raises(SystemExit) as e:
            gb.load_dataset(gb.get_config(['--dataset', dataset, '--data-dir', str(tmp_path / 'empty')]), dataset)
        assert says in str(e.value) and str(tmp_path / 'empty') in str(e.value) and '\n' not in str(e.value)
    gb.main(flags(data, tmp_path, '--epochs', '1', '--n-samples', '2'))
    with pytest.raises(SystemExit) as e:
        gb.main(flags(data, tmp_path, '--resume', 'true', '--loss', 'hinge'))
    assert "loss 'bce' (flag 'hinge')" in str(e.value)
    monkeypatch.setattr(gb, 'd_loss_fn', lambda kind, r, f: r.mean() * float('nan'))  # (Adam makes huge lr finite)
    with pytest.raises(SystemExit) as e:
        gb.main(flags(data, tmp_path, '--resume', 'true', '--epochs', '3'))
    msg = str(e.value)  # found at the next log
    assert msg.startswith('gan_baseline.py: d is nan') and 'in steps 9-12' in msg and 'holds step 8' in msg, msg
    assert ckpt_step(tmp_path / 'ckpt.pt') == 8  # the first run's, untouched
    check_foreign_and_broken_checkpoints(gb.main, flags(data, tmp_path, '--sample-only', 'true'), 'gan_baseline.py')


def test_unknown_flag_is_one_usage_error(capsys):
    check_unknown_flag(gb.get_config, capsys)


def test_a_truncated_mnist_file_is_named(tmp_path):
    check_truncated_mnist_is_named(lambda root: gb.load_dataset(gb.get_config(['--data-dir', root]), 'mnist'), tmp_path)
