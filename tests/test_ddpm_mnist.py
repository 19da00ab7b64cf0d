"""ddpm_mnist.py: the schedule, posterior, ELBO terms and samplers against independent float64 math, the
U-Net's shapes, and tiny CPU runs of main() on a few hundred synthetic digits written in MNIST's own
file format (so torchvision's loader runs): checkpoint, exact resume after SIGKILL, SIGINT and SIGTERM,
DDP equivalence, bad input.
Monte Carlo checks allow Z standard errors computed from the sample size."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from closed_form import (
    check_foreign_and_broken_checkpoints,
    check_nothing_is_lost,
    check_posterior_is_bayes,
    check_q_sample_is_iterated_chain,
    check_resume_after_a_stop_is_exact,
    check_stop_signal_saves,
    check_the_average_keeps_no_graph,
    check_torchrun_matches_one_process,
    check_truncated_mnist_is_named,
    check_unknown_flag,
    ckpt_step,
    exact_sampler_moments,
    write_mnist,
)

import ddpm_mnist as d

Z = 5
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('schedule', ['cosine', 'linear'])
def test_q_sample_equals_iterated_chain(schedule):
    """mean_t = sqrt(1 - beta_t) mean_{t-1}, var_t = (1 - beta_t) var_{t-1} + beta_t from (x0, 0)."""
    check_q_sample_is_iterated_chain(d, d.make_betas(d.get_config(['--schedule', schedule, '--timesteps', '300'])))


@pytest.mark.parametrize('t', [0, 1, 500, 999])
def test_posterior_is_bayes(t):
    """q(x_{t-1} | x_t, x0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x0."""
    check_posterior_is_bayes(d, d.cosine_betas(1000), t)


def test_cosine_schedule_identities():
    """abar(0) = 1, abar(T) = 0, decreasing; the betas reproduce abar until the clip at 0.999 (only near T)."""
    T = 1000
    alphas_cumprod, betas = d.cosine_alphas_cumprod(T), d.cosine_betas(T)
    assert alphas_cumprod[0] == 1 and alphas_cumprod[-1] < 1e-30 and (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert betas.max() == 0.999 and (betas[:-1] < 0.999).all() and (betas > 0).all()
    np.testing.assert_allclose(torch.cumprod(1 - betas, 0)[:-1].numpy(), alphas_cumprod[1:-1].numpy(), rtol=1e-10)


def test_v_and_eps_outputs_give_the_same_x0():
    alphas_cumprod = torch.cumprod(1 - d.cosine_betas(100), 0)[:-1, None]
    x0, eps = torch.randn(99, 3, dtype=torch.float64), torch.randn(99, 3, dtype=torch.float64)
    xt, v = d.q_sample(x0, alphas_cumprod, eps), alphas_cumprod.sqrt() * eps - (1 - alphas_cumprod).sqrt() * x0
    for out, pred in ((eps, 'eps'), (v, 'v')):
        got_x0, got_eps = d.x0_eps_from_output(xt, out, alphas_cumprod, pred)
        np.testing.assert_allclose(got_x0.numpy(), x0.numpy(), atol=1e-6)
        np.testing.assert_allclose(got_eps.numpy(), eps.numpy(), atol=1e-9)


@pytest.mark.parametrize('min_snr', [0.0, 5.0])
def test_loss_weight_is_min_snr_in_x0_terms(min_snr):
    """An x0_hat off by delta costs w |eps - eps_hat|^2 = SNR w delta^2 (eps) or (SNR + 1) w delta^2 (v): with
    min-SNR weighting both come to min(SNR, gamma) delta^2, without it to SNR and SNR + 1 times delta^2."""
    alphas_cumprod = torch.cumprod(1 - d.cosine_betas(1000), 0)[:-1, None].double()
    x0, eps, delta = torch.randn(999, 1, dtype=torch.float64), torch.randn(999, 1, dtype=torch.float64), 0.1
    xt, snr = d.q_sample(x0, alphas_cumprod, eps), alphas_cumprod / (1 - alphas_cumprod)
    for pred in ('eps', 'v'):
        target = eps if pred == 'eps' else alphas_cumprod.sqrt() * eps - (1 - alphas_cumprod).sqrt() * x0
        # the output that predicts x0 + delta at this x_t: invert x0_eps_from_output for that x0
        a, b = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
        out = (xt - a * (x0 + delta)) / b if pred == 'eps' else (a * xt - (x0 + delta)) / b
        cost = d.loss_weight(alphas_cumprod, pred, min_snr) * (out - target).square()
        want = snr.clamp(max=min_snr) if min_snr else snr + (pred == 'v')
        np.testing.assert_allclose(cost.numpy(), (want * delta ** 2).numpy(), rtol=1e-6)


def judge_figures(f, logits, f_test):
    """The MNIST judge's figures of features f and logits against test features f_test, its network stood in for."""
    judge = d.Judge.__new__(d.Judge)
    judge.features, judge.floor = (lambda images: (f, logits.softmax(1))), {}
    judge.test = f_test.mean(0), torch.cov(f_test.T)
    return judge(None)


def test_digit_figures():
    """Confident one-hot logits of balanced classes: all confident, KL 0; all one class: KL log 10; flat: none."""
    f = torch.randn(30, 4, dtype=torch.float64)
    balanced = judge_figures(f, 20 * torch.eye(10).repeat(3, 1), f)
    assert (balanced['confident'], balanced['kl']) == pytest.approx((1.0, 0.0), abs=1e-6)
    one_class = torch.zeros(30, 10).index_fill_(1, torch.tensor([3]), 20.0)
    assert judge_figures(f, one_class, f)['kl'] == pytest.approx(math.log(10))
    assert judge_figures(f, torch.zeros(30, 10), f)['confident'] == 0


def test_ddim_with_eta_1_on_all_steps_is_ddpm():
    """Song et al.: eta = 1 on the full schedule gives sigma_t^2 = beta_tilde_t and the posterior mean, so
    with the same noise the two samplers walk the same path."""
    betas = d.cosine_betas(50)
    model = lambda x, t: torch.tanh(x) * (1 + t[:, None, None, None] / 50)  # any deterministic eps_theta
    a = d.sample(model, (4, 1, 28, 28), betas, 0, 'ddpm', 'beta_tilde', generator=torch.Generator().manual_seed(0))[0]
    b = d.sample(model, (4, 1, 28, 28), betas, 0, 'ddim', eta=1.0, generator=torch.Generator().manual_seed(0))[0]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_discretized_gaussian_is_a_distribution_over_256_levels():
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in ((0.0, 0.01), (0.3, 0.2), (-0.99, 1e-3), (0.5, 5.0), (3.0, 0.5), (0.0, 1e-4)):
        logp = d.discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64),
                                                     torch.tensor(std, dtype=torch.float64))
        assert math.isclose(logp.exp().sum().item(), 1.0, rel_tol=1e-9), (mean, std)
    # a narrow Gaussian on a level puts nearly all its mass there: Phi(1/255 / std) - Phi(-1/255 / std)
    logp = d.discretized_gaussian_log_likelihood(levels[100], levels[100], torch.tensor(0.002, dtype=torch.float64))
    assert math.isclose(logp.exp().item(), math.erf(1 / 255 / 0.002 / math.sqrt(2)), rel_tol=1e-9)


def test_normal_kl_against_torch_distributions():
    m1, v1, m2, v2 = torch.randn(4, 50, dtype=torch.float64).unbind()
    v1, v2 = v1.exp(), v2.exp()
    want = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()), torch.distributions.Normal(m2, v2.sqrt()))
    np.testing.assert_allclose(d.normal_kl(m1, v1, m2, v2).numpy(), want.numpy(), rtol=1e-10)


@pytest.mark.parametrize('flags', [[], ['--patch', '1', '--channel-mults', '1,2,2', '--res-blocks', '2', '--attn-res', '14,7'],
                                   ['--patch', '4', '--channel-mults', '1', '--attn-res', ''],
                                   ['--preset', 'gpu', '--channels', '16']])
def test_unet_output_shape(flags):
    c = d.get_config(flags)
    d.check_config(c)
    model = d.make_model(c)
    with torch.no_grad():
        assert model(torch.randn(3, 1, 28, 28), torch.tensor([0, 5, 999])).shape == (3, 1, 28, 28)


MU, STD = 0.1, 0.25


def exact_moments(betas, steps, method):
    return exact_sampler_moments(betas, steps, method, MU, STD)


CUDA = pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA'))


@pytest.mark.parametrize('dev', ['cpu', CUDA])
@pytest.mark.parametrize('method, steps', [('ddpm', 0), ('ddim', 20)])
def test_sampler_with_exact_eps_reproduces_gaussian_data(method, steps, dev):
    """Every pixel an independent N(MU, STD^2): 64 images of 784 pixels are n = 50,176 draws; the mean's
    standard error is sqrt(var / n), the variance's var sqrt(2 / n). Clipping x0 to [-1, 1] acts beyond 3.6 STD,
    below both. On CUDA the float32 arithmetic rounds differently (about 1e-6 relative a step), far inside both."""
    betas = d.cosine_betas(100)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(dev)

    def eps_star(x, t):
        a = alphas_cumprod[t[0]]
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD ** 2 + 1 - a)
    x = d.sample(eps_star, (64, 1, 28, 28), betas, steps, method, 'beta_tilde', generator=torch.Generator(dev).manual_seed(1),
                 device=dev)[0].cpu()
    m, v = exact_moments(betas.double(), steps, method)
    n = x.numel()
    assert abs(x.mean().item() - m) < Z * math.sqrt(v / n), (x.mean(), m)
    assert abs(x.var().item() - v) < Z * v * math.sqrt(2 / n), (x.var(), v)
    # the chain itself is the data's up to a first-order discretisation error in the variance: -12% for DDPM
    # at T = 100, falling ~1/T; for DDIM ~1/steps (-22% at 20 steps, -10% at 50)
    assert abs(m - MU) < 1e-3, m
    if method == 'ddpm':
        bias = [exact_moments(d.cosine_betas(k).double(), 0, 'ddpm')[1] / STD ** 2 - 1 for k in (100, 1000)]
        assert -0.15 < bias[0] < 0 and 0 < bias[1] / bias[0] < 0.2, bias
    else:
        bias = [exact_moments(betas.double(), k, 'ddim')[1] / STD ** 2 - 1 for k in (20, 50)]
        assert -0.3 < bias[0] < 0 and 0.3 < bias[1] / bias[0] < 0.6, bias


def test_frechet_distance_of_gaussians():
    """Frechet distance of N(0, I) and N(mu, s^2 I) in D dims: |mu|^2 + D (1 - s)^2; from 20,000 draws in 4 dims
    the plug-in estimate is within a few 1e-3 (its bias is ~ D^2 / n)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20_000, 4, generator=g, dtype=torch.float64), torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    frechet = lambda a, b: judge_figures(a, torch.zeros(len(a), 10), b)['frechet']
    assert abs(frechet(a, 0.5 * b + 1.0) - (4 * 1.0 + 4 * 0.25)) < 0.05
    assert frechet(a, b) < 0.01


# ---- tiny runs of main() ----
TINY = ['--channels', '16', '--timesteps', '20', '--sample-steps', '5', '--batch-size', '32', '--epochs', '2',
        '--n-samples', '10', '--log-every', '4', '--warmup', '2', '--device', 'cpu']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('mnist')))


def flags(data, out, *extra):
    return TINY + ['--data-dir', data, '--out-dir', str(out)] + list(extra)


def test_nothing_is_lost(data, tmp_path, monkeypatch, capsys):
    check_nothing_is_lost(d.main, flags(data, tmp_path, '--max-steps', '4'), ['--channels', '32'], monkeypatch, capsys)


def test_the_average_keeps_no_graph(data, tmp_path):
    check_the_average_keeps_no_graph(d, flags(data, tmp_path, '--max-steps', '3'))


def test_train_checkpoint_sample_only(data, tmp_path, capsys):
    d.main(flags(data, tmp_path))
    out = capsys.readouterr().out
    assert 'step 16/16' in out and 'img/s' in out
    for f in ('ckpt.pt', 'samples.png', 'reverse.png', 'loss.png', 'config.json', 'ddpm_mnist.py'):
        assert (tmp_path / f).exists(), f
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 16 and ckpt['script'] == 'ddpm_mnist.py'
    assert set(ckpt) >= {'model', 'ema', 'optimizer', 'scaler', 'config', 'epoch'}
    d.main(flags(data, tmp_path, '--sample-only', 'true', '--sampler', 'ddim', '--sample-steps', '5', '--n-samples', '12'))
    images = np.load(tmp_path / 'samples.npz')['images']
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8


def run_script(*args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=HERE)
    return subprocess.Popen([sys.executable, os.path.join(HERE, 'ddpm_mnist.py'), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_is_exact(data, tmp_path):
    """One run of 24 steps, and one killed (SIGKILL) after its first checkpoint then resumed: same weights."""
    full = run_script(*flags(data, tmp_path / 'a', '--epochs', '3', '--n-samples', '2'))
    assert full.wait() == 0, full.stderr.read()
    b = tmp_path / 'b'
    proc = run_script(*flags(data, b, '--epochs', '3', '--n-samples', '2', '--save-every', '2'))
    while ckpt_step(b / 'ckpt.pt') < 2:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt_step(b / 'ckpt.pt')
    assert 2 <= killed_at < 24  # the kill came mid-run, and the last checkpoint survived it
    resumed = run_script(*flags(data, b, '--epochs', '3', '--n-samples', '2', '--resume', 'true'))
    assert resumed.wait() == 0, resumed.stderr.read()
    wa, wb = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (tmp_path / 'a', b))
    assert wa['step'] == wb['step'] == 24
    for k in wa['model']:
        assert torch.equal(wa['model'][k], wb['model'][k]) and torch.equal(wa['ema'][k], wb['ema'][k]), k


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_process_group_saves_and_resumes_exactly(data, tmp_path, sig):
    argv = flags(data, tmp_path / 'stopped', '--epochs', '200', '--save-every', '1000')
    check_stop_signal_saves(os.path.join(HERE, 'ddpm_mnist.py'), argv, tmp_path / 'stopped' / 'ckpt.pt', 8, sig)
    check_resume_after_a_stop_is_exact(d.main, argv, tmp_path / 'stopped', ('model', 'ema'))


def test_torchrun_two_processes_train_the_same_model_as_one(data, tmp_path):
    run = TINY + ['--data-dir', data, '--max-steps', '5', '--log-every', '1', '--n-samples', '2']
    check_torchrun_matches_one_process(os.path.join(HERE, 'ddpm_mnist.py'), run, tmp_path, 29517, 5)


def test_resume_and_sample_only_continue_the_checkpoints_run(data, tmp_path, capsys):
    """--resume true with only where to find the run takes the checkpoint's config (bfloat16, its lr, its TINY
    network), applies just the flags given and prints each change; config.json is the continued run's. A new
    --sample-only needs no network flags either."""
    d.main(flags(data, tmp_path, '--dtype', 'bfloat16', '--lr', '1e-3', '--max-steps', '4', '--n-samples', '2'))
    where = ['--out-dir', str(tmp_path), '--device', 'cpu', '--data-dir', data]
    capsys.readouterr()
    d.main(where + ['--resume', 'true', '--max-steps', '6', '--epochs', '3'])
    out = capsys.readouterr().out
    assert f"continuing {tmp_path / 'ckpt.pt'} (step 4); changed flags: --epochs 2 -> 3, " \
           '--max-steps 4 -> 6\n' in out, out
    assert 'dtype bfloat16 |' in out, out  # the run's dtype, not the default
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    want = d.get_config(flags(data, tmp_path, '--dtype', 'bfloat16', '--lr', '1e-3', '--max-steps', '6', '--epochs', '3',
                              '--n-samples', '2'))
    assert ckpt['step'] == 6 and ckpt['config'] == want | {'resume': True}, ckpt['config']
    assert json.loads((tmp_path / 'config.json').read_text()) == ckpt['config']
    d.main(where + ['--sample-only', 'true', '--n-samples', '3'])
    assert 'continuing' in capsys.readouterr().out and np.load(tmp_path / 'samples.npz')['images'].shape[0] == 3


def test_auto_dtype_is_bfloat16_only_where_native(tmp_path, capsys):
    """--dtype auto (the default): bfloat16 on a CPU whose cpuinfo lists avx512_bf16 or amx_bf16, float32 on the
    others (autocast emulates bf16 there, 10x slower) and without a cpuinfo; the run says what it chose.
    (bfloat16 itself runs on the CPU in test_resume_and_sample_only_continue_the_checkpoints_run.)"""
    info, cpu = tmp_path / 'cpuinfo', torch.device('cpu')
    for listed, native in (('fma avx2', False), ('avx2 avx512f avx512_bf16', True), ('avx2 amx_bf16 amx_tile', True),
                           ('avx2 avx512_bf16x', False)):
        info.write_text(f'processor\t: 0\nflags\t\t: {listed}\n')
        assert d.native_bf16(cpu, str(info)) == native, listed
    assert not d.native_bf16(cpu, str(tmp_path / 'none'))
    c = d.get_config(['--device', 'cpu', '--out-dir', str(tmp_path / 'run')])
    assert c['dtype'] == 'auto'
    d.setup(c)
    here = d.native_bf16(cpu)
    assert c['dtype'] == ('bfloat16' if here else 'float32')
    assert f"device cpu | dtype {c['dtype']} | output" in capsys.readouterr().out


def test_eval_prints_its_figures(data, tmp_path, capsys):
    d.main(flags(data, tmp_path, '--epochs', '1', '--eval', 'true', '--eval-samples', '20', '--elbo-images', '4'))
    out = capsys.readouterr().out
    assert 'eval | judge' in out and 'test accuracy' in out and 'KL(classes || uniform)' in out and 'x floor' in out and 'bits/dim' in out
    assert '20 samples (ddim 5 steps' in out and '20 training images | confident' in out
    bpd = float(out.split('test images ')[1].split()[0])
    assert 0 < bpd < 50


@pytest.mark.parametrize('extra, says', [
    (['--channel-mults', '1,2,2,2', '--patch', '1'], 'cannot halve 28 pixels 3 times'),
    (['--sample-steps', '50', '--sampler', 'ddpm'], '--sampler ddim'),
    (['--patch', '3'], '--patch must divide 28'),
    (['--dtype', 'float16'], 'needs CUDA'),
    (['--resume', 'true'], 'no readable checkpoint'),
])
def test_bad_flags_exit_with_one_line(tmp_path, extra, says):
    with pytest.raises(SystemExit) as e:
        d.main(['--out-dir', str(tmp_path / 'run'), '--device', 'cpu'] + extra)
    assert says in str(e.value) and '\n' not in str(e.value)


def test_missing_data_wrong_and_other_checkpoints(data, tmp_path):
    empty = tmp_path / 'empty'
    with pytest.raises(SystemExit) as e:
        d.load_dataset(d.get_config(['--data-dir', str(empty)]), 'mnist')
    assert f'mnist under {empty} is missing or damaged' in str(e.value)
    d.main(flags(data, tmp_path, '--epochs', '1', '--n-samples', '2'))
    with pytest.raises(SystemExit) as e:
        d.main(flags(data, tmp_path, '--resume', 'true', '--channels', '24'))
    assert 'channels 16 (flag 24)' in str(e.value)
    check_foreign_and_broken_checkpoints(d.main, flags(data, tmp_path, '--sample-only', 'true'), 'ddpm_mnist.py')


def test_unknown_flag_is_one_usage_error(capsys):
    check_unknown_flag(d.get_config, capsys)


def test_a_truncated_mnist_file_is_named(tmp_path):
    check_truncated_mnist_is_named(lambda root: d.load_dataset(d.get_config(['--data-dir', root]), 'mnist'), tmp_path)
