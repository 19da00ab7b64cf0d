"""
Forward and reverse diffusion of a known 1D distribution: exact, a course report's kernel, learned.

DDPM (Ho et al. 2020, arXiv:2006.11239) on x0 ~ N(m, p^2), or a two-component Gaussian mixture.
Forward: q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t), alpha_t = 1 - beta_t (eq. 2), and in
closed form q(x_t | x_0) = N(sqrt(abar_t) x0, 1 - abar_t), abar_t = alphas_cumprod[t] = prod_{s<=t}
alpha_s (eq. 4). Arrays are indexed by t = 0..T with beta_0 = 0, so abar_0 = 1 and x_0 is the data.

Three reverse processes, all run from t = T down to 0:
  exact    the true reverse kernel q(x_{t-1} | x_t), derived below, started from the true q(x_T).
           It reproduces the forward marginal q(x_t) at every t, not only at t = 0.
  report   a course report's kernel: the posterior q(x_{t-1} | x_t, x0) (eqs. 6-7) with x0
           replaced by m in the mean and p^2 added to its variance beta_tilde_t, started from
           q(x_T). At t = 1 it draws x0 ~ N(m, p^2) whatever x_1 is, so its x0 histogram looks
           right while every intermediate marginal is off: the drift table shows by how much.
  learned  an MLP eps_theta(x_t, t) trained with L_simple (eq. 14) and sampled with Algorithm 2
           from N(0, 1); beside it the same sampler driven by the optimal eps* = E[eps | x_t],
           the best any network can do, and the mean-squared gap between eps_theta and eps*.
           With T = 50 the sampler itself is not exact: its step variance sigma_t^2 stands in
           for beta_tilde_t + c0_t^2 Var[x0 | x_t] (below), which lies between beta_tilde_t and
           beta_t. On the default data, x0's std comes out 0.497 with sigma_t^2 = beta_t (the
           default, DDPM's choice for CIFAR-10) and 0.440 with beta_tilde_t, for eps_theta and
           eps* alike: the eps* row tells the sampler's error from the network's.

The exact reverse kernel. Let m_t = sqrt(abar_t) m and s_t^2 = abar_t p^2 + 1 - abar_t, so that
q(x_t) = N(m_t, s_t^2). Since x_t = sqrt(alpha_t) x_{t-1} + sqrt(beta_t) z with z ~ N(0, 1)
independent of x_{t-1}, the pair (x_{t-1}, x_t) is jointly Gaussian with
    Var x_{t-1} = s_{t-1}^2,  Cov(x_{t-1}, x_t) = sqrt(alpha_t) s_{t-1}^2,
    Var x_t = alpha_t s_{t-1}^2 + beta_t = s_t^2.
Conditioning a joint Gaussian, E[a | b] = E a + Cov(a, b) / Var b (b - E b) and
Var[a | b] = Var a - Cov(a, b)^2 / Var b, gives
  q(x_{t-1} | x_t) = N(m_{t-1} + sqrt(alpha_t) s_{t-1}^2/s_t^2 (x_t - m_t), beta_t s_{t-1}^2/s_t^2)
Equivalently, the mean is the posterior mean (eq. 7) at x0 = E[x0 | x_t] and the variance is
beta_tilde_t + c0_t^2 Var[x0 | x_t], c0_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t): the report's
kernel puts m and p^2 where these conditional moments belong. For a mixture sum_k w_k N(m_k, p_k^2)
each component is as above and q(x_{t-1} | x_t) = sum_k r_k(x_t) q_k(x_{t-1} | x_t), with
responsibilities r_k(x_t) proportional to w_k N(x_t; m_{t,k}, s_{t,k}^2). The same argument gives
eps*(x_t) = E[eps | x_t] = sum_k r_k(x_t) sqrt(1 - abar_t) (x_t - m_{t,k}) / s_{t,k}^2.

Run (writes out/ddpm_1d/ddpm_1d.png, config.json and a copy of this file):
    python ddpm_1d.py                     # 10^6 samples a process: 28 s on 2 CPU cores
    python ddpm_1d.py --data mixture      # learned vs exact on a bimodal target
    python ddpm_1d.py --reverse exact     # one reverse process only
"""
import argparse
import json
import math
import os
import re
import shutil
import time

import torch
import torch.nn as nn

# ---- config ----
data = 'gauss'              # 'gauss' | 'mixture' of (data_mean, data_std) and (mix_mean, mix_std)
data_mean = 3.0             # m: mean of x0 (of the first component for a mixture)
data_std = 0.5              # p: std of x0 (of the first component for a mixture), > 0
mix_mean = -1.0             # mean of the second mixture component
mix_std = 0.3               # std of the second mixture component, > 0
mix_weight = 0.3            # weight of the second mixture component, in (0, 1)
timesteps = 50              # T, number of diffusion steps
beta_start = 0.02           # beta_1 of the linear schedule
beta_end = 0.3              # beta_T of the linear schedule, < 1
reverse = 'all'             # 'all' | 'exact' | 'report' | 'learned'
samples = 1_000_000         # chains run per process (forward and each reverse)
trajectories = 5            # trajectories drawn per panel
sigma = 'beta'              # 'beta' | 'beta_tilde': the learned sampler's step variance (Ho 3.2)
hidden = 64                 # width of the eps_theta MLP
train_steps = 3000          # Adam steps for eps_theta
batch_size = 4096           # fresh x0 draws per step: the data distribution is known
lr = 2e-3                   # peak Adam learning rate, cosine-decayed to 0
log_every = 500             # steps between progress lines
seed = 0                    # seeds data, noise and initial weights
device = 'auto'             # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
out_dir = 'out/ddpm_1d'     # figure, config.json and a copy of this script

def get_config(argv=None):  # the config block as flags ('a' | 'b': choices); a dict
    def boolean(s):  # another word is a usage error
        return ['false', '0', 'true', '1'].index(s.lower()) > 1
    block = open(__file__).read().split('# ---- config ----\n')[1].split('\n# ----')[0]
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    for name, note in re.findall(r'^([a-z_][a-z0-9_]*) *=.*?(?:# *(.*))?$', block, re.M):
        default, listed = globals()[name], re.match(r"'[^']*'(?: *\| *'[^']*')+", note)
        ap.add_argument('--' + name.replace('_', '-'), default=default,
                        choices=re.findall(r"'([^']*)'", listed[0]) if listed else None,
                        type=boolean if isinstance(default, bool) else type(default),
                        help=f'{note} [{default!r}]'.replace('%', '%%'))
    return vars(ap.parse_args(argv))

def check_config(c):  # settings the math cannot take, each refused with one line
    for bad, why in [
        (c['timesteps'] < 1 or not 0 < c['beta_start'] <= c['beta_end'] < 1,
         'need --timesteps >= 1 and 0 < --beta-start <= --beta-end < 1'),
        (c['data_std'] <= 0 or c['mix_std'] <= 0, '--data-std and --mix-std must be > 0'),
        (not 0 < c['mix_weight'] < 1, '--mix-weight must be in (0, 1)'),
        (c['samples'] < 2, '--samples must be >= 2')]:
        if bad:
            raise SystemExit(f'ddpm_1d.py: {why}')

def pick_device(name):  # 'auto': cuda, then mps, then cpu
    mps, cuda = torch.backends.mps.is_available(), torch.cuda.is_available()
    return torch.device(name if name != 'auto' else 'cuda' if cuda else 'mps' if mps else 'cpu')


# ---- schedule ----
def linear_betas(T, beta_start, beta_end):
    """(T+1,) float64: betas[t] = beta_t, linear from beta_1 to beta_T (sec. 4); beta_0 = 0."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.linspace(beta_start, beta_end, T, dtype=torch.float64)])

def q_sample(x0, alphas_cumprod_t, noise):
    """x_t ~ q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t) (eq. 4), reparameterised."""
    return alphas_cumprod_t.sqrt() * x0 + (1 - alphas_cumprod_t).sqrt() * noise

def q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod):
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t) for t >= 1 (eqs. 6-7)."""
    c0 = alphas_cumprod[t - 1].sqrt() * betas[t] / (1 - alphas_cumprod[t])
    ct = (1 - betas[t]).sqrt() * (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t])
    return c0 * x0 + ct * xt, (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t]) * betas[t]


# The data: a mixture sum_k w_k N(m_k, p_k^2) given by three (K,) tensors w, m, p; K = 1 if 'gauss'.
def marginal_mean_var(alphas_cumprod_t, m, p):
    """q(x_t) of each component: N(sqrt(abar_t) m_k, abar_t p_k^2 + 1 - abar_t)."""
    return alphas_cumprod_t.sqrt() * m, alphas_cumprod_t * p ** 2 + 1 - alphas_cumprod_t

def mixture_moments(w, mean, var):
    """Overall mean and std of sum_k w_k N(mean_k, var_k)."""
    mu = (w * mean).sum(-1)
    return mu, ((w * (var + mean ** 2)).sum(-1) - mu ** 2).sqrt()

def responsibilities(x, alphas_cumprod_t, w, m, p):
    """(N, K) r_k(x) = P(component k | x_t = x)."""
    mean, var = marginal_mean_var(alphas_cumprod_t, m, p)
    return (w.log() - 0.5 * var.log() - 0.5 * (x[:, None] - mean) ** 2 / var).softmax(-1)

def eps_star(x, alphas_cumprod_t, w, m, p):
    """E[eps | x_t = x] = sum_k r_k(x) sqrt(1 - abar_t) (x - m_{t,k}) / s_{t,k}^2: the best
    L_simple allows."""
    alphas_cumprod_t = torch.as_tensor(alphas_cumprod_t, dtype=torch.float64)[..., None]  # (N, 1)
    mean, var = marginal_mean_var(alphas_cumprod_t, m, p)
    r = responsibilities(x, alphas_cumprod_t, w, m, p)
    return (r * (1 - alphas_cumprod_t).sqrt() * (x[:, None] - mean) / var).sum(-1)

def true_reverse_mean_var(x, t, betas, alphas_cumprod, m, p):
    """Per component: q_k(x_{t-1} | x_t) = N(m_{t-1} + sqrt(alpha_t) s_{t-1}^2/s_t^2 (x_t - m_t),
    beta_t s_{t-1}^2/s_t^2), from the joint Gaussian (docstring): (N, K) means, (K,) variances."""
    mean_prev, var_prev = marginal_mean_var(alphas_cumprod[t - 1], m, p)
    mean_t, var_t = marginal_mean_var(alphas_cumprod[t], m, p)
    return (mean_prev + (1 - betas[t]).sqrt() * var_prev / var_t * (x[:, None] - mean_t),
            betas[t] * var_prev / var_t)

def report_reverse_mean_var(x, t, betas, alphas_cumprod, mean0, var0):
    """A course report's kernel: eq. 7 at x0 = mean0 (the data's mean), variance
    beta_tilde_t + var0."""
    mean, var = q_posterior_mean_var(mean0, x, t, betas, alphas_cumprod)
    return mean, var + var0

def p_mean_from_eps(x, eps, t, betas, alphas_cumprod):
    """mu_theta(x_t) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) (eq. 11)."""
    return (x - betas[t] / (1 - alphas_cumprod[t]).sqrt() * eps) / (1 - betas[t]).sqrt()


# ---- model ----
def timestep_embedding(t, dim, max_period=10_000):
    """Sinusoidal features of integer t (Vaswani et al. 2017, as in DDPM): (N,) -> (N, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.sin(), angles.cos()], 1)

class EpsMLP(nn.Module):
    """eps_theta(x_t, t): x_t and 16 sinusoidal features of t through two SiLU layers."""
    def __init__(self, hidden, t_dim=16):
        super().__init__()
        self.t_dim = t_dim
        self.net = nn.Sequential(nn.Linear(1 + t_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x, t):  # x (N,), t (N,) -> (N,)
        return self.net(torch.cat([x[:, None], timestep_embedding(t, self.t_dim)], 1)).squeeze(1)


# ---- sampling ----
def pick(r, g):
    """One component index per row of (N, K) probabilities r: inverse-CDF sampling."""
    u = torch.rand(len(r), 1, generator=g, dtype=r.dtype)
    return (u > r.cumsum(-1)).sum(-1).clamp(max=r.shape[-1] - 1)

def sample_marginal(n, alphas_cumprod_t, w, m, p, g):
    """n draws from q(x_t) (from the data when alphas_cumprod_t = 1)."""
    k = pick(w.expand(n, -1), g)
    mean, var = marginal_mean_var(alphas_cumprod_t, m, p)
    return mean[k] + var[k].sqrt() * torch.randn(n, generator=g, dtype=torch.float64)

def run_chain(step, x, ts, n_keep):
    """x <- step(x, t) for t in ts. Returns the last x, (len(ts)+1, 2) mean and std of x at every
    stage, and the first n_keep paths (n_keep, len(ts)+1)."""
    stats, paths = [(x.mean(), x.std())], [x[:n_keep].clone()]
    for t in ts:
        x = step(x, t)
        stats.append((x.mean(), x.std()))
        paths.append(x[:n_keep].clone())  # a view would keep all of x alive
    return x, torch.tensor(stats), torch.stack(paths, 1)

def exact_step(betas, alphas_cumprod, w, m, p, g):
    """x_{t-1} ~ q(x_{t-1} | x_t): pick a component by its responsibility, then its Gaussian."""
    def step(x, t):
        mean, var = true_reverse_mean_var(x, t, betas, alphas_cumprod, m, p)
        k = pick(responsibilities(x, alphas_cumprod[t], w, m, p), g)
        z = torch.randn(len(x), generator=g, dtype=x.dtype)
        return mean.gather(1, k[:, None])[:, 0] + var[k].sqrt() * z
    return step

def report_step(betas, alphas_cumprod, mean0, var0, g):
    def step(x, t):
        mean, var = report_reverse_mean_var(x, t, betas, alphas_cumprod, mean0, var0)
        return mean + var.sqrt() * torch.randn(len(x), generator=g, dtype=x.dtype)
    return step

def ddpm_step(eps_fn, betas, alphas_cumprod, sigma, g):
    """Algorithm 2: x_{t-1} = mu_theta(x_t) + sigma_t z, sigma_t^2 = beta_tilde_t or beta_t, z = 0
    at t = 1."""
    def step(x, t):
        var = (1 - alphas_cumprod[t - 1]) / (1 - alphas_cumprod[t]) * betas[t]  # beta_tilde_t
        var = betas[t] if sigma == 'beta' else var
        z = torch.randn(len(x), generator=g, dtype=x.dtype) if t > 1 else torch.zeros_like(x)
        return p_mean_from_eps(x, eps_fn(x, t), t, betas, alphas_cumprod) + var.sqrt() * z
    return step

def model_eps(model, dev, chunk=1 << 13):
    """eps_theta as a float64 CPU function of (x, t), in cache-sized chunks on dev (2-3x faster)."""
    @torch.no_grad()
    def eps(x, t):
        outs = [model(c.to(dev, torch.float32), torch.full((len(c),), t, device=dev)).double().cpu()
                for c in x.split(chunk)]
        return torch.cat(outs)
    return eps


# ---- train ----
def train(model, betas, alphas_cumprod, w, m, p, c, dev, g):
    """L_simple = E_{t, x0, eps} |eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)|^2."""
    opt = torch.optim.Adam(model.parameters(), lr=c['lr'])
    cosine = lambda i: 0.5 * (1 + math.cos(math.pi * i / c['train_steps']))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine)
    T, n, t0 = len(betas) - 1, c['batch_size'], time.time()
    for i in range(1, c['train_steps'] + 1):
        x0 = sample_marginal(n, alphas_cumprod[0], w, m, p, g)
        t = torch.randint(1, T + 1, (n,), generator=g)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        xt = q_sample(x0, alphas_cumprod[t], eps)
        loss = (model(xt.float().to(dev), t.to(dev)) - eps.float().to(dev)).pow(2).mean()
        if not torch.isfinite(loss):
            raise SystemExit(f'ddpm_1d.py: loss is {loss.item()} at step {i}; try a lower --lr')
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i % c['log_every'] == 0 or i == c['train_steps']:
            ms = (time.time() - t0) / i * 1e3
            print(f"step {i}/{c['train_steps']} | loss {loss.item():.4f} | lr "
                  f'{sched.get_last_lr()[0]:.1e} | {ms:.1f} ms/step | {n / ms * 1e3:,.0f} samples/s'
                  f" | eta {ms * (c['train_steps'] - i) / 1e3:.0f}s")

@torch.no_grad()
def eps_gap(model, eps_fn, betas, alphas_cumprod, w, m, p, dev, g, n=200_000):
    """Over t ~ U{1..T}, x_t ~ q(x_t): mean (eps_theta - eps*)^2; L_simple of eps_theta, of eps*"""
    t = torch.randint(1, len(betas), (n,), generator=g)
    x0 = sample_marginal(n, alphas_cumprod[0], w, m, p, g)
    eps = torch.randn(n, generator=g, dtype=torch.float64)
    xt = q_sample(x0, alphas_cumprod[t], eps)
    e_theta = model(xt.float().to(dev), t.to(dev)).double().cpu()
    e_star = eps_fn(xt, alphas_cumprod[t])
    pairs = ((e_theta, e_star), (e_theta, eps), (e_star, eps))
    return tuple((a - b).pow(2).mean().item() for a, b in pairs)

def ks_distance(x, w, m, p):
    """sup_x |F_n(x) - F(x)| of the samples to the mixture's CDF; ~1.36/sqrt(n) at 95% by chance."""
    x = x.sort().values
    cdf = (w * torch.special.ndtr((x[:, None] - m) / p)).sum(-1)
    i = torch.arange(1, len(x) + 1, dtype=torch.float64)
    return torch.maximum(i / len(x) - cdf, cdf - (i - 1) / len(x)).max().item()

def plot(path, c, true_stats, fwd, runs, w, m, p):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    T = c['timesteps']
    ts = torch.arange(T + 1)
    grid = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    a, b = (m - 5 * p).min().item(), (m + 5 * p).max().item()
    xs = torch.linspace(a, b, 1001, dtype=torch.float64)
    pdf0 = (w * torch.exp(-0.5 * ((xs[:, None] - m) / p) ** 2) / (p * math.sqrt(2 * math.pi)))
    pdf0 = pdf0.sum(-1)
    fig, ax = plt.subplots(3, 3, figsize=(15, 12))
    lo, hi = true_stats[:, 0] - 2 * true_stats[:, 1], true_stats[:, 0] + 2 * true_stats[:, 1]
    band = lambda a: a.fill_between(ts, lo, hi, color='0.85', label='true q(x_t): mean $\\pm$ 2std')
    x_last, _, paths = fwd
    band(ax[0, 0])
    ax[0, 0].plot(ts, paths.T, lw=1)
    ax[0, 0].set(title='forward: 5 chains $q(x_t|x_{t-1})$', xlabel='t', ylabel='$x_t$')
    ax[0, 0].legend(loc='upper right')
    ax[0, 1].hist(x_last.numpy(), bins=200, density=True, color='C0', alpha=0.6,
                  label=f'$x_T$, {len(x_last):,} chains')
    ax[0, 1].plot(grid, torch.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), 'k', label='N(0, 1)')
    ax[0, 1].set(title=f'forward: $x_T$ at T = {T}', xlabel='$x_T$', ylabel='density')
    ax[0, 1].legend()
    ax[0, 2].plot(ts, true_stats[:, 1], 'k', lw=2, label='true')
    for j, name in enumerate(['exact', 'report', 'learned']):
        if name not in runs:
            ax[1, j].axis('off')
            ax[2, j].axis('off')
            continue
        x0, stats, paths = runs[name]
        ax[0, 2].plot(ts, stats[:, 1], 'o--', ms=3, color=f'C{j + 1}', label=name)
        band(ax[1, j])
        ax[1, j].plot(ts, paths.T, lw=1)
        ax[1, j].set(title=f'reverse, {name}: 5 chains', xlabel='t', ylabel='$x_t$', xlim=(T, 0))
        ax[1, j].legend(loc='upper right')
        ax[2, j].hist(x0.numpy(), bins=200, range=(xs[0].item(), xs[-1].item()), density=True,
                      color=f'C{j + 1}', alpha=0.6, label=f'$x_0$, {len(x0):,} samples')
        ax[2, j].plot(xs, pdf0, 'k', label='data density')
        ax[2, j].set(title=f'reverse, {name}: $x_0$', xlabel='$x_0$', ylabel='density')
        ax[2, j].legend()
    ax[0, 2].set(title='std of $x_t$: reverse processes vs the true marginal', xlabel='t',
                 ylabel='std', xlim=(T, 0))
    ax[0, 2].legend()
    fig.tight_layout()
    write_whole(path, lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)

def write_whole(path, write):  # write(tmp), renamed over path: a kill leaves the old file
    tmp = '.tmp'.join(os.path.splitext(path))  # keeps the extension
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f'ddpm_1d.py: could not write {path} ({e.strerror or e}); old file kept'
                         ) from None

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev = pick_device(c['device'])
    torch.manual_seed(c['seed'])
    g = torch.Generator().manual_seed(c['seed'])  # sampling is float64 on the CPU; eps_theta on dev
    os.makedirs(c['out_dir'], exist_ok=True)
    dump = json.dumps(c, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), lambda tmp: open(tmp, 'w').write(dump))
    write_whole(os.path.join(c['out_dir'], 'ddpm_1d.py'), lambda tmp: shutil.copy(__file__, tmp))

    T, n, n_keep = c['timesteps'], c['samples'], c['trajectories']
    betas = linear_betas(T, c['beta_start'], c['beta_end'])
    alphas_cumprod = torch.cumprod(1 - betas, 0)  # abar_t = prod_{s<=t} (1 - beta_s) (eq. 4)
    f64 = lambda *v: torch.tensor(v, dtype=torch.float64)
    w, m, p = ((f64(1.0), f64(c['data_mean']), f64(c['data_std'])) if c['data'] == 'gauss' else
               (f64(1 - c['mix_weight'], c['mix_weight']), f64(c['data_mean'], c['mix_mean']),
                f64(c['data_std'], c['mix_std'])))
    moments = lambda t: mixture_moments(w, *marginal_mean_var(alphas_cumprod[t], m, p))
    true_stats = torch.stack([torch.stack(moments(t)) for t in range(T + 1)])
    mean0, std0 = true_stats[0]
    print(f"device {dev} | data {c['data']}: mean {mean0:.4f} std {std0:.4f} | T {T}, beta "
          f"{c['beta_start']} -> {c['beta_end']} | alphas_cumprod_T {alphas_cumprod[T]:.2e} | "
          f'{n:,} samples')

    # forward: iterate q(x_t | x_{t-1}); compare x_T with the closed form q(x_T | x0), with N(0, 1)
    x0 = sample_marginal(n, alphas_cumprod[0], w, m, p, g)
    noise = lambda x: torch.randn(len(x), generator=g, dtype=x.dtype)
    fwd_step = lambda x, t: (1 - betas[t]).sqrt() * x + betas[t].sqrt() * noise(x)
    fwd = run_chain(fwd_step, x0, range(1, T + 1), n_keep)
    xs = torch.linspace(-12, 12, 24001, dtype=torch.float64)  # KL(q(x_T) || N(0, 1)) by quadrature
    mean_T, var_T = marginal_mean_var(alphas_cumprod[T], m, p)
    q_T = (w * torch.exp(-0.5 * (xs[:, None] - mean_T) ** 2 / var_T) / (2 * math.pi * var_T).sqrt())
    q_T = q_T.sum(-1)
    kl = (q_T * (q_T.log() + 0.5 * xs ** 2 + 0.5 * math.log(2 * math.pi))).sum() * (xs[1] - xs[0])
    print(f'forward | x_T over {n:,} chains: mean {fwd[1][T, 0]:.4f} std {fwd[1][T, 1]:.4f} | '
          f'closed form q(x_T): mean {true_stats[T, 0]:.4f} std {true_stats[T, 1]:.4f} | '
          f'KL(q(x_T) || N(0,1)) {kl:.1e} nats')

    runs, wanted = {}, ['exact', 'report', 'learned'] if c['reverse'] == 'all' else [c['reverse']]
    x_T = sample_marginal(n, alphas_cumprod[T], w, m, p, g)
    down = range(T, 0, -1)
    if 'exact' in wanted:
        runs['exact'] = run_chain(exact_step(betas, alphas_cumprod, w, m, p, g), x_T, down, n_keep)
    if 'report' in wanted:
        report = report_step(betas, alphas_cumprod, mean0, std0 ** 2, g)
        runs['report'] = run_chain(report, x_T, down, n_keep)
    if 'learned' in wanted:
        model = EpsMLP(c['hidden']).to(dev)
        print(f'learned | eps_theta: MLP, {sum(q.numel() for q in model.parameters()):,} '
              f"parameters, {c['train_steps']} steps of {c['batch_size']}, sigma^2 = {c['sigma']}")
        train(model, betas, alphas_cumprod, w, m, p, c, dev, g)
        star = lambda x, a: eps_star(x, a, w, m, p)
        gap, loss_theta, loss_star = eps_gap(model, star, betas, alphas_cumprod, w, m, p, dev, g)
        print(f'learned | mean (eps_theta - eps*)^2 {gap:.2e} | L_simple {loss_theta:.4f}, '
              f'at eps* {loss_star:.4f} (its minimum)')
        x_N = torch.randn(n, generator=g, dtype=torch.float64)  # DDPM's prior N(0, 1), for both
        state = g.get_state()
        theta_step = ddpm_step(model_eps(model, dev), betas, alphas_cumprod, c['sigma'], g)
        runs['learned'] = run_chain(theta_step, x_N, down, n_keep)
        g.set_state(state)  # the same noise for eps*: the difference is the network's error alone
        star_t = lambda x, t: star(x, alphas_cumprod[t])
        runs['eps*'] = run_chain(ddpm_step(star_t, betas, alphas_cumprod, c['sigma'], g), x_N, down,
                                 n_keep)
    for name, (x, stats, _) in runs.items():
        stats = stats.flip(0)  # chains ran t = T..0; index by t
        runs[name] = (x, stats, runs[name][2].flip(1))
        se = true_stats[:, 1:] / torch.tensor([n, 2 * n]).sqrt()  # standard errors: a mean, a std
        z = ((stats - true_stats).abs() / se).max(0).values
        print(f'{name:8s}| x_0: mean {stats[0, 0]:.4f} std {stats[0, 1]:.4f} (data {mean0:.4f} '
              f'{std0:.4f}) | KS to data {ks_distance(x, w, m, p):.4f} (chance level '
              f'{1.36 / math.sqrt(n):.4f}) | max over t of |error| / standard error: mean '
              f'{z[0]:.1f}, std {z[1]:.1f}')
    if runs:
        print('marginals of x_t, mean / std:\n     t | true            | '
              + ' | '.join(f'{k:15s}' for k in runs))
        for t in sorted({T, 1, 0, *range(0, T, max(1, T // 5))}, reverse=True):
            cols = [true_stats[t]] + [s[t] for _, s, _ in runs.values()]
            print(f'  {t:4d} | ' + ' | '.join(f'{a:7.4f} {b:7.4f}' for a, b in cols))
    path = os.path.join(c['out_dir'], 'ddpm_1d.png')
    plot(path, c, true_stats, fwd, {k: v for k, v in runs.items() if k != 'eps*'}, w, m, p)
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
