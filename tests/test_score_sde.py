"""score_sde.py: the SDE marginals against simulating the forward SDE, the three samplers and the probability-flow
likelihood driven by the exact score of Gaussian data, the DSM loss at its minimum, the RK45 solver, the U-Net's
shapes, and tiny CPU runs of main() on synthetic digits in MNIST's file format. Monte Carlo checks allow Z
standard errors computed from the sample size, plus the sampler's own discretisation bias where it has one."""
import math
import os
import signal

import numpy as np
import pytest
import torch
from closed_form import (
    check_foreign_and_broken_checkpoints,
    check_nothing_is_lost,
    check_resume_after_a_stop_is_exact,
    check_stop_signal_saves,
    check_the_average_keeps_no_graph,
    check_torchrun_matches_one_process,
    check_truncated_mnist_is_named,
    check_unknown_flag,
    ckpt_step,
    write_mnist,
)

import score_sde as s

Z = 5
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDES = {'ve': s.SDE('ve', 25.0, 0.1, 20.0), 'vp': s.SDE('vp', 25.0, 0.1, 20.0)}


def gaussian_score(sde, mu, var):
    """The exact score of p_t for data N(mu, var I): -(x - m_t mu) / (m_t^2 var + std_t^2)."""
    def score_fn(x, t):
        m, std = s.marginal_mean_std(sde, t.double().view(-1, *[1] * (x.dim() - 1)))
        return (-(x - m * mu) / (m ** 2 * var + std ** 2)).float()
    return score_fn


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_marginals_match_the_simulated_forward_sde(kind):
    """20,000 paths from x0 = 0.7 with 2,000 Euler-Maruyama steps of dt = 5e-4 (g at the step's midpoint): the mean
    and std at t = 0.1, 0.5, 1 agree with marginal_mean_std. The scheme's own bias is O(dt): for VP the mean's
    relative error is about sum (beta dt / 2)^2 / 2 < 1e-4, far inside the Monte Carlo tolerance."""
    sde, n, dt, x0 = SDES[kind], 20_000, 5e-4, 0.7
    g = torch.Generator().manual_seed(0)
    x = torch.full((n,), x0, dtype=torch.float64)
    for i in range(2000):
        t = torch.tensor((i + 0.5) * dt, dtype=torch.float64)
        f, gt = s.drift_diffusion(sde, x, t)
        x = x + f * dt + gt * math.sqrt(dt) * torch.randn(n, generator=g, dtype=torch.float64)
        if i + 1 in (200, 1000, 2000):
            mean, std = s.marginal_mean_std(sde, torch.tensor((i + 1) * dt, dtype=torch.float64))
            assert abs(x.mean() - mean * x0) < Z * std / math.sqrt(n), (i, x.mean(), mean * x0)
            assert abs(x.std() / std - 1) < Z / math.sqrt(2 * n), (i, x.std(), std)


def test_vp_marginal_is_the_closed_form_integral():
    """log mean = -int_0^t beta / 2 (trapezoid on 10^5 points), std^2 = 1 - mean^2; VE std^2 = int sigma^2s."""
    t = torch.linspace(0, 0.8, 100_001, dtype=torch.float64)
    vp, ve = SDES['vp'], SDES['ve']
    beta = vp.beta_min + t * (vp.beta_max - vp.beta_min)
    mean, std = s.marginal_mean_std(vp, t[-1])
    assert math.isclose(mean.log().item(), -0.5 * torch.trapezoid(beta, t).item(), rel_tol=1e-9)
    assert math.isclose(std.item() ** 2, 1 - mean.item() ** 2, rel_tol=1e-12)
    assert math.isclose(s.marginal_mean_std(ve, t[-1])[1].item() ** 2, torch.trapezoid(25.0 ** (2 * t), t).item(), rel_tol=1e-8)
    assert s.prior_std(vp) == 1.0 and math.isclose(s.prior_std(ve), math.sqrt(624 / (2 * math.log(25))), rel_tol=1e-12)


def em_moments(sde, steps, eps, mu, var, start=None):
    """Mean and variance of em_sampler's output (no corrector) with the exact Gaussian score: each step is affine,
    x' = A x + b + c z, from x(1) ~ N(start) (default the prior N(0, prior_std^2)); the last step returns its mean."""
    m, v = start or (0.0, s.prior_std(sde) ** 2)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64).tolist()
    for i, (t, dt) in enumerate(zip(ts[:-1], np.diff(ts) * -1)):
        mt, std = (q.item() for q in s.marginal_mean_std(sde, torch.tensor(t, dtype=torch.float64)))
        V = mt ** 2 * var + std ** 2
        f_coef, g = (0.0, sde.sigma ** t) if sde.kind == 've' else (-0.5 * (sde.beta_min + t * (sde.beta_max - sde.beta_min)),
                                                                   math.sqrt(sde.beta_min + t * (sde.beta_max - sde.beta_min)))
        A, b = 1 - (f_coef + g * g / V) * dt, g * g * dt * mt * mu / V  # x - (f x - g^2 s(x)) dt
        m, v = A * m + b, A * A * v + (g * g * dt if i < steps - 1 else 0.0)
    return m, v


def target_moments(sde, eps, mu, var):
    """p_eps: the data's mean and variance at t = eps, where every sampler stops."""
    m, std = (q.item() for q in s.marginal_mean_std(sde, torch.tensor(eps, dtype=torch.float64)))
    return m * mu, m * m * var + std ** 2


@pytest.mark.parametrize('dev', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason='needs CUDA'))])
@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_euler_maruyama_with_exact_score(kind, dev):
    """4,000 samples of 16 pixels from N(0.3, 0.5^2): sample mean and variance equal the affine recursion's exact
    output moments within Z standard errors. Started from p_1 itself (no prior mismatch), that recursion's distance
    to p_eps halves as the steps double (weak order 1): the sampler converges to the reverse SDE's solution."""
    sde, mu, var, eps = SDES[kind], 0.3, 0.25, 1e-3
    x, nfe = s.em_sampler(gaussian_score(sde, mu, var), sde, (4000, 1, 4, 4), 500, eps, torch.Generator(dev).manual_seed(1),
                          dev)
    x = x.cpu()  # on CUDA the float32 steps round differently (about 1e-6 relative each), far inside the errors below
    m, v = em_moments(sde, 500, eps, mu, var)
    n = x.numel()
    assert nfe == 500
    assert abs(x.mean().item() - m) < Z * math.sqrt(v / n)
    assert abs(x.var().item() / v - 1) < Z * math.sqrt(2 / n)
    p_m, p_v = target_moments(sde, eps, mu, var)
    err = [em_moments(sde, k, eps, mu, var, target_moments(sde, 1.0, mu, var)) for k in (250, 500, 1000)]
    err = [abs(mk - p_m) + abs(vk - p_v) for mk, vk in err]
    assert 1.7 < err[0] / err[1] < 2.3 and 1.7 < err[1] / err[2] < 2.3, err


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_predictor_corrector_with_exact_score(kind):
    """PC at 500 steps: within Z standard errors of EM's exact moments, allowing the corrector's own bias: a Langevin
    step e = 2 snr^2 V (|z|^2 / |s|^2 ~ V) leaves N(m, V / (1 - snr^2)) invariant, 1.3% in std at snr 0.16."""
    sde, mu, var, eps, snr = SDES[kind], 0.3, 0.25, 1e-3, 0.16
    x, nfe = s.em_sampler(gaussian_score(sde, mu, var), sde, (4000, 1, 4, 4), 500, eps, torch.Generator().manual_seed(2),
                          corrector_snr=snr)
    m, v = em_moments(sde, 500, eps, mu, var)
    n, bias = x.numel(), 1 / math.sqrt(1 - snr ** 2) - 1
    assert nfe == 1000
    assert abs(x.mean().item() - m) < Z * math.sqrt(v / n)
    assert abs(x.std().item() / math.sqrt(v) - 1) < Z / math.sqrt(2 * n) + bias
    assert x.std().item() / math.sqrt(v) - 1 > -Z / math.sqrt(2 * n)  # the corrector can only widen


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_probability_flow_ode_with_exact_score(kind):
    """The exact flow is affine, x(eps) = m_eps mu + sqrt(V_eps / V_1) (x(1) - m_1 mu), so from the prior
    N(0, prior_std^2) x(eps) is N(m_eps mu - sqrt(V_eps / V_1) m_1 mu, V_eps / V_1 prior_std^2): the VE prior's
    missing mean shows up as a 5% smaller mean, which the samples must show too. The final denoising step
    (x + std^2 s) / m_eps is affine as well: x (1 - std^2 / V_eps) / m_eps + std^2 mu / V_eps."""
    sde, mu, var, eps = SDES[kind], 0.3, 0.25, 1e-3
    x, nfe = s.ode_sampler(gaussian_score(sde, mu, var), sde, (4000, 1, 4, 4), eps, 1e-5, torch.Generator().manual_seed(3))
    (m_e, v_e), (m_1, v_1) = (target_moments(sde, t, 1.0, var) for t in (eps, 1.0))
    scale, (mean_e, std_e) = math.sqrt(v_e / v_1), (q.item() for q in s.marginal_mean_std(sde, torch.tensor(eps)))
    A = (1 - std_e ** 2 / v_e) / mean_e
    m, v = A * (m_e - scale * m_1) * mu + std_e ** 2 * mu / v_e, A ** 2 * scale ** 2 * s.prior_std(sde) ** 2
    n = x.numel()
    assert 20 < nfe < 400
    assert abs(x.mean().item() - m) < Z * math.sqrt(v / n)
    assert abs(x.var().item() / v - 1) < Z * math.sqrt(2 / n)


def test_rk45_solves_known_odes_both_ways():
    """y' = cos(t) y from 0 to 3: y = exp(sin t); then back from 3 to 0 to the start. Error within a few tol."""
    for t0, t1 in ((0.0, 3.0), (3.0, 0.0)):
        y0 = torch.tensor([1.0, 2.0], dtype=torch.float64) * math.exp(math.sin(t0))
        y, nfe = s.rk45(lambda t, y: math.cos(t) * y, t0, t1, y0, 1e-8, 1e-8)
        np.testing.assert_allclose(y.numpy(), [math.exp(math.sin(t1)), 2 * math.exp(math.sin(t1))], rtol=1e-6)
        assert nfe % 6 == 1 and nfe < 600


def test_likelihood_of_gaussian_data_is_exact_within_the_hutchinson_error():
    """Data N(mu, Sigma) in 16 dims, Sigma not diagonal. With the exact score the ODE pushes the prior to a Gaussian
    model whose log-density at x is log N(x(1); 0, prior^2 I) + sum_k log sqrt(V_1k / V_eps,k) (V_t = m_t^2 Sigma +
    std_t^2 I, per eigenvector k). One Rademacher probe z per point estimates the log-det as z^T A z with
    A = (1/2) log(V_1 V_eps^-1): unbiased, variance 2 sum_{i != j} A_ij^2; the mean error over 200 points must be
    within Z of its standard error, plus the solver's tolerance."""
    sde, D, n, eps = SDES['vp'], 16, 200, 1e-5
    g = torch.Generator().manual_seed(4)
    W = torch.randn(D, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    Sigma, mu = 0.1 * torch.eye(D, dtype=torch.float64) + W @ W.T * 0.3, torch.randn(D, generator=g, dtype=torch.float64) * 0.3
    lam, Q = torch.linalg.eigh(Sigma)

    def V_of(t):  # eigenvalues of V_t, and m_t
        m, std = (q.item() for q in s.marginal_mean_std(sde, torch.tensor(t, dtype=torch.float64)))
        return m * m * lam + std ** 2, m

    def score_fn(x, t):
        lam_t, m = V_of(t[0].item())
        return (-((x.double() - m * mu) @ Q / lam_t) @ Q.T).float()
    x = mu + (torch.randn(n, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(Sigma).T)
    (v_e, m_e), (v_1, m_1) = V_of(eps), V_of(1.0)
    x1 = m_1 * mu + (((x - m_e * mu) @ Q) * (v_1 / v_e).sqrt()) @ Q.T
    exact = s.prior_logp(sde, x1) + 0.5 * (v_1 / v_e).log().sum()
    logp, nfe = s.ode_log_likelihood(score_fn, sde, x.float(), eps, 1e-5, torch.Generator().manual_seed(5))
    A = Q @ torch.diag(0.5 * (v_1 / v_e).log()) @ Q.T
    se = math.sqrt(2 * (A.square().sum() - A.diag().square().sum()).item() / n)
    assert abs((logp.double() - exact).mean().item()) < Z * se + 1e-3 * D, (logp.mean(), exact.mean(), se)
    assert se > 0.02  # the probe's error is real here: Sigma's off-diagonal part makes z^T A z vary
    assert nfe < 1000


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_bits_per_dim_offset_makes_a_uniform_density_8_bits(kind, monkeypatch):
    """A density uniform on the data range, (1 / width)^D, is 8 bits/dim on 8-bit data in either convention:
    log2(width) + log2(256 / width). This checks the offset (8 for [0, 1], 7 for [-1, 1])."""
    c = s.get_config(['--sde', kind])
    lo, hi = s.data_range(c)
    monkeypatch.setattr(s, 'ode_log_likelihood', lambda score_fn, sde, x, *a: (
        torch.full((len(x),), -x[0].numel() * math.log(hi - lo)), 7))
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    bpd, nfe = s.bits_per_dim(None, s.make_sde(c), images, c)
    np.testing.assert_allclose(bpd.numpy(), 8.0, rtol=1e-6)


@pytest.mark.parametrize('kind', ['ve', 'vp'])
def test_dsm_loss_at_the_exact_score_is_its_minimum(kind):
    """For data N(mu, s^2): E|std s*(x_t) + z|^2 per pixel = m^2 s^2 / (m^2 s^2 + std^2) (what the conditional score's
    variance leaves), and a score off by a constant c costs std^2 c^2 more. 20,000 samples of 8 pixels per t; the
    tolerance is Z standard errors of the per-sample losses."""
    sde, mu, var, n = SDES[kind], 0.3, 0.25, 20_000
    g = torch.Generator().manual_seed(6)
    score = gaussian_score(sde, mu, var)
    for t_val in (0.01, 0.2, 0.6, 1.0):
        x0 = mu + math.sqrt(var) * torch.randn(n, 1, 2, 4, generator=g)
        z, t = torch.randn(n, 1, 2, 4, generator=g), torch.full((n,), t_val)
        m, std = (q.item() for q in s.marginal_mean_std(sde, torch.tensor(t_val, dtype=torch.float64)))
        for c, extra in ((0.0, 0.0), (0.5 / std, 0.25)):
            loss = s.dsm_loss(lambda x, tt, c=c: score(x, tt) + c, sde, x0, t, z).double()
            expect = m * m * var / (m * m * var + std ** 2) + extra
            assert abs(loss.mean().item() - expect) < Z * loss.std().item() / math.sqrt(n), (t_val, c, loss.mean(), expect)


@pytest.mark.parametrize('flags, shape', [([], (3, 1, 28, 28)), (['--dataset', 'cifar10'], (2, 3, 32, 32)),
                                          (['--dataset', 'folder', '--image-size', '96'], (1, 3, 96, 96)),
                                          (['--preset', 'gpu', '--dataset', 'cifar10'], (1, 3, 32, 32))])
def test_unet_shapes_and_saved_fourier_features(flags, shape):
    c = s.get_config(flags)
    s.check_config(c)
    model = s.make_model(c)
    out = s.score_model(model, s.make_sde(c))(torch.randn(shape), torch.rand(shape[0]))
    assert out.shape == shape and 'freqs' in model.state_dict()


# ---- tiny runs of main() ----
TINY = ['--channels', '16', '--batch-size', '32', '--epochs', '2', '--n-samples', '10', '--log-every', '4', '--warmup', '2',
        '--steps', '5', '--ode-tol', '1e-2', '--eval-samples', '20', '--likelihood-images', '4', '--device', 'cpu']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('mnist')))


def flags(data, out, *extra):
    return TINY + ['--data-dir', data, '--out-dir', str(out)] + list(extra)


def test_nothing_is_lost(data, tmp_path, monkeypatch, capsys):
    check_nothing_is_lost(s.main, flags(data, tmp_path, '--max-steps', '4'), ['--channels', '32'], monkeypatch, capsys)


def test_the_average_keeps_no_graph(data, tmp_path):
    check_the_average_keeps_no_graph(s, flags(data, tmp_path, '--max-steps', '3'))


def test_train_resume_sample_only_eval(data, tmp_path, capsys):
    """16 steps at once, and 8 + 8 with --resume: the same weights; then samples.npz and every sampler's eval line."""
    s.main(flags(data, tmp_path / 'a'))
    out = capsys.readouterr().out
    assert 'step 16/16' in out and 'img/s' in out
    for f in ('ckpt.pt', 'samples.png', 'loss.png', 'config.json', 'score_sde.py'):
        assert (tmp_path / 'a' / f).exists(), f
    s.main(flags(data, tmp_path / 'b', '--max-steps', '8'))
    s.main(flags(data, tmp_path / 'b', '--resume', 'true'))
    wa, wb = (torch.load(tmp_path / p / 'ckpt.pt', weights_only=True) for p in 'ab')
    assert wa['step'] == wb['step'] == 16 and wa['script'] == 'score_sde.py'
    for k in wa['model']:
        assert torch.equal(wa['model'][k], wb['model'][k]) and torch.equal(wa['ema'][k], wb['ema'][k]), k
    capsys.readouterr()
    s.main(flags(data, tmp_path / 'a', '--sample-only', 'true', '--sampler', 'ode', '--n-samples', '12', '--eval', 'true'))
    out = capsys.readouterr().out
    images = np.load(tmp_path / 'a' / 'samples.npz')['images']
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    for line in ('em 5 steps | NFE 5 |', 'em 10 steps | NFE 10 |', 'pc 5 steps | NFE 10 |', 'ode rk45 tol 0.01 | NFE',
                 '20 training images | confident', 'eval | judge'):
        assert line in out, line
    bpd = float(out.split('bits/dim on 4 test images ')[1].split()[0])
    assert 0 < bpd < 30
    for m in ('em', 'em2', 'pc', 'ode'):
        assert (tmp_path / 'a' / f'samples_{m}.png').exists()


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_process_group_saves_and_resumes_exactly(data, tmp_path, sig):
    argv = flags(data, tmp_path / 'stopped', '--epochs', '200', '--save-every', '1000')
    check_stop_signal_saves(os.path.join(HERE, 'score_sde.py'), argv, tmp_path / 'stopped' / 'ckpt.pt', 8, sig)
    check_resume_after_a_stop_is_exact(s.main, argv, tmp_path / 'stopped', ('model', 'ema'))


def test_vp_folder_bfloat16_run(tmp_path, capsys):
    """An image folder (RGB, nested, resized to 16) with the VP SDE and bf16 autocast: data in [-1, 1]."""
    from PIL import Image
    os.makedirs(tmp_path / 'imgs' / 'sub')
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / 'imgs' / ('sub' if i % 2 else '')
                                                                                 / f'{i}.png')
    s.main(['--dataset', 'folder', '--data-dir', str(tmp_path / 'imgs'), '--image-size', '16', '--sde', 'vp', '--dtype',
            'bfloat16', '--out-dir', str(tmp_path / 'run'), '--channels', '16', '--batch-size', '8', '--epochs', '1',
            '--n-samples', '4', '--steps', '3', '--sampler', 'em', '--device', 'cpu', '--workers', '1'])
    out = capsys.readouterr().out
    assert '40 folder images (3, 16, 16) in [-1, 1] | vp SDE' in out and 'bfloat16' in out and 'step 5/5' in out


def test_torchrun_two_processes_train_the_same_model_as_one(data, tmp_path):
    run = TINY + ['--data-dir', data, '--max-steps', '5', '--log-every', '1', '--n-samples', '2']
    check_torchrun_matches_one_process(os.path.join(HERE, 'score_sde.py'), run, tmp_path, 29521, 5)


@pytest.mark.parametrize('extra, says', [
    (['--image-size', '32'], 'mnist images are 28 pixels'),
    (['--dataset', 'folder', '--image-size', '30'], 'must halve'),
    (['--sigma', '0.5'], '--sigma must exceed 1'),
    (['--eval-samplers', 'em,rk4'], '--eval-samplers'),
    (['--dtype', 'float16'], 'needs CUDA'),
    (['--resume', 'true'], 'no readable checkpoint'),
])
def test_bad_flags_exit_with_one_line(tmp_path, extra, says):
    with pytest.raises(SystemExit) as e:
        s.main(['--out-dir', str(tmp_path / 'run'), '--device', 'cpu'] + extra)
    assert says in str(e.value) and '\n' not in str(e.value)


def test_missing_or_bad_data_wrong_checkpoints_and_nan_loss(data, tmp_path):
    for dataset, says in (('mnist', 'missing or damaged'), ('folder', 'no images')):  # (cifar10 would download 170 MB online)
        with pytest.raises(SystemExit) as e:
            s.load_dataset(s.get_config(['--dataset', dataset, '--data-dir', str(tmp_path / 'empty')]), dataset)
        assert says in str(e.value) and str(tmp_path / 'empty') in str(e.value) and '\n' not in str(e.value)
    s.main(flags(data, tmp_path, '--epochs', '1', '--n-samples', '2'))
    with pytest.raises(SystemExit) as e:
        s.main(flags(data, tmp_path, '--resume', 'true', '--sde', 'vp'))
    assert "sde 've' (flag 'vp')" in str(e.value)
    with pytest.raises(SystemExit) as e:
        s.main(flags(data, tmp_path, '--resume', 'true', '--epochs', '3', '--lr', '1e30', '--warmup', '0', '--grad-clip', '0'))
    assert 'loss is' in str(e.value) and 'holds step 8' in str(e.value)
    assert ckpt_step(tmp_path / 'ckpt.pt') == 8  # the first run's, untouched
    check_foreign_and_broken_checkpoints(s.main, flags(data, tmp_path, '--sample-only', 'true'), 'score_sde.py')


def test_unknown_flag_is_one_usage_error(capsys):
    check_unknown_flag(s.get_config, capsys)


def test_a_truncated_mnist_file_is_named(tmp_path):
    check_truncated_mnist_is_named(lambda root: s.load_dataset(s.get_config(['--data-dir', root]), 'mnist'), tmp_path)
