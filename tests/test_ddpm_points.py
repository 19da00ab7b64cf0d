"""ddpm_points.py: schedules and posteriors against independent float64 math, samplers driven by the
exact eps* of 2D Gaussian data, the set model's permutation equivariance, the star generator, and
short CPU runs of main(). Monte Carlo checks allow Z standard errors computed from the sample size."""
import json
import math
import re

import numpy as np
import pytest
import torch
from closed_form import check_posterior_is_bayes, full_disk

import ddpm_points as d

Z = 5
T = 200


def schedules():
    return {'cosine': d.cosine_betas(T), 'linear': d.linear_betas(T, 1e-4, 0.02)}


@pytest.mark.parametrize('name', ['cosine', 'linear'])
def test_q_sample_equals_iterated_chain(name):
    """mean_t = sqrt(1 - beta_t) mean_{t-1}, var_t = (1 - beta_t) var_{t-1} + beta_t from (x0, 0);
    q_sample is affine in the noise, so its values at noise -1 and +1 give its mean and std."""
    betas = schedules()[name]
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0, mean, var = 0.8, 0.8, 0.0
    for t in range(T):
        b = betas[t].item()
        mean, var = math.sqrt(1 - b) * mean, (1 - b) * var + b
        x0_t = torch.tensor(x0, dtype=torch.float64)
        lo, hi = (d.q_sample(x0_t, alphas_cumprod[t], torch.tensor(z, dtype=torch.float64)).item() for z in (-1.0, 1.0))
        assert math.isclose((hi + lo) / 2, mean, rel_tol=1e-10, abs_tol=1e-14)
        assert math.isclose((hi - lo) / 2, math.sqrt(var), rel_tol=1e-10)


@pytest.mark.parametrize('t', [0, 1, 100, T - 1])
def test_posterior_equals_joint_gaussian_conditioning(t):
    check_posterior_is_bayes(d, d.cosine_betas(T), t)


def test_predict_x0_inverts_q_sample():
    alphas_cumprod = torch.cumprod(1 - d.cosine_betas(T), 0)[:-1]  # alphas_cumprod_T = 0 has no inverse
    x0, eps = torch.randn(len(alphas_cumprod), 2, dtype=torch.float64), torch.randn(len(alphas_cumprod), 2, dtype=torch.float64)
    a = alphas_cumprod[:, None]
    np.testing.assert_allclose(d.predict_x0(d.q_sample(x0, a, eps), eps, a).numpy(), x0.numpy(), rtol=1e-6, atol=1e-6)


def test_cosine_schedule_endpoints_monotone_and_clipped():
    alphas_cumprod = d.cosine_alphas_cumprod(T)
    assert alphas_cumprod[0] == 1 and alphas_cumprod[-1] < 1e-30 and (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    betas = d.cosine_betas(T)
    assert (betas > 0).all() and betas.max() == 0.999 and (betas[:-1] < 0.999).all()  # only the last step is clipped
    assert (betas[1:] >= betas[:-1]).all()  # increasing
    np.testing.assert_allclose(torch.cumprod(1 - betas, 0)[:-1].numpy(), alphas_cumprod[1:-1].numpy(), rtol=1e-10)


MU = torch.tensor([0.7, -0.4])
COV = torch.tensor([[0.5, 0.2], [0.2, 0.3]])


def eps_star_fn(betas):
    """Exact E[eps | x_t] for x0 ~ N(MU, COV): sqrt(1 - a) (a COV + (1 - a) I)^-1 (x_t - sqrt(a) MU)."""
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def eps(x, t):
        a = alphas_cumprod[t[0]]
        prec = torch.linalg.inv(a * COV + (1 - a) * torch.eye(2))
        return (1 - a).sqrt() * (x - a.sqrt() * MU) @ prec.T
    return eps


def sampler_moments(betas, steps, method, sigma):
    """The exact output law of the discretised sampler driven by eps*: with Gaussian data every step
    is affine, x' = A x + b + s z, so from x_T ~ N(0, I) the mean and covariance follow exactly (float64)."""
    betas = betas.double()
    alphas_cumprod, eye, mu, cov = torch.cumprod(1 - betas, 0), torch.eye(2, dtype=torch.float64), MU.double(), COV.double()
    m, C = torch.zeros(2, dtype=torch.float64), eye.clone()
    T = len(betas)
    ts = list(range(T - 1, -1, -1)) if method == 'ddpm' else torch.linspace(T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a = alphas_cumprod[t]
        P = torch.linalg.inv(a * cov + (1 - a) * eye)
        Me, be = (1 - a).sqrt() * P, -(1 - a).sqrt() * a.sqrt() * P @ mu  # eps*(x) = Me x + be
        A0, b0 = (eye - (1 - a).sqrt() * Me) / a.sqrt(), -(1 - a).sqrt() * be / a.sqrt()  # x0_hat = A0 x + b0 (eq. 4 inverted)
        if method == 'ddpm':
            ap = alphas_cumprod[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
            c0, ct = ap.sqrt() * betas[t] / (1 - a), (1 - betas[t]).sqrt() * (1 - ap) / (1 - a)  # eq. 7
            A, b = c0 * A0 + ct * eye, c0 * b0
            s2 = 0.0 if t == 0 else (betas[t] if sigma == 'beta' else (1 - ap) / (1 - a) * betas[t])
        else:  # DDIM, eta = 0 (Song et al. eq. 12)
            ap = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
            A, b, s2 = ap.sqrt() * A0 + (1 - ap).sqrt() * Me, ap.sqrt() * b0 + (1 - ap).sqrt() * be, 0.0
        m, C = A @ m + b, A @ C @ A.T + s2 * eye
    return m.float(), C.float()


@pytest.mark.parametrize('method, sigma, steps', [('ddpm', 'beta_tilde', 0), ('ddpm', 'beta', 0), ('ddim', '-', 50)])
def test_cosine_sampler_with_exact_eps_matches_its_exact_moments(method, sigma, steps):
    """The clipped cosine schedule with x0 clipping on, driven by eps*: the samples' mean and covariance
    equal the exact moments of the discretised chain (no collapse in the last reverse steps).
    n = 40,000: a mean's standard error is sqrt(var / n), a variance's var sqrt(2 / n), a covariance's
    sqrt((var_x var_y + cov^2) / n)."""
    n, g, betas = 40_000, torch.Generator().manual_seed(0), d.cosine_betas(T)
    x, _ = d.sample(eps_star_fn(betas), (n, 2), betas, steps, method, sigma, 0.0, 4.0, g)
    mean, cov = sampler_moments(betas, steps, method, sigma)
    var = cov.diag()
    assert ((x.mean(0) - mean).abs() < Z * (var / n).sqrt()).all(), (x.mean(0), mean)
    emp = torch.cov(x.T)
    assert ((emp.diag() - var).abs() < Z * var * math.sqrt(2 / n)).all(), (emp, cov)
    assert abs(emp[0, 1] - cov[0, 1]) < Z * math.sqrt((var[0] * var[1] + cov[0, 1] ** 2) / n), (emp, cov)
    # the chain itself is the data's up to a first-order discretisation error: the bias of the covariance
    # falls ~1/T for DDPM (T = 200 -> 1000: x0.2) and ~1/steps for DDIM (x0.5 per doubling)
    np.testing.assert_allclose(mean, MU, atol=1e-3)
    if method == 'ddpm':
        bias = [(sampler_moments(d.cosine_betas(k), 0, 'ddpm', sigma)[1] - COV).abs().max().item() for k in (T, 1000)]
        assert bias[0] < 0.03 and bias[1] / bias[0] < 0.3, bias
    else:
        bias = [(sampler_moments(betas, k, 'ddim', '-')[1] - COV).abs().max().item() for k in (50, 100, 200)]
        assert bias[0] < 0.06 and 0.4 < bias[1] / bias[0] < 0.6 and 0.4 < bias[2] / bias[1] < 0.6, bias


def test_v_target_round_trip():
    """v = sqrt(a) eps - sqrt(1 - a) x0 and x_t = sqrt(a) x0 + sqrt(1 - a) eps give back x0 and eps, for every a
    including alphas_cumprod_T = 0 of the unclipped cosine schedule, where inverting eq. 4 from eps divides by zero."""
    a = torch.cat([d.cosine_alphas_cumprod(T)[1:], torch.zeros(1, dtype=torch.float64)])[:, None]
    x0, eps = torch.randn(len(a), 2, dtype=torch.float64), torch.randn(len(a), 2, dtype=torch.float64)
    got_x0, got_eps = d.x0_eps_from_v(d.q_sample(x0, a, eps), d.v_target(x0, a, eps), a)
    np.testing.assert_allclose(got_x0.numpy(), x0.numpy(), atol=1e-12)
    np.testing.assert_allclose(got_eps.numpy(), eps.numpy(), atol=1e-12)


def v_star_fn(betas):
    """Exact v* = sqrt(a) eps* - sqrt(1 - a) E[x0 | x_t],
    E[x0 | x_t] = MU + sqrt(a) COV (a COV + (1 - a) I)^-1 (x_t - sqrt(a) MU)."""
    alphas_cumprod, eps_star = torch.cumprod(1 - betas, 0).float(), eps_star_fn(betas)

    def v(x, t):
        a = alphas_cumprod[t[0]]
        x0 = MU + a.sqrt() * (x - a.sqrt() * MU) @ (COV @ torch.linalg.inv(a * COV + (1 - a) * torch.eye(2))).T
        return a.sqrt() * eps_star(x, t) - (1 - a).sqrt() * x0
    return v


@pytest.mark.parametrize('method', ['ddpm', 'ddim'])
def test_v_sampler_is_the_eps_sampler(method):
    """Driven by the exact v*, sample(target='v') runs the same chain as with eps*, sample for sample."""
    betas = d.cosine_betas(T)
    run = lambda fn, target: d.sample(fn, (4000, 2), betas, 50 * (method == 'ddim'), method, 'beta_tilde', 0.0, 0.0,
                                      torch.Generator().manual_seed(0), target=target)[0]
    np.testing.assert_allclose(run(v_star_fn(betas), 'v').numpy(), run(eps_star_fn(betas), 'eps').numpy(), atol=1e-3)


def test_ddpm_noise_below_joins_ddim_above_to_ddpm_below():
    """noise_below = T is plain DDPM and 0 is DDIM with eta 0 over all T steps, sample for sample (the
    noiseless steps draw their unused z too, so the streams stay aligned); in between, the chain is DDIM's
    down to t = noise_below, the same x_t, and DDPM's after it."""
    betas, n = d.cosine_betas(T), 2000
    run = lambda method, steps, below: d.sample(eps_star_fn(betas), (n, 2), betas, steps, method,
                                          'beta_tilde', 0.0, 4.0, torch.Generator().manual_seed(0),
                                          keep=(40,), noise_below=below)
    assert torch.equal(run('ddpm', 0, T)[0], run('ddpm', 0, None)[0])
    assert torch.equal(run('ddpm', 0, 0)[0], run('ddim', T, None)[0])
    hybrid, ddim = run('ddpm', 0, 40), run('ddim', T, None)
    assert torch.equal(hybrid[1][40], ddim[1][40]) and not torch.equal(hybrid[0], ddim[0])


def test_linear_schedule_of_the_report_leaves_signal_at_T():
    """beta 1e-4..0.02 over T = 200: alphas_cumprod_T = e^-2 of the data is left at t = T, so N(0, I) is not q(x_T).
    The script prints alphas_cumprod_T; cosine reaches 0."""
    alphas_cumprod_T = torch.cumprod(1 - d.linear_betas(T, 1e-4, 0.02), 0)[-1].item()
    assert math.isclose(alphas_cumprod_T, math.exp(-sum(1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T))), rel_tol=0.02)
    assert alphas_cumprod_T > 0.1


def test_sliced_w1_zero_symmetric_and_scales_with_a_shift():
    a, b = torch.randn(1000, 2), torch.randn(1000, 2)
    assert d.sliced_w1(a, a) == 0 and d.sliced_w1(a, b) == d.sliced_w1(b, a)
    # a shift v moves every projection by v.theta, so SW1 = mean |v.theta| over the directions, ~ |v| 2/pi
    v = torch.tensor([0.3, 0.4])
    theta = torch.rand(256, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * math.pi
    want = (0.3 * theta.cos() + 0.4 * theta.sin()).abs().mean().item()
    assert math.isclose(d.sliced_w1(a, a + v), want, rel_tol=1e-5)
    assert abs(want - 0.5 * 2 / math.pi) < 0.05


@pytest.mark.parametrize('mode', ['polar', 'stats'])
def test_set_model_is_permutation_equivariant(mode):
    torch.manual_seed(0)
    model = d.SetDenoiser(mode, hidden=32, layers=2)
    x, t, perm = torch.randn(3, 200, 2), torch.tensor([0, 50, 199]), torch.randperm(200)
    with torch.no_grad():
        np.testing.assert_allclose(model(x[:, perm], t).numpy(), model(x, t)[:, perm].numpy(), atol=1e-5)


def test_star_generator_shapes_and_determinism():
    a, b = d.make_stars(5, 300, np.random.default_rng(3)), d.make_stars(5, 300, np.random.default_rng(3))
    assert a.shape == (5, 300, 2) and torch.equal(a, b)
    assert not torch.equal(a, d.make_stars(5, 300, np.random.default_rng(4)))
    # every star is a closed outline around its centre: points in every 45-degree sector around the mean
    for star in a:
        ang = torch.atan2(*(star - star.mean(0)).T.flip(0))
        assert len(torch.unique(((ang + math.pi) / (math.pi / 4)).long().clamp(max=7))) == 8
    assert abs(d.Stars(300).draw(64).std().item() - 1) < 0.15


def test_nearest_star_finds_a_permuted_copy():
    train = d.make_stars(10, 256, np.random.default_rng(0))
    query = train[[7, 2]][:, torch.randperm(256)]
    dist, idx = d.nearest_star(query, train, sub=256)
    # float32 cdist goes through |a|^2 + |b|^2 - 2ab, so a zero distance comes out ~sqrt(1e-7 |a|^2) ~ 3e-4
    assert list(idx) == [7, 2] and (dist < 1e-3).all()
    assert d.nearest_star(train[:2], train[2:], sub=256)[0].min() > 0.05  # distinct stars are far apart


def test_radial_profile_of_a_disc_a_circle_and_stars():
    """A uniform disc has radius density 2r on [0, 1] in every sector: std sqrt(1/2 - 4/9), mean 2/3, so a
    spread of 0.354; 40 discs of 4096 points put the mean within ~0.003 (sector std over ~114 points, 36
    sectors). Its tips figure is the sampling noise of a sector's mean r: sqrt((1/18) / 114) / (2/3) = 0.033.
    A circle of radius 1 with N(0, 0.01^2) jitter: spread 0.01; tips only from the centroid's offset from
    the centre, ~sqrt(1 / 2 / 4096) = 0.011 cos(angle), so ~0.008. Real stars lie in between for the spread,
    far above both for the tips."""
    g = torch.Generator().manual_seed(0)
    r, a = torch.rand(40, 4096, generator=g).sqrt(), torch.rand(40, 4096, generator=g) * 2 * math.pi
    spread, tips, _ = d.radial_profile(torch.stack([r * a.cos(), r * a.sin()], 2))
    assert abs(spread.mean() - math.sqrt(0.5 - 4 / 9) / (2 / 3)) < 0.01, spread.mean()
    assert abs(tips.mean() - math.sqrt(1 / 18 / (4096 / 36)) / (2 / 3)) < 0.01, tips.mean()
    spread, tips, _ = d.radial_profile(torch.stack([a.cos(), a.sin()], 2) + 0.01 * torch.randn(40, 4096, 2, generator=g))
    assert abs(spread.mean() - 0.01) < 0.002 and tips.mean() < 0.015
    spread, tips, _ = d.radial_profile(d.Stars(1024).draw(32))
    assert 0.03 < spread.mean() < 0.12 and tips.mean() > 0.1


def test_star_traits_stray_points_and_variety_of_real_stars():
    """make_stars draws k, R, the rotation, then the inner ratio from its rng: the traits must find each
    star's k, follow its ratio and R. Real stars have no stray points (the 4th neighbour of an outline point
    is ~2 spacings away, 3x that is 6; the 1% jitter does not reach it), 20 points scattered inside a star
    are stray. Fresh real stars score a variety of 1 within 3 of their standard errors (~0.012 for 256 stars; the
    reference's own error, ~0.005 for 4096, is small beside it); moving every centre leaves it as it was (a shift
    is not variety); only 5-tip stars, or copies of one star (0), are many standard errors below."""
    truth = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        truth.append((rng.integers(5, 9), rng.uniform(0.5, 1.0), rng.uniform(0, 1), rng.uniform(0.35, 0.65)))
    k, R, _, ratio = np.array(truth).T
    stars = torch.cat([d.make_stars(1, 1024, np.random.default_rng(seed)) for seed in range(40)])
    traits = d.radial_profile(stars)[2]
    assert (traits[:, 0] == k).all()
    assert np.corrcoef(traits[:, 1], ratio)[0, 1] > 0.9 and np.corrcoef(traits[:, 2], R)[0, 1] > 0.95
    assert (d.stray(stars) == 0).all()
    g = torch.Generator().manual_seed(0)  # 20 points uniform on a disc of 0.3 R, inside the inner radius
    r, a = 0.3 * R[0] * torch.rand(20, generator=g).sqrt(), 2 * math.pi * torch.rand(20, generator=g)
    stars[0, :20] = stars[0].mean(0) + torch.stack([r * a.cos(), r * a.sin()], 1)
    # 14-20 of the 20 are flagged over 30 draws: strays that land close together vouch for each other
    assert 14 / 1024 <= d.stray(stars[:1])[0] <= 20 / 1024
    source = d.Stars(256)
    ref, fresh = d.radial_profile(source.draw(4096))[2], d.radial_profile(source.draw(256))[2]
    _, m, se = d.variety(fresh, ref)
    assert abs(m - 1) < 3 * se, (m, se)
    assert d.variety(fresh + np.array([0, 0, 0, 0.5, -0.5]), ref)[1] == pytest.approx(m)
    for narrow in (fresh[fresh[:, 0] == 5], fresh[[0] * 64]):
        assert m - d.variety(narrow, ref)[1] > 6 * se


def test_main_shape_run(tmp_path, capsys):
    d.main(['--dataset', 'circle', '--points', '600', '--epochs', '3', '--snapshots', '1', '--timesteps', '20',
            '--batch-size', '400', '--log-every', '2', '--eval-points', '200', '--eval-repeats', '2',
            '--out-dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'eval | floor' in out and out.count('eval | epoch') == 2
    scores = re.findall(r'eval \| epoch \d+ \| step \d+ \| sliced W1 (\S+) \+- (\S+) \| (\S+)x floor', out)
    assert len(scores) == 2 and all(0 < float(v) < math.inf for row in scores for v in row), scores  # not nan
    # each epoch is a step of 400 points and one of 200: the progress line at an epoch's end counts both (300 a
    # step), not the last batch's 200; ms/step and points/s are printed rounded, to far better than 2%
    speeds = re.findall(r'([\d.]+) ms/step \| ([\d,]+) points/s', out)
    assert len(speeds) == 3
    for ms, rate in speeds:
        assert abs(float(ms) * float(rate.replace(',', '')) / 1e3 / 300 - 1) < 0.02, (ms, rate)
    run = tmp_path / 'circle'
    for f in ('samples.png', 'forward.png', 'config.json', 'ddpm_points.py', 'ckpt.pt'):
        assert (run / f).exists(), f
    ckpt = torch.load(run / 'ckpt.pt', weights_only=True)
    assert ckpt['config']['points'] == 600 and json.loads((run / 'config.json').read_text())['dataset'] == 'circle'
    model = d.make_model(ckpt['config'])
    model.load_state_dict(ckpt['ema'])


def test_main_stars_run(tmp_path, capsys):
    d.main(['--dataset', 'stars', '--points', '8', '--star-points', '64', '--batch-size', '256', '--epochs', '1',
            '--timesteps', '10', '--eval-stars', '4', '--out-dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'x real stars' in out and 'distinct nearest training stars' in out
    for what in ('radial spread', '| tips', '| stray', '| variety', 'tip counts'):  # real stars, then generated
        assert out.count(what) == 2, what
    run = tmp_path / 'stars'
    assert (run / 'stars.png').exists() and np.load(run / 'samples.npz')['stars'].shape == (4, 64, 2)


def test_a_finished_run_is_never_lost(tmp_path, monkeypatch):
    """ddpm_points saves its model once, at the end (it has no --resume): a second run into the folder stops and
    writes nothing; with --overwrite true, a save that fails part-way (ENOSPC injected into torch.save) keeps the
    first run's checkpoint byte for byte and leaves no temporary file; Ctrl-C during training is one line."""
    argv = ['--dataset', 'stars', '--points', '8', '--star-points', '64', '--batch-size', '4', '--epochs', '1',
            '--timesteps', '10', '--eval-stars', '4', '--out-dir', str(tmp_path)]
    d.main(argv)
    run = tmp_path / 'stars'
    files = {f.name: f.read_bytes() for f in run.iterdir()}
    with pytest.raises(SystemExit) as e:
        d.main(argv)
    assert '--overwrite true' in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert {f.name: f.read_bytes() for f in run.iterdir()} == files, 'a refused run wrote into the folder'
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        d.main(argv + ['--overwrite', 'true'])
    monkeypatch.undo()
    msg = str(e.value)
    assert f"could not write {run / 'ckpt.pt'} (No space left on device)" in msg and '\n' not in msg, msg
    assert (run / 'ckpt.pt').read_bytes() == files['ckpt.pt'] and not [f for f in run.iterdir() if '.tmp' in f.name]
    v_target, calls = d.v_target, []

    def ctrl_c_at_step_2(*a):  # the v target is made once a step
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return v_target(*a)
    monkeypatch.setattr(d, 'v_target', ctrl_c_at_step_2)
    with pytest.raises(SystemExit) as e:
        d.main(argv + ['--overwrite', 'true'])
    monkeypatch.undo()
    assert str(e.value).startswith('ddpm_points.py: interrupted at step 1 of 2;') and '\n' not in str(e.value), str(e.value)
    assert (run / 'ckpt.pt').read_bytes() == files['ckpt.pt']


@pytest.mark.parametrize('flags, says', [
    (['--sample-steps', '50'], '--sampler ddim'),
    (['--sampler', 'ddim', '--noise-below', '30'], "--noise-below is DDPM's"),
    (['--dataset', 'stars', '--gif', 'true'], '--gif'),
    (['--set-model', 'stats'], '--dataset stars'),
    (['--dataset', 'stars', '--arch', 'report'], '--set-model'),
])
def test_bad_flags_exit_with_one_line(tmp_path, flags, says):
    with pytest.raises(SystemExit) as e:
        d.main(flags + ['--out-dir', str(tmp_path)])
    assert says in str(e.value) and '\n' not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing written
