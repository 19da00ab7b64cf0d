"""ddpm_1d.py against independent float64 math (numpy and plain floats), then a short run of main().

Monte Carlo checks allow Z standard errors, the standard error computed from the sample size and
the true moments: a mean's is s/sqrt(n); a std's is sqrt(mu4 - s^4) / (2 s sqrt(n)), which is
s/sqrt(2n) for a Gaussian. With Z = 5 a correct implementation fails a single check with
probability 6e-7, and all of this file's ~800 checks together with under 1e-3; the seeds
are fixed, so a run is reproducible either way.
"""
import json
import math
import re

import numpy as np
import pytest
import torch
from closed_form import full_disk

import ddpm_1d as d

Z = 5
T, BETA_START, BETA_END = 50, 0.02, 0.3
f64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
DATA = {'gauss': (f64(1.0), f64(3.0), f64(0.5)), 'mixture': (f64(0.7, 0.3), f64(3.0, -1.0), f64(0.5, 0.3))}


def np_schedule():
    """betas, alphas_cumprod indexed by t = 0..T, built with plain float loops (beta_0 = 0)."""
    betas = [0.0] + [BETA_START + (BETA_END - BETA_START) * i / (T - 1) for i in range(T)]
    alphas_cumprod, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        alphas_cumprod.append(prod)
    return np.array(betas), np.array(alphas_cumprod)


def torch_schedule():
    betas = d.linear_betas(T, BETA_START, BETA_END)
    return betas, torch.cumprod(1 - betas, 0)


def true_marginals(w, m, p):
    """(T+1,) mean, std and fourth central moment of the mixture q(x_t), from the component moments."""
    _, alphas_cumprod = np_schedule()
    w, m, p = w.numpy(), m.numpy(), p.numpy()
    mean_k = np.sqrt(alphas_cumprod)[:, None] * m
    var_k = alphas_cumprod[:, None] * p ** 2 + 1 - alphas_cumprod[:, None]
    mean = (w * mean_k).sum(1)
    dev = mean_k - mean[:, None]
    var = (w * (var_k + dev ** 2)).sum(1)
    mu4 = (w * (dev ** 4 + 6 * dev ** 2 * var_k + 3 * var_k ** 2)).sum(1)
    return mean, np.sqrt(var), mu4


def assert_moments(stats, mean, std, mu4, n):
    """stats (T+1, 2) sample mean/std at each t against the true ones, within Z standard errors."""
    se_mean = std / math.sqrt(n)
    se_std = np.sqrt(mu4 - std ** 4) / (2 * std * math.sqrt(n))
    err_mean, err_std = np.abs(stats[:, 0].numpy() - mean), np.abs(stats[:, 1].numpy() - std)
    assert (err_mean < Z * se_mean).all(), f'mean off at t = {np.flatnonzero(err_mean >= Z * se_mean)}'
    assert (err_std < Z * se_std).all(), f'std off at t = {np.flatnonzero(err_std >= Z * se_std)}'


def test_schedule_matches_float_loop():
    betas, alphas_cumprod = torch_schedule()
    nb, na = np_schedule()
    np.testing.assert_allclose(betas.numpy(), nb, rtol=0, atol=1e-15)
    np.testing.assert_allclose(alphas_cumprod.numpy(), na, rtol=1e-13)
    assert alphas_cumprod[0] == 1 and betas[1] == BETA_START and betas[T] == BETA_END


def test_q_sample_equals_iterated_chain():
    """Iterating q(x_t|x_{t-1}) from a point x0 gives mean_t = sqrt(alpha_t) mean_{t-1} and
    var_t = alpha_t var_{t-1} + beta_t; the closed form q(x_t|x0) must give the same at every t."""
    betas, alphas_cumprod = torch_schedule()
    x0, mean, var = 1.7, 1.7, 0.0
    for t in range(1, T + 1):
        a = 1 - betas[t].item()
        mean, var = math.sqrt(a) * mean, a * var + betas[t].item()
        # q_sample is affine in the noise, so its values at noise -1 and +1 give its mean and std exactly
        lo, hi = d.q_sample(f64(x0), alphas_cumprod[t], f64(-1.0)).item(), d.q_sample(f64(x0), alphas_cumprod[t], f64(1.0)).item()
        assert math.isclose((hi + lo) / 2, mean, rel_tol=1e-12, abs_tol=1e-15)
        assert math.isclose((hi - lo) / 2, math.sqrt(var), rel_tol=1e-12)


@pytest.mark.parametrize('t', [1, 2, 25, T])
def test_posterior_equals_joint_gaussian_conditioning(t):
    """q(x_{t-1}|x_t, x0) from conditioning the joint Gaussian of (x_{t-1}, x_t) given x0."""
    betas, alphas_cumprod = torch_schedule()
    nb, na = np_schedule()
    x0, xt = f64(-0.4, 2.0, 3.1), f64(0.3, -1.2, 2.2)
    mean, var = d.q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod)
    var_prev, var_t = 1 - na[t - 1], 1 - na[t]
    cov = math.sqrt(1 - nb[t]) * var_prev
    want_mean = math.sqrt(na[t - 1]) * x0.numpy() + cov / var_t * (xt.numpy() - math.sqrt(na[t]) * x0.numpy())
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-12, atol=1e-14)
    assert math.isclose(var.item(), var_prev - cov ** 2 / var_t, rel_tol=1e-10, abs_tol=1e-15)


def test_responsibilities_are_bayes_rule():
    w, m, p = DATA['mixture']
    _, na = np_schedule()
    x = np.linspace(-4, 5, 19)
    for t in (0, 1, 3, 10, T):
        s2 = na[t] * p.numpy() ** 2 + 1 - na[t]
        joint = w.numpy() * np.exp(-0.5 * (x[:, None] - math.sqrt(na[t]) * m.numpy()) ** 2 / s2) / np.sqrt(2 * np.pi * s2)
        r = d.responsibilities(torch.from_numpy(x), torch.tensor(na[t]), w, m, p).numpy()
        np.testing.assert_allclose(r, joint / joint.sum(1, keepdims=True), rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize('name', DATA)
def test_true_reverse_kernel_is_bayes_rule(name):
    """Per component: prior N(m_{t-1}, s_{t-1}^2) times likelihood N(x_t; sqrt(alpha_t) x, beta_t),
    multiplied out in precision form (independent of the covariance form the script uses)."""
    w, m, p = DATA[name]
    betas, alphas_cumprod = torch_schedule()
    x = f64(-2.0, 0.1, 3.3)
    for t in (1, 7, T):
        mean, var = d.true_reverse_mean_var(x, t, betas, alphas_cumprod, m, p)
        a, b = 1 - betas[t].item(), betas[t].item()
        for k in range(len(w)):
            mu_prev = math.sqrt(alphas_cumprod[t - 1].item()) * m[k].item()
            v_prev = alphas_cumprod[t - 1].item() * p[k].item() ** 2 + 1 - alphas_cumprod[t - 1].item()
            prec = 1 / v_prev + a / b
            np.testing.assert_allclose(var[k].item(), 1 / prec, rtol=1e-12)
            np.testing.assert_allclose(mean[:, k].numpy(), (mu_prev / v_prev + math.sqrt(a) * x.numpy() / b) / prec, rtol=1e-12)


def test_exact_kernel_moments_propagate_exactly():
    """Gaussian data: the exact reverse chain is linear-Gaussian, so its moments follow a recursion;
    from q(x_T) it must land on q(x_t) at every t, to rounding."""
    w, m, p = DATA['gauss']
    betas, alphas_cumprod = torch_schedule()
    mean, std, _ = true_marginals(w, m, p)
    a, v = mean[T], std[T] ** 2
    for t in range(T, 0, -1):
        # x_{t-1} = c + gain * x_t + sqrt(var) z; the kernel's mean at x = 0 and x = 1 gives c and gain
        (c0,), (c1,) = d.true_reverse_mean_var(f64(0.0, 1.0), t, betas, alphas_cumprod, m, p)[0].tolist()
        var = d.true_reverse_mean_var(f64(0.0), t, betas, alphas_cumprod, m, p)[1].item()
        a, v = c0 + (c1 - c0) * a, (c1 - c0) ** 2 * v + var
        assert math.isclose(a, mean[t - 1], rel_tol=1e-10) and math.isclose(v, std[t - 1] ** 2, rel_tol=1e-10)


@pytest.mark.parametrize('name', DATA)
def test_exact_sampler_reproduces_every_marginal(name):
    w, m, p = DATA[name]
    betas, alphas_cumprod = torch_schedule()
    n, g = 200_000, torch.Generator().manual_seed(2)
    x_T = d.sample_marginal(n, alphas_cumprod[T], w, m, p, g)
    x0, stats, _ = d.run_chain(d.exact_step(betas, alphas_cumprod, w, m, p, g), x_T, range(T, 0, -1), 0)
    assert_moments(stats.flip(0), *true_marginals(w, m, p), n)
    assert d.ks_distance(x0, w, m, p) < 1.95 / math.sqrt(n)  # the KS test's 0.1% critical value


def test_report_kernel_drifts_by_its_closed_form():
    """The report's chain is linear-Gaussian too: x_{t-1} = c0 m + ct x_t + sqrt(beta_tilde + p^2) z.
    Its moments, from an independent recursion, must match the script's sampler, end on N(m, p^2)
    at t = 0, and sit far from q(x_t) in between: that drift is what the script shows users."""
    w, m, p = DATA['gauss']
    mv, pv = m.item(), p.item()
    nb, na = np_schedule()
    mean, std, mu4 = true_marginals(w, m, p)
    rec = np.zeros((T + 1, 2))
    a, v = mean[T], std[T] ** 2
    rec[T] = a, v
    for t in range(T, 0, -1):
        c0 = math.sqrt(na[t - 1]) * nb[t] / (1 - na[t])
        ct = math.sqrt(1 - nb[t]) * (1 - na[t - 1]) / (1 - na[t])
        a, v = c0 * mv + ct * a, ct ** 2 * v + (1 - na[t - 1]) / (1 - na[t]) * nb[t] + pv ** 2
        rec[t - 1] = a, v
    rec[:, 1] = np.sqrt(rec[:, 1])
    assert math.isclose(rec[0, 0], mv, rel_tol=1e-12) and math.isclose(rec[0, 1], pv, rel_tol=1e-12)
    drift = np.abs(rec[:, 1] - std)
    assert drift.max() > 0.5 and drift.argmax() not in (0, T)  # std off by half the data's scale mid-chain

    betas, alphas_cumprod = torch_schedule()
    n, g = 200_000, torch.Generator().manual_seed(3)
    x_T = d.sample_marginal(n, alphas_cumprod[T], w, m, p, g)
    _, stats, _ = d.run_chain(d.report_step(betas, alphas_cumprod, m, p ** 2, g), x_T, range(T, 0, -1), 0)
    assert_moments(stats.flip(0), rec[:, 0], rec[:, 1], 3 * rec[:, 1] ** 4, n)  # Gaussian: mu4 = 3 s^4


@pytest.mark.parametrize('name', DATA)
@pytest.mark.parametrize('t', [1, 10, 30])
def test_eps_star_is_the_regression_of_eps_on_xt(name, t):
    """E[eps - eps*(x_t) | x_t in bin] = 0 for every bin of x_t: a Monte Carlo regression of eps on x_t,
    compared bin by bin, each within Z standard errors of its bin mean."""
    w, m, p = DATA[name]
    _, alphas_cumprod = torch_schedule()
    n, g = 400_000, torch.Generator().manual_seed(4)
    x0 = d.sample_marginal(n, alphas_cumprod[0], w, m, p, g)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    xt = d.q_sample(x0, alphas_cumprod[t], eps)
    resid = (eps - d.eps_star(xt, alphas_cumprod[t], w, m, p))[xt.argsort()].numpy()
    for b in np.array_split(resid, 40):
        assert abs(b.mean()) < Z * b.std() / math.sqrt(len(b))
    if name == 'gauss':  # and what is left is Var[eps | x_t] = 1 - (1 - alphas_cumprod_t) / s_t^2, whose se is var sqrt(2/n)
        s2 = alphas_cumprod[t].item() * p.item() ** 2 + 1 - alphas_cumprod[t].item()
        want = 1 - (1 - alphas_cumprod[t].item()) / s2
        assert abs(resid.var() - want) < Z * want * math.sqrt(2 / n)


@pytest.mark.parametrize('name', DATA)
def test_ddpm_mean_with_eps_star_is_the_exact_reverse_mean(name):
    """Eq. 11 at eps* equals E[x_{t-1} | x_t] = sum_k r_k(x_t) E_k[x_{t-1} | x_t]."""
    w, m, p = DATA[name]
    betas, alphas_cumprod = torch_schedule()
    x = torch.linspace(-4, 5, 37, dtype=torch.float64)
    for t in (1, 5, T):
        mean_k, _ = d.true_reverse_mean_var(x, t, betas, alphas_cumprod, m, p)
        exact = (d.responsibilities(x, alphas_cumprod[t], w, m, p) * mean_k).sum(1)
        eps = d.eps_star(x, alphas_cumprod[t], w, m, p)
        np.testing.assert_allclose(d.p_mean_from_eps(x, eps, t, betas, alphas_cumprod).numpy(), exact.numpy(),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('sigma, x0_std', [('beta', 0.497), ('beta_tilde', 0.440)])
def test_ddpm_sampler_with_eps_star_follows_its_recursion(sigma, x0_std):
    """Algorithm 2 driven by eps* on Gaussian data: x_{t-1} = A_t x_t + B_t + sigma_t z with
    A_t = (1 - beta_t / s_t^2) / sqrt(alpha_t), B_t = beta_t m_t / (s_t^2 sqrt(alpha_t)), z = 0 at t = 1.
    The sampler must follow the moment recursion from N(0, 1), which ends at the x0 std the
    script's docstring quotes (the step variance, not eps*, keeps it from 0.5)."""
    w, m, p = DATA['gauss']
    nb, na = np_schedule()
    rec = np.zeros((T + 1, 2))
    a, v = 0.0, 1.0
    rec[T] = a, v
    for t in range(T, 0, -1):
        s2, mt = na[t] * p.item() ** 2 + 1 - na[t], math.sqrt(na[t]) * m.item()
        A, B = (1 - nb[t] / s2) / math.sqrt(1 - nb[t]), nb[t] * mt / (s2 * math.sqrt(1 - nb[t]))
        var_t = 0.0 if t == 1 else nb[t] if sigma == 'beta' else (1 - na[t - 1]) / (1 - na[t]) * nb[t]
        a, v = A * a + B, A ** 2 * v + var_t
        rec[t - 1] = a, v
    rec[:, 1] = np.sqrt(rec[:, 1])
    assert round(rec[0, 1], 3) == x0_std

    betas, alphas_cumprod = torch_schedule()
    n, g = 200_000, torch.Generator().manual_seed(6)
    star = lambda x, t: d.eps_star(x, alphas_cumprod[t], w, m, p)  # noqa: E731
    x_T = torch.randn(n, generator=g, dtype=torch.float64)
    _, stats, _ = d.run_chain(d.ddpm_step(star, betas, alphas_cumprod, sigma, g), x_T, range(T, 0, -1), 0)
    assert_moments(stats.flip(0), rec[:, 0], rec[:, 1], 3 * rec[:, 1] ** 4, n)


def test_ks_distance_separates_right_from_wrong():
    w, m, p = DATA['mixture']
    n, g = 100_000, torch.Generator().manual_seed(5)
    x = d.sample_marginal(n, f64(1.0)[0], w, m, p, g)
    assert d.ks_distance(x, w, m, p) < 1.95 / math.sqrt(n)
    assert d.ks_distance(x + 0.05, w, m, p) > 1.95 / math.sqrt(n)  # a shift of 0.03 std is rejected


def test_main_runs_and_writes_its_outputs(tmp_path, capsys):
    n = 20_000
    d.main(['--out-dir', str(tmp_path), '--samples', str(n), '--train-steps', '200', '--log-every', '100'])
    out = capsys.readouterr().out
    assert (tmp_path / 'ddpm_1d.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert (tmp_path / 'ddpm_1d.py').exists()
    assert json.loads((tmp_path / 'config.json').read_text())['samples'] == n
    for name in ('exact', 'report', 'learned', 'eps*'):
        assert re.search(rf'^{re.escape(name)} *\| x_0: mean', out, re.M), name
    mean, std = map(float, re.search(r'^exact *\| x_0: mean (\S+) std (\S+)', out, re.M).groups())
    assert abs(mean - 3.0) < Z * 0.5 / math.sqrt(n) and abs(std - 0.5) < Z * 0.5 / math.sqrt(2 * n)


def test_main_mixture_exact_only(tmp_path, capsys):
    d.main(['--out-dir', str(tmp_path), '--samples', '5000', '--data', 'mixture', '--reverse', 'exact'])
    out = capsys.readouterr().out
    assert 'exact' in out and 'learned' not in out and (tmp_path / 'ddpm_1d.png').exists()


def test_a_failed_write_is_one_line_and_keeps_the_old_figure(tmp_path, monkeypatch):
    """A figure whose write fails part-way (ENOSPC injected into savefig) stops with one line, leaves no temporary
    file and keeps the figure that was there."""
    import matplotlib.figure
    argv = ['--samples', '2000', '--reverse', 'exact', '--out-dir', str(tmp_path)]
    d.main(argv)
    before = (tmp_path / 'ddpm_1d.png').read_bytes()
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', full_disk)
    with pytest.raises(SystemExit) as e:
        d.main(argv)
    monkeypatch.undo()
    msg = str(e.value)
    assert f"could not write {tmp_path / 'ddpm_1d.png'} (No space left on device)" in msg and '\n' not in msg, msg
    assert (tmp_path / 'ddpm_1d.png').read_bytes() == before and not [f for f in tmp_path.iterdir() if '.tmp' in f.name]


@pytest.mark.parametrize('argv, says', [
    (['--beta-end', '1.5'], '--beta-end'),
    (['--timesteps', '0'], '--timesteps'),
    (['--mix-weight', '1'], '--mix-weight'),
    (['--data-std', '-1'], '--data-std'),
    (['--samples', '1'], '--samples'),
])
def test_impossible_settings_exit_with_one_line(argv, says, tmp_path):
    with pytest.raises(SystemExit) as e:
        d.main(argv + ['--out-dir', str(tmp_path / 'never')])
    assert isinstance(e.value.code, str) and says in e.value.code and '\n' not in e.value.code
    assert not (tmp_path / 'never').exists()  # nothing written before the check


@pytest.mark.parametrize('argv', [['--reverse', 'bogus'], ['--epochs', '3'], ['--samples', 'many'], ['--sampl', '10']])
def test_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        d.get_config(argv)
    assert e.value.code == 2 and 'usage:' in capsys.readouterr().err


def test_get_config_types_and_defaults():
    c = d.get_config(['--timesteps', '7', '--lr', '1e-4', '--reverse', 'exact', '--device', 'cpu'])
    assert c['timesteps'] == 7 and c['lr'] == 1e-4 and c['reverse'] == 'exact' and c['device'] == 'cpu'
    assert c['samples'] == d.samples and c['data'] == d.data and d.timesteps == 50  # module untouched
    assert set(c) == {k for k in vars(d) if re.fullmatch(r'[a-z][a-z_]*', k) and isinstance(vars(d)[k], (int, float, str))}
