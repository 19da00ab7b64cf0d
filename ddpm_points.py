"""
2D point-cloud diffusion: a per-point DDPM on shapes, and a set model that generates whole stars.

DDPM (Ho et al. 2020) with the cosine (Nichol & Dhariwal 2021) or linear schedule, and DDIM (Song
et al. 2020); t = 0..T-1 stands for the papers' 1..T. Shapes (circle, square, the Datasaurus dino):
each point is a sample and an MLP eps_theta(x_t, t) learns the density; quality is the sliced W1
of generated to fresh points beside that of two fresh draws (the floor). Stars: a set network
denoises a whole star of 1024 points at once, predicting v (Salimans & Ho 2022); printed for real
and generated stars: the Chamfer distance to the nearest training star, radial spread and tips,
stray points and variety. Outputs go to out/ddpm_points/<dataset>; times: the README's.

    python ddpm_points.py --dataset dino     # sliced W1 1.36x its floor
    python ddpm_points.py --dataset circle   # 1.17x (square: 1.19x)
    python ddpm_points.py --dataset stars    # tips .183 (real .182), spread .072 (.067)
"""
import argparse
import json
import math
import os
import re
import shutil
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
dataset = 'dino'            # 'dino' | 'circle' | 'square' | 'stars'
points = 0                  # training points (stars: training stars); 0 = the dataset's default
schedule = 'cosine'         # 'cosine' | 'linear'
timesteps = 200             # T
beta_start = 1e-4           # beta_1 of 'linear'
beta_end = 0.02             # beta_T of 'linear'
arch = 'resnet'             # 'resnet' | 'report': tiny-diffusion's GELU blocks | 128-256-64-2 ReLU
hidden = 128                # width of the 'resnet' MLP
target = ''                 # 'eps' | 'v' (see v_target): the network's output; '' = v for stars
emb_scale = 25.0            # x and y are multiplied by this before their sinusoidal embedding
epochs = 0                  # passes over the training points; 0 = the dataset's default
batch_size = 0              # items per step (points, or stars); 0 = the dataset's default
lr = 3e-3                   # peak Adam learning rate, cosine-decayed to 0
ema = 0.995                 # decay of the weight average that is sampled from; 0 = off
sampler = 'ddpm'            # 'ddpm' | 'ddim'
sample_steps = 0            # reverse steps; 0 = timesteps (DDIM can take fewer)
sigma = 'beta_tilde'        # 'beta_tilde' | 'beta' (variance of the DDPM step)
noise_below = 0             # DDPM: only steps at t < this add noise, the rest are DDIM's (eta 0);
                            # 0 = the dataset's default: stars 30, shapes all T (see sample)
eta = 0.0                   # DDIM noise: 0 = deterministic, 1 = DDPM-like
clip_x0 = 4.0               # clamp the predicted x0 to [-c, c] (data are standardised); 0 = off
eval_points = 2000          # points per set in the sliced W1
eval_repeats = 8            # generated sets scored at the end (2 at snapshots; the floor 4x)
snapshots = '1,5,10,20,40'  # epochs (besides the last) to sample, score and draw
gif = False                 # also write the reverse process as a GIF (needs pillow)
set_model = 'polar'         # 'polar' | 'stats': the stars' set network (see SetDenoiser)
star_points = 1024          # points per star
eval_stars = 64             # generated stars scored by Chamfer distance to the training stars
log_every = 500             # steps between progress lines
seed = 0                    # seeds data, noise and initial weights
device = 'auto'             # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
out_dir = 'out/ddpm_points' # a folder per dataset is made inside
overwrite = False           # replace a finished run in that folder (else a second run there stops)

DINO = """
55.3846,97.1795 51.5385,96.0256 46.1538,94.4872 42.8205,91.4103 40.7692,88.3333 38.7179,84.8718
35.641,79.8718 33.0769,77.5641 28.9744,74.4872 26.1538,71.4103 23.0769,66.4103 22.3077,61.7949
22.3077,57.1795 23.3333,52.9487 25.8974,51.0256 29.4872,51.0256 32.8205,51.0256 35.3846,51.4103
40.2564,51.4103 44.1026,52.9487 46.6667,54.1026 50,55.2564 53.0769,55.641 56.6667,56.0256
59.2308,57.9487 61.2821,62.1795 61.5385,66.4103 61.7949,69.1026 57.4359,55.2564 54.8718,49.8718
52.5641,46.0256 48.2051,38.3333 49.4872,42.1795 51.0256,44.1026 45.3846,36.4103 42.8205,32.5641
38.7179,31.4103 35.1282,30.2564 32.5641,32.1795 30,36.7949 33.5897,41.4103 36.6667,45.641
38.2051,49.1026 29.7436,36.0256 29.7436,32.1795 30,29.1026 32.0513,26.7949 35.8974,25.2564
41.0256,25.2564 44.1026,25.641 47.1795,28.718 49.4872,31.4103 51.5385,34.8718 53.5897,37.5641
55.1282,40.641 56.6667,42.1795 59.2308,44.4872 62.3077,46.0256 64.8718,46.7949 67.9487,47.9487
70.5128,53.718 71.5385,60.641 71.5385,64.4872 69.4872,69.4872 46.9231,79.8718 48.2051,84.1026
50,85.2564 53.0769,85.2564 55.3846,86.0256 56.6667,86.0256 56.1538,82.9487 53.8462,80.641
51.2821,78.718 50,78.718 47.9487,77.5641 29.7436,59.8718 29.7436,62.1795 31.2821,62.5641
57.9487,99.4872 61.7949,99.1026 64.8718,97.5641 68.4615,94.1026 70.7692,91.0256 72.0513,86.4103
73.8462,83.3333 75.1282,79.1026 76.6667,75.2564 77.6923,71.4103 79.7436,66.7949 81.7949,60.2564
83.3333,55.2564 85.1282,51.4103 86.4103,47.5641 87.9487,46.0256 89.4872,42.5641 93.3333,39.8718
95.3846,36.7949 98.2051,33.718 56.6667,40.641 59.2308,38.3333 60.7692,33.718 63.0769,29.1026
64.1026,25.2564 64.359,24.1026 74.359,22.9487 71.2821,22.9487 67.9487,22.1795 65.8974,20.2564
63.0769,19.1026 61.2821,19.1026 58.7179,18.3333 55.1282,18.3333 52.3077,18.3333 49.7436,17.5641
47.4359,16.0256 44.8718,13.718 48.7179,14.8718 51.2821,14.8718 54.1026,14.8718 56.1538,14.1026
52.0513,12.5641 48.7179,11.0256 47.1795,9.8718 46.1538,6.0256 50.5128,9.4872 53.8462,10.2564
57.4359,10.2564 60,10.641 64.1026,10.641 66.9231,10.641 71.2821,10.641 74.359,10.641 78.2051,10.641
67.9487,8.718 68.4615,5.2564 68.2051,2.9487 37.6923,25.7692 39.4872,25.3846 91.2821,41.5385
50,95.7692 47.9487,95 44.1026,92.6923
"""

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

def check_config(c):  # flags a run cannot use, each refused with one line
    stars = c['dataset'] == 'stars'
    for bad, why in [
        (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
         '--sample-steps needs --sampler ddim (DDPM runs all T steps)'),
        (c['sampler'] == 'ddim' and c['noise_below'], "--noise-below is DDPM's; DDIM has --eta"),
        (stars and c['gif'], "--gif draws a shape's reverse process; stars.png shows the stars"),
        (not stars and c['set_model'] != set_model, '--set-model is for --dataset stars'),
        (stars and c['arch'] != arch, "--arch is the shapes' MLP; stars use --set-model")]:
        if bad:
            raise SystemExit(f'ddpm_points.py: {why}')


# ---- schedule ----
def linear_betas(T, beta_start, beta_end):  # Ho et al. sec. 4, float64, index t = 0..T-1
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)

def cosine_alphas_cumprod(T, s=0.008):
    """abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) pi/2)^2, t = 0..T (N&D eq. 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]

def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), clipped at max_beta (abar(T) = 0 would make beta_T 1)."""
    alphas_cumprod = cosine_alphas_cumprod(T, s)
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)

def make_betas(c):  # EDIT ME: a schedule of your own is one more entry (a name not here fails)
    return {'linear': lambda: linear_betas(c['timesteps'], c['beta_start'], c['beta_end']),
            'cosine': lambda: cosine_betas(c['timesteps'])}[c['schedule']]()

def q_sample(x0, alphas_cumprod_t, noise):
    """x_t ~ q(x_t | x0) (eq. 4); alphas_cumprod_t broadcasts against x0."""
    return alphas_cumprod_t.sqrt() * x0 + (1 - alphas_cumprod_t).sqrt() * noise

def q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod):
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t) (eqs. 6-7), abar_{-1} = 1."""
    a, b, ap = alphas_cumprod[t], betas[t], alphas_cumprod[t - 1] if t > 0 else 1.0
    c0, ct = ap ** 0.5 * b / (1 - a), (1 - b) ** 0.5 * (1 - ap) / (1 - a)
    return c0 * x0 + ct * xt, (1 - ap) / (1 - a) * b

def predict_x0(xt, eps, alphas_cumprod_t):
    """Invert eq. 4: x0 = (x_t - sqrt(1 - alphas_cumprod_t) eps) / sqrt(alphas_cumprod_t)."""
    return (xt - (1 - alphas_cumprod_t) ** 0.5 * eps) / alphas_cumprod_t ** 0.5

def v_target(x0, alphas_cumprod_t, noise):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, eq. 24)."""
    return alphas_cumprod_t.sqrt() * noise - (1 - alphas_cumprod_t).sqrt() * x0

def x0_eps_from_v(xt, v, alphas_cumprod_t):
    """x0 = a x_t - b v, eps = b x_t + a v (a = sqrt(abar_t), b = sqrt(1 - abar_t)): no division,
    so an error of v is not amplified by 1 / a in x0 as an error of eps is."""
    a, b = alphas_cumprod_t ** 0.5, (1 - alphas_cumprod_t) ** 0.5
    return a * xt - b * v, b * xt + a * v


# ---- model ----
def sinusoidal(x, dim, scale=1.0):
    """(N,) -> (N, dim) sin and cos of scale * x at geometric frequencies 1 .. 1e-4."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=x.device) / (dim // 2 - 1))
    a = scale * x.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)

class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ff = nn.Linear(width, width)

    def forward(self, x):
        return x + F.gelu(self.ff(x))

class PointMLP(nn.Module):
    """eps_theta(x_t, t) on sinusoidal embeddings of x, y and t. 'resnet': tiny-diffusion's 128-wide
    embeddings and three residual GELU blocks; 'report': 32-wide ones, 128-256-64-2 with ReLU."""
    def __init__(self, arch='resnet', hidden=128, emb_scale=25.0):
        super().__init__()
        self.emb, self.scale = (128 if arch == 'resnet' else 32), emb_scale
        if arch == 'resnet':
            self.net = nn.Sequential(nn.Linear(3 * self.emb, hidden), nn.GELU(),
                                     *[Block(hidden) for _ in range(3)], nn.Linear(hidden, 2))
        else:
            self.net = nn.Sequential(nn.Linear(3 * self.emb, 128), nn.ReLU(), nn.Linear(128, 256),
                                     nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x, t):  # x (N, 2), t (N,) -> (N, 2)
        emb = lambda v, s=self.scale: sinusoidal(v, self.emb, s)
        return self.net(torch.cat([emb(x[:, 0]), emb(x[:, 1]), emb(t, 1.0)], 1))

class SetDenoiser(nn.Module):
    """eps_theta (or v) of a whole set x_t (B, N, 2), one t a set, permutation-equivariant. Each
    point starts from its coordinates, its offset from the centroid, their embeddings and t's, then
    passes residual blocks where the points meet. 'polar': PointNet-style pooling over 64 sectors of
    angle around the centroid: each block averages the points' features per sector (split between
    the two nearest), convolves along the ring of sectors (dilations 1, 2, 4, 8: the last block
    sees the whole turn) and hands each point its sectors' result; O(N), it sees a star's radius as
    a function of angle. t scales and shifts each block's features (FiLM, as DiT's adaLN does).
    'stats' (a course report's): a per-point MLP also fed the set's mean and variance."""
    def __init__(self, mode='polar', hidden=128, layers=4, emb=32, emb_scale=25.0, sectors=64):
        super().__init__()
        self.mode, self.emb, self.scale, self.sectors = mode, emb, emb_scale, sectors
        self.inp = nn.Linear(6 + 3 * emb + (2 if mode == 'stats' else 0), hidden)
        self.ff = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        if mode == 'polar':
            self.conv = nn.ModuleList(nn.Conv1d(hidden, hidden, 5, dilation=2 ** i)
                                      for i in range(layers))
        self.out = nn.Linear(hidden, 2)
        if mode == 'polar':
            self.film = nn.ModuleList(nn.Linear(emb, 2 * hidden) for _ in range(layers))

    def forward(self, x, t):  # x (B, N, 2), t (B,) -> (B, N, 2)
        B, N, _ = x.shape
        centre = x.mean(1, keepdim=True)  # (B, 1, 2)
        d = (x - centre).reshape(B * N, 2)
        emb, t_emb = lambda v, s=self.scale: sinusoidal(v, self.emb, s), sinusoidal(t, self.emb)
        h = [x.reshape(B * N, 2), d, centre.expand(-1, N, -1).reshape(B * N, 2), emb(d[:, 0]),
             emb(d[:, 1]), t_emb.repeat_interleave(N, 0)]
        if self.mode == 'stats':
            h.append(x.var(1).repeat_interleave(N, 0))
        h = F.gelu(self.inp(torch.cat(h, 1))).view(B, N, -1)  # (B, N, H)
        if self.mode == 'polar':  # each point's place on the ring of sectors, its share of the next
            pos = (torch.atan2(d[:, 1], d[:, 0]).view(B, N) / (2 * math.pi) + 0.5) * self.sectors
            lo = pos.floor().long().clamp(0, self.sectors - 1)
            w = (pos - lo)[..., None].clamp(0, 1)  # (B, N, 1)
            lo, hi = (v[..., None].expand_as(h) for v in (lo, (lo + 1) % self.sectors))  # (B, N, H)
        for i, ff in enumerate(self.ff):
            u = ff(h)
            if self.mode == 'polar':
                scale, shift = self.film[i](t_emb)[:, None].chunk(2, -1)  # (B, 1, H) each
                u = (u + self.ring(h, lo, hi, w, self.conv[i])) * (1 + scale) + shift
            h = h + F.gelu(u)
        return self.out(h)

    def ring(self, h, lo, hi, w, conv):
        """Features h (B, N, H) averaged per sector, circularly convolved along the ring, read back
        per point."""
        B, _, H = h.shape
        zeros = h.new_zeros(B, self.sectors, H)
        sums = zeros.scatter_add(1, lo, h * (1 - w)).scatter_add_(1, hi, h * w)  # (B, S, H)
        counts = zeros[..., :1].scatter_add(1, lo[..., :1], 1 - w).scatter_add_(1, hi[..., :1], w)
        g = (sums / (counts + 1e-3)).transpose(1, 2)  # (B, H, S); an empty sector reads as 0
        pad = 2 * conv.dilation[0]
        g = F.gelu(conv(F.pad(g, (pad, pad), mode='circular'))).transpose(1, 2)  # (B, S, H)
        return g.gather(1, lo) * (1 - w) + g.gather(1, hi) * w


# ---- sampling ----
@torch.no_grad()
def sample(model, shape, betas, steps=0, method='ddpm', sigma='beta_tilde', eta=0.0, clip=0.0,
           generator=None, device='cpu', keep=(), target='eps', noise_below=None):
    """Reverse process from x_T ~ N(0, I): 'ddpm', Algorithm 2 over all T steps; 'ddim', eq. 12
    on `steps` timesteps. model(x, t (N,)) -> eps or v (target). clip > 0 clamps the predicted x0
    (near t = T, 1 / sqrt(abar_t) ~ 1e4 multiplies eps's error). DDPM steps at t >= noise_below
    are DDIM's without noise (the stars' tips stay sharp). Returns x_0, {t: x_t} for t in keep."""
    alphas_cumprod, T = torch.cumprod(1 - betas.double(), 0).tolist(), len(betas)
    betas, x = betas.tolist(), torch.randn(shape, generator=generator, device=device)
    snaps = {T: x.cpu()} if T in keep else {}
    ts = range(T - 1, -1, -1) if method == 'ddpm' else torch.linspace(T - 1, 0, steps or T).round()
    ts = [int(t) for t in ts]
    for i, t in enumerate(ts):
        a = alphas_cumprod[t]
        out = model(x, torch.full(shape[:1], t, device=device, dtype=torch.long))
        x0, eps = x0_eps_from_v(x, out, a) if target == 'v' else (predict_x0(x, out, a), out)
        x0 = x0.clamp(-clip, clip) if clip > 0 else x0
        if method == 'ddpm' and (noise_below is None or t < noise_below):
            mean, var = q_posterior_mean_var(x0, x, t, betas, alphas_cumprod)
            z = torch.randn(shape, generator=generator, device=device) if t else 0
            x = mean + (betas[t] if sigma == 'beta' else var) ** 0.5 * z
        else:
            a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0
            eta_t = eta if method == 'ddim' else 0.0  # a DDPM step above noise_below: no noise
            s = eta_t * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5  # eq. 16
            z = torch.randn(shape, generator=generator, device=device)
            x = a_prev ** 0.5 * x0 + (1 - a_prev - s ** 2) ** 0.5 * eps + s * z  # eq. 12
        if t in keep:
            snaps[t] = x.cpu()
    return x, snaps

def sliced_w1(a, b, seed=0, n_dirs=256):
    """Mean over n_dirs fixed random directions of the 1D Wasserstein-1 distance between the
    projections of two equal-size point sets a, b (N, 2): sorted projections, mean |difference|."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(n_dirs, generator=g, dtype=torch.float64) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], 1)
    pa, pb = (a.double() @ dirs.T).sort(0).values, (b.double() @ dirs.T).sort(0).values
    return (pa - pb).abs().mean().item()


# ---- data ----
def make_shape(name, n, rng):
    """n points of a shape, standardised later. Outlines carry jitter of 1-2% of their size."""
    if name == 'circle':
        a = rng.uniform(0, 2 * math.pi, n)
        x = np.stack([np.cos(a), np.sin(a)], 1) + rng.normal(size=(n, 2)) * 0.02
    elif name == 'square':
        u, side = rng.uniform(-1, 1, n), rng.integers(0, 4, n)
        which = [side == 0, side == 1, side == 2]
        x = np.stack([np.select(which, [u, np.ones(n), u], -np.ones(n)),
                      np.select(which, [-np.ones(n), u, np.ones(n)], u)], 1)
        x += rng.normal(size=(n, 2)) * 0.02
    else:  # dino: the 142 points, resampled, with tiny-diffusion's jitter of 0.15 in table units
        table = np.array([[float(v) for v in p.split(',')] for p in DINO.split()])
        x = table[rng.integers(0, len(table), n)] + rng.normal(size=(n, 2)) * 0.15
    return torch.from_numpy(x).float()

class Shape:
    """A 2D distribution to draw from, standardised by a large reference draw (mean 0, std 1)."""
    def __init__(self, name, seed=0):
        self.name, self.rng = name, np.random.default_rng(seed)
        ref = make_shape(name, 200_000, np.random.default_rng(seed + 1_000))
        self.mean, self.std = ref.mean(0), ref.std()

    def draw(self, n):
        return (make_shape(self.name, n, self.rng) - self.mean) / self.std

def make_stars(n, n_points, rng):
    """n stars of n_points, (n, n_points, 2): k ~ U{5..8} tips, outer radius R ~ U(0.5, 1), inner
    U(0.35, 0.65) R, rotation U(0, 2 pi), centre U(-0.5, 0.5)^2; points evenly spaced along the
    2k-gon (random phase), jittered by N(0, (0.01 R)^2), and shuffled: a set has no order."""
    out = np.empty((n, n_points, 2))
    for i in range(n):
        k, R = rng.integers(5, 9), rng.uniform(0.5, 1.0)
        angle = rng.uniform(0, 2 * math.pi) + math.pi * np.arange(2 * k) / k
        radius = R * np.where(np.arange(2 * k) % 2 == 0, 1.0, rng.uniform(0.35, 0.65))
        verts = radius[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        verts += rng.uniform(-0.5, 0.5, 2)
        edge = np.roll(verts, -1, 0) - verts
        cum = np.concatenate([[0], np.cumsum(np.linalg.norm(edge, axis=1))])
        s = (np.arange(n_points) + rng.random()) / n_points * cum[-1]  # arc length of each point
        j = np.searchsorted(cum, s, 'right') - 1
        pts = verts[j] + edge[j] * ((s - cum[j]) / (cum[j + 1] - cum[j]))[:, None]
        out[i] = rng.permutation(pts + rng.normal(size=(n_points, 2)) * 0.01 * R)
    return torch.from_numpy(out).float()

class Stars:
    """Whole stars to draw from, scaled by one number so the points' overall std is 1."""
    def __init__(self, n_points, seed=0):
        self.n_points = n_points
        self.scale = make_stars(256, n_points, np.random.default_rng(seed + 1_000)).std()
        self.rng = np.random.default_rng(seed)

    def draw(self, n):
        return make_stars(n, self.n_points, self.rng) / self.scale

def mean_se(v):  # the mean and its standard error
    return float(np.mean(v)), float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0

def chamfer(a, b):
    """Symmetric Chamfer distance between point sets a (..., N, 2) and b (..., M, 2): the mean
    distance from a point to the other set's nearest point, both ways, halved."""
    d = torch.cdist(a, b)
    return 0.5 * (d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1))

def nearest_star(stars, train, sub=128, top=16):
    """Each star's (K, N, 2) Chamfer distance to its nearest in train (M, N, 2), and its index: the
    `top` nearest on `sub` points (a random subset: points are shuffled) are compared on all N (at
    128 points the spacing along the outline hides how thin it is, at 1024 it doesn't)."""
    dist, idx = [], []
    for s in stars:
        near = chamfer(s[:sub].expand(len(train), -1, -1), train[:, :sub])
        near = near.topk(min(top, len(train)), largest=False).indices
        full = chamfer(s.expand(len(near), -1, -1), train[near])
        dist.append(full.min().item())
        idx.append(near[full.argmin()].item())
    return np.array(dist), np.array(idx)

def radial_profile(stars, bins=36):
    """Is each set (K, N, 2) a star's outline, and which star? r: the points' distance to the
    centroid, in 10-degree sectors. Spread: the std of r in a sector over the mean r, averaged (a
    star 0.067, a circle with 1% jitter 0.01, a disc 0.35). Tips: the std over sectors of their mean
    r, over the mean r (a star 0.18, a circle or disc ~0). Chamfer barely tells them apart. Traits
    (K, 5): the tip count (the strongest harmonic 3..12 of the sectors' mean r), the inner over the
    outer radius (their least over their largest mean r), the outer radius, the centroid's x, y."""
    d = stars - stars.mean(1, keepdim=True)
    r, angle = d.norm(dim=2), torch.atan2(d[..., 1], d[..., 0])
    sector = ((angle / math.pi + 1) / 2 * bins).long().clamp(max=bins - 1)
    count = torch.zeros(len(stars), bins).scatter_add_(1, sector, torch.ones_like(r)).clamp(min=1)
    per = lambda v: torch.zeros(len(stars), bins).scatter_add_(1, sector, v) / count  # (K, bins)
    mean_r, spread = per(r), (per(r ** 2) - per(r) ** 2).clamp(min=0).sqrt()
    k, outer = torch.fft.rfft(mean_r).abs()[:, 3:13].argmax(1) + 3, mean_r.max(1).values
    traits = torch.stack([k.float(), mean_r.min(1).values / outer, outer, *stars.mean(1).T], 1)
    return (spread.mean(1) / r.mean(1)).numpy(), (mean_r.std(1) / r.mean(1)).numpy(), traits.numpy()

def stray(stars, k=4):
    """Per set (K, N, 2), the share of points whose k-th nearest neighbour is over 3x as far as the
    set's median such distance: points inside a star or off its outline (real stars: none)."""
    d = torch.stack([torch.cdist(s, s).topk(k + 1, largest=False).values[:, -1] for s in stars])
    return (d > 3 * d.median(1, keepdim=True).values).float().mean(1).numpy()

def variety(traits, ref, draws=200):
    """Each trait's std over the real stars' (ref): 1 for stars as varied as the real ones, less for
    stars collapsed toward a typical one (a shifted mean is for tips and spread to show). The five
    ratios, their mean, and its bootstrap standard error over `draws` resamplings of the stars."""
    ratios, rng = lambda x: x.std(0, ddof=1) / ref.std(0, ddof=1), np.random.default_rng(0)
    boot = [ratios(traits[rng.integers(0, len(traits), len(traits))]).mean() for _ in range(draws)]
    return (r := ratios(traits)), r.mean(), float(np.std(boot, ddof=1))

def profile_line(stars, ref):
    spread, tips, traits = radial_profile(stars)
    k = '/'.join(map(str, np.bincount(traits[:, 0].astype(int).clip(4, 9), minlength=10)[4:]))
    ratios, v, v_se = variety(traits, ref)
    each = ', '.join(f'{n} {r:.2f}' for n, r in zip(('k', 'ratio', 'size', 'x', 'y'), ratios))
    return ' | '.join(f'{name} {m:.3f} +- {se:.3f}' for name, (m, se) in zip(
        ('radial spread', 'tips', 'stray'), map(mean_se, (spread, tips, stray(stars))))) + \
        f" | variety {v:.2f} +- {v_se:.2f} ({each}) | tip counts <5/5/6/7/8/>8 {k}"

def sample_items(model, c, shape, betas, dev, generator):
    n = 8 if len(shape) == 3 and dev.type == 'cpu' else shape[0]  # 8 stars at a time: 2x faster
    return torch.cat([sample(model, (min(n, shape[0] - i), *shape[1:]), betas, c['sample_steps'],
                             c['sampler'], c['sigma'], c['eta'], c['clip_x0'], generator, dev,
                             target=c['target'], noise_below=c['noise_below'])[0].cpu()
                      for i in range(0, shape[0], n)])

def evaluate(model, source, train, betas, c, dev, generator, repeats):
    """(mean, se) and the samples. Shapes: the sliced W1 of `repeats` generated sets of eval_points
    to fresh data; stars: the Chamfer distance of eval_stars stars to the nearest training star."""
    if isinstance(source, Stars):
        x = sample_items(model, c, (c['eval_stars'], c['star_points'], 2), betas, dev, generator)
        return mean_se(nearest_star(x, train)[0]), x
    n = c['eval_points']
    x = sample_items(model, c, (n * repeats, 2), betas, dev, generator)
    return mean_se([sliced_w1(x[i * n:(i + 1) * n], source.draw(n), i) for i in range(repeats)]), x


# ---- train ----
DEFAULTS = {'dino': (30_000, 60, 1024), 'circle': (3_000, 100, 1024), 'square': (3_000, 100, 1024),
            'stars': (1024, 18, 8)}  # training items, epochs, batch

def pick_device(name):  # 'auto': cuda, then mps, then cpu
    mps, cuda = torch.backends.mps.is_available(), torch.cuda.is_available()
    return torch.device(name if name != 'auto' else 'cuda' if cuda else 'mps' if mps else 'cpu')

def make_model(c):
    if c['dataset'] == 'stars':
        return SetDenoiser(c['set_model'], c['hidden'], emb_scale=c['emb_scale'])
    return PointMLP(c['arch'], c['hidden'], c['emb_scale'])

def train(c, dev, out):
    """One loop for both: an item is a point (2,) of a shape or a whole star (star_points, 2)."""
    stars = c['dataset'] == 'stars'
    source = Stars(c['star_points'], c['seed']) if stars else Shape(c['dataset'], c['seed'])
    n, epochs, batch = (c[k] or v for k, v in zip(('points', 'epochs', 'batch_size'),
                                                   DEFAULTS[c['dataset']]))
    data = source.draw(n).to(dev)
    betas = make_betas(c)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(dev)
    model, ema = make_model(c).to(dev), make_model(c).to(dev).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    steps_per_epoch = math.ceil(len(data) / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.Adam(model.parameters(), lr=c['lr'])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: math.cos(math.pi * i / total) / 2 + .5)
    name = f"set model '{c['set_model']}'" if stars else f"{c['arch']} MLP"
    print(f"data {c['dataset']}: {tuple(data.shape)} | schedule {c['schedule']}, T {len(betas)}, "
          f"alphas_cumprod_T {alphas_cumprod[-1]:.1e} | predicts {c['target']} | {name}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters | {epochs} epochs of "
          f"{steps_per_epoch} steps, batch {batch}")
    g = torch.Generator(dev).manual_seed(c['seed'])
    if stars:  # the reference: fresh real stars against the training stars
        real = source.draw(c['eval_stars'])
        fresh, ref = nearest_star(real, data.cpu()), radial_profile(data.cpu())[2]
        floor, floor_se = mean_se(fresh[0])
        print(f"eval | reference: {c['eval_stars']} fresh real stars: Chamfer to the nearest "
              f'training star {floor:.4f} +- {floor_se:.4f} | {len(set(fresh[1]))} distinct '
              f'nearest training stars | {profile_line(real, ref)}')
        marks = [epochs]
    else:
        n = c['eval_points']  # the floor: two fresh draws of the data
        floor, floor_se = mean_se([sliced_w1(source.draw(n), source.draw(n), seed=i)
                                   for i in range(4 * c['eval_repeats'])])
        print(f"eval | floor: sliced W1 between two fresh draws of {c['eval_points']:,} data "
              f'points {floor:.4f} +- {floor_se:.4f}')
        marks = {int(e) for e in c['snapshots'].split(',') if e.strip() and 0 < int(e) < epochs}
        marks = sorted(marks | {epochs})
    snaps, curve, step, seen, t0 = {}, [], 0, 0, time.time()
    try:  # the model is saved at the end: an interrupt before it keeps nothing of this run
        for epoch in range(1, epochs + 1):
            for idx in torch.randperm(len(data), generator=g, device=dev).split(batch):
                x0 = data[idx]
                t = torch.randint(0, len(betas), (len(x0),), generator=g, device=dev)
                noise = torch.randn(x0.shape, generator=g, device=dev)
                alphas_cumprod_t = alphas_cumprod[t].view(-1, *[1] * (x0.dim() - 1))  # (B, 1[, 1])
                want = noise if c['target'] == 'eps' else v_target(x0, alphas_cumprod_t, noise)
                loss = F.mse_loss(model(q_sample(x0, alphas_cumprod_t, noise), t), want)
                if not torch.isfinite(loss):
                    raise SystemExit(f'ddpm_points.py: loss {loss.item()} at step {step}; lower lr')
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step, seen = step + 1, seen + x0[..., 0].numel()  # points/s: partial batches too
                with torch.no_grad():  # warm-up: the average covers at most the steps taken so far
                    for pe, pm in zip(ema.parameters(), model.parameters()):
                        pe.lerp_(pm, 1 - min(c['ema'], (1 + step) / (10 + step)))
                curve.append(loss.item())
                if step % c['log_every'] == 0 or step == total:
                    ms = (time.time() - t0) / step * 1e3
                    print(f"step {step}/{total} | loss {np.mean(curve[-c['log_every']:]):.4f} | lr "
                          f'{sched.get_last_lr()[0]:.1e} | {ms:.2f} ms/step | '
                          f'{seen / step / ms * 1e3:,.0f} points/s | '
                          f'eta {ms * (total - step) / 6e4:.1f}m')
            if epoch in marks:
                repeats = c['eval_repeats'] if epoch == epochs else min(2, c['eval_repeats'])
                (score, score_se), x = evaluate(ema, source, data.cpu(), betas, c, dev, g, repeats)
                snaps[epoch] = x[:c['eval_points']] if not stars else x
                what = 'Chamfer to nearest training star' if stars else 'sliced W1'
                print(f'eval | epoch {epoch} | step {step} | {what} {score:.4f} +- {score_se:.4f}'
                      f" | {score / floor:.2f}x {'real stars' if stars else 'floor'} | "
                      f'{time.time() - t0:.0f}s')
    except KeyboardInterrupt:
        raise SystemExit(f'ddpm_points.py: interrupted at step {step} of {total}; a run saves its '
                         'model at its end, so this one saved none') from None
    # saved before the figures, so a plotting failure (no pillow for --gif) keeps the trained model
    ckpt = dict(model=model.state_dict(), ema=ema.state_dict(), config=c, script='ddpm_points.py')
    write_whole(os.path.join(out, 'ckpt.pt'), lambda tmp: torch.save(ckpt, tmp))
    if stars:
        print(f'eval | {len(set(nearest_star(x, data.cpu())[1]))} distinct nearest training stars '
              f'among {len(x)} generated | {profile_line(x, ref)}')
        write_whole(os.path.join(out, 'samples.npz'), lambda tmp: np.savez(tmp, stars=x.numpy()))
        plot_stars(out, data.cpu(), x)
    else:
        plot_shape(out, c, source, betas, ema, snaps, curve, dev, g)

def plot_stars(out, train, gen, k=8):
    k = min(k, len(gen), len(train))
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, k, figsize=(2 * k, 4.3), squeeze=False)
    for j in range(k):
        for a, x, what in ((ax[0, j], train[j], 'training'), (ax[1, j], gen[j], 'generated')):
            a.scatter(*x.T, s=0.5, c='k' if what == 'training' else 'C0')
            a.set(xlim=(-3, 3), ylim=(-3, 3), aspect='equal', xticks=[], yticks=[],
                  title=f'{what} star')
    fig.tight_layout()
    write_whole(os.path.join(out, 'stars.png'), lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close(fig)

def plot_shape(out, c, shape, betas, model, snaps, curve, dev, g):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    T, x0 = len(betas), shape.draw(c['eval_points'])
    alphas_cumprod = torch.cumprod(1 - betas, 0).float()
    kw = dict(s=1, alpha=0.5)
    fig, ax = plt.subplots(1, 6, figsize=(18, 3.3))
    for a, t in zip(ax, [0, T // 10, T // 4, T // 2, 3 * T // 4, T - 1]):
        a.scatter(*q_sample(x0, alphas_cumprod[t], torch.randn(x0.shape)).T, **kw)
        a.set(title=f'forward q(x_t | x_0), t = {t + 1}', xlim=(-3, 3), ylim=(-3, 3),
              aspect='equal', xlabel='x (standardised)', ylabel='y')
    fig.tight_layout()
    write_whole(os.path.join(out, 'forward.png'), lambda tmp: fig.savefig(tmp, dpi=80))
    fig, ax = plt.subplots(1, len(snaps) + 2, figsize=(3 * (len(snaps) + 2), 3.3))
    ax[0].scatter(*x0.T, **kw, c='k')
    ax[0].set(title=f"data: {c['dataset']}")
    for a, (epoch, x) in zip(ax[1:], snaps.items()):
        a.scatter(*x.T, **kw)
        a.set(title=f'samples after epoch {epoch}')
    ax[-1].plot(np.convolve(curve, np.ones(100) / 100, mode='valid'))
    ax[-1].set(title='training loss (mean of 100 steps)', xlabel='step', ylabel='loss',
               yscale='log', aspect='auto')
    for a in ax[:-1]:
        a.set(xlim=(-3, 3), ylim=(-3, 3), aspect='equal', xlabel='x (standardised)', ylabel='y')
    fig.tight_layout()
    write_whole(os.path.join(out, 'samples.png'), lambda tmp: fig.savefig(tmp, dpi=80))
    plt.close('all')
    if c['gif']:
        from PIL import Image
        keep = set(range(0, T + 1, max(1, T // 40))) | {T}
        _, path = sample(model, (c['eval_points'], 2), betas, 0, 'ddpm', c['sigma'], 0,
                         c['clip_x0'], g, dev, keep, c['target'])
        frames = []
        for t in sorted(path, reverse=True):
            fig, a = plt.subplots(figsize=(3.3, 3.3))
            a.scatter(*path[t].T, **kw)
            a.set(title=f'reverse process, t = {t}', xlim=(-3, 3), ylim=(-3, 3), aspect='equal')
            fig.canvas.draw()
            frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
            plt.close(fig)
        write_whole(os.path.join(out, 'reverse.gif'), lambda tmp: frames[0].save(
            tmp, save_all=True, append_images=frames[1:] + frames[-1:] * 10, duration=80))

def write_whole(path, write):  # write(tmp), renamed over path: a kill leaves the old file
    tmp = '.tmp'.join(os.path.splitext(path))  # keeps the extension
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        why = getattr(e, 'strerror', 0) or e
        raise SystemExit(f'ddpm_points.py: could not write {path} ({why}); old file kept') from None

def main(argv=None):
    c = get_config(argv)
    c['target'] = c['target'] or ('v' if c['dataset'] == 'stars' else 'eps')
    check_config(c)
    c['noise_below'] = c['noise_below'] or (30 if c['dataset'] == 'stars' else c['timesteps'])
    dev, out = pick_device(c['device']), os.path.join(c['out_dir'], c['dataset'])
    torch.manual_seed(c['seed'])
    if os.path.exists(os.path.join(out, 'ckpt.pt')) and not c['overwrite']:  # before any write
        raise SystemExit(f'ddpm_points.py: {out} holds a finished run; keep it and pass another '
                         '--out-dir, or replace it with --overwrite true')
    os.makedirs(out, exist_ok=True)
    dump = json.dumps(c, indent=2)
    write_whole(os.path.join(out, 'config.json'), lambda tmp: open(tmp, 'w').write(dump))
    write_whole(os.path.join(out, 'ddpm_points.py'), lambda tmp: shutil.copy(__file__, tmp))
    print(f'device {dev} | output {out}')
    train(c, dev, out)


if __name__ == '__main__':
    main()
