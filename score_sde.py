"""
Score-based generative modelling through SDEs on MNIST (or CIFAR-10, or an image folder: FFHQ).

Song et al. 2021 (arXiv:2011.13456). Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, 1]:
  've': dx = sigma^t dw, kernel N(x(0), (sigma^(2t) - 1) / (2 log sigma) I), prior N(0, std(1)^2
        I) (the paper's tutorial; sigma = 25 for MNIST, 50 for CIFAR-10 and folders);
  'vp': dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta linear in t (eqs. 11, 32-33), prior N(0, I).
Denoising score matching (eq. 7) with lambda(t) = std(t)^2, t ~ U(eps, 1): |std s(x_t, t) + z|^2
over pixels. The score network is a U-Net with Gaussian Fourier features of t, input scaled by
1 / sqrt(mean(t)^2 0.5^2 + std(t)^2) (EDM's c_in), output divided by std(t). Samplers: Euler-
Maruyama on the reverse SDE (eq. 6) from t = 1 to eps, the last step returning its mean;
predictor-corrector (EM and a Langevin corrector, the step rule of Algorithms 4-5); the
probability-flow ODE (eq. 13) by an adaptive Dormand-Prince RK45 written here in torch. Likelihood
(appendix D.2): log p_0(x) = log p_1(x(1)) + the integral of div f~ along the ODE, div by
Hutchinson's estimator (a Rademacher probe an image); bits/dim of 8-bit images by uniform
dequantisation, plus log2(256 / the data range's width) (the reference's 'offset = 7 -
inverse_scaler(-1)'). --eval: each sampler's NFE, time and, on MNIST, the judge's figures.

Run (times on a 2-core CPU; the README has the figures):
    python score_sde.py --eval true                                  # VE on MNIST
    python score_sde.py --sde vp --eval true --out-dir out/score_sde_vp
    python score_sde.py --preset gpu --dataset cifar10 --sde vp      # a GPU run
    torchrun --nproc_per_node=2 score_sde.py --preset gpu --dataset folder --data-dir ffhq   # DDP
    python score_sde.py --sample-only true --sampler ode --n-samples 1000   # samples.npz, a grid
    python score_sde.py --resume true                                # continue exactly
"""
import argparse
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections import namedtuple
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
data_dir = './data'           # torchvision's MNIST / CIFAR-10 root, or the image folder
dataset = 'mnist'             # 'mnist' | 'cifar10' | 'folder' (images at any depth, unconditional)
image_size = 0                # side; 0 = 28 (mnist), 32 (cifar10), 96 (folder: resized, cropped)
out_dir = 'out/score_sde'     # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'cpu'                # 'cpu' | 'gpu': 'gpu' sets PRESETS['gpu'] for the flags not given
sde = 've'                    # 've' | 'vp'
sigma = 0.0                   # VE: dx = sigma^t dw; 0 = 25 for mnist, 50 otherwise
beta_min = 0.1                # VP: beta(0)
beta_max = 20.0               # VP: beta(1)
eps = 1e-5                    # smallest t in training and in the likelihood integral
sample_eps = 1e-3             # the samplers integrate from t = 1 down to this t
patch = 2                     # the image enters as (size / patch)^2 cells of patch^2 pixels
channels = 32                 # U-Net base width, a multiple of 8
channel_mults = '1,2'         # width multiplier per resolution, from size / patch down, halving
res_blocks = 2                # residual blocks per resolution down (one more up)
attn_res = '7,8'              # resolutions with self-attention ('' = none; the middle has it)
dropout = 0.0                 # in the residual blocks
fourier_scale = 16.0          # std of the Gaussian Fourier features' frequencies (t in [0, 1])
epochs = 7                    # passes over the training images
batch_size = 64               # global, split across DDP ranks
lr = 2e-3                     # peak AdamW learning rate, after a linear warm-up, cosine to 0
warmup = 200                  # warm-up steps
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.995                   # decay of the weight average that is sampled from
train_images = 0              # 0 = all; fewer for quick runs
workers = 4                   # DataLoader processes decoding a folder; 0 = in the main process
sampler = 'pc'                # 'em' | 'pc' | 'ode': for the grid and --sample-only
steps = 100                   # time steps of em and pc (pc: a corrector step at each too, 2 NFE)
snr = 0.16                    # the Langevin corrector's signal-to-noise ratio
ode_tol = 1e-5                # rtol and atol of the RK45 solver (sampling and likelihood)
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval = False                  # after training (or --sample-only): each sampler's NFE, time, quality
eval_samples = 1000           # samples per sampler that --eval times and scores
eval_samplers = 'em,em2,pc,ode'  # em (--steps), em2 (EM at twice --steps), pc, ode; '' = none
likelihood_images = 100       # test images whose bits/dim --eval computes (one ODE solve); 0 = skip
classifier = ''               # the judge's weights; '' = out_dir/classifier.pt, trained if missing
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, mps, cpu
dtype = 'auto'                # 'auto' | 'float32' | 'bfloat16' | 'float16': auto: bf16 if native
compile = False               # torch.compile the training model
resume = False                # continue the run in out_dir: its config, changed by the flags given
overwrite = False             # start over in an out_dir that holds a checkpoint
sample_only = False           # load out_dir/ckpt.pt (EMA weights), write samples.npz and a grid
max_steps = 0                 # stop after this many steps (the lr schedule keeps its length)
save_every = 500              # steps between checkpoints
log_every = 100               # steps between progress lines
seed = 0                      # data order, noise, initial weights and Fourier features

PRESETS = {'gpu': dict(patch=1, channels=128, channel_mults='1,2,2', res_blocks=2, attn_res='16,14',
                       dropout=0.1, epochs=200, batch_size=128, lr=2e-4, warmup=5000, ema=0.9999)}
ARCH = ('dataset', 'image_size', 'sde', 'sigma', 'beta_min', 'beta_max', 'patch', 'channels',
        'channel_mults', 'res_blocks', 'attn_res', 'fourier_scale')

def finish_config(c, given):
    c.update({k: v for k, v in PRESETS.get(c['preset'], {}).items() if k not in given})
    c['image_size'] = c['image_size'] or {'mnist': 28, 'cifar10': 32, 'folder': 96}[c['dataset']]
    c['sigma'] = c['sigma'] or (25.0 if c['dataset'] == 'mnist' else 50.0)
    return c

def check_config(c):
    """One line saying what is wrong and what would work, for flags a run cannot use."""
    mults, side = c['channel_mults'].split(','), c['image_size'] // max(c['patch'], 1)
    native = {'mnist': 28, 'cifar10': 32}.get(c['dataset'])
    refuse(c, [
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults),
         "--channel-mults takes positive integers like '1,2,2'"),
        (native and c['image_size'] != native,
         f"--image-size: {c['dataset']} images are {native} pixels; only folders resize"),
        (c['patch'] < 1 or c['image_size'] % c['patch'] or side % 2 ** (len(mults) - 1),
         f"--image-size {c['image_size']} / --patch {c['patch']} must halve {len(mults) - 1}x"),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')),
         "--attn-res takes resolutions like '7' or '16,8'"),
        (c['channels'] % 8 or c['channels'] <= 0, '--channels must be a positive multiple of 8'),
        (c['sigma'] <= 1, '--sigma must exceed 1 (VE std(t)^2 = (sigma^2t - 1) / (2 log sigma))'),
        (not 0 < c['beta_min'] < c['beta_max'], '--beta-min and --beta-max need 0 < min < max'),
        (not 0 < c['eps'] <= c['sample_eps'] < 1, 'need 0 < --eps <= --sample-eps < 1'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every'],
             c['steps']) < 1, '--epochs, --batch-size, --n-samples, --save-every, --log-every and '
         '--steps must be >= 1'),
        (min(c['train_images'], c['max_steps'], c['likelihood_images'], c['warmup'],
             c['workers']) < 0,
         '--train-images, --max-steps, --likelihood-images, --warmup and --workers are counts'),
        (c['eval_samples'] < 20, '--eval-samples must be at least 20'),
        (not set(c['eval_samplers'].replace(' ', '').split(',')) <= {'em', 'em2', 'pc', 'ode', ''},
         '--eval-samplers takes a comma-separated list of em, em2, pc and ode'),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and c['snr'] > 0 and c['ode_tol'] > 0
              and 0 <= c['dropout'] < 1 and c['grad_clip'] >= 0),
         'need --lr, --snr, --ode-tol > 0, 0 <= --ema < 1, 0 <= --dropout < 1, --grad-clip >= 0')])


# ---- sde ----
SDE = namedtuple('SDE', 'kind sigma beta_min beta_max')

def make_sde(c):
    return SDE(c['sde'], c['sigma'], c['beta_min'], c['beta_max'])

def marginal_mean_std(sde, t):
    """p_0t(x(t) | x(0)) = N(mean x(0), std^2 I) for tensor t. VE: std^2 = int_0^t sigma^2s ds =
    (sigma^2t - 1) / (2 log sigma). VP (eq. 33): log mean = -t^2 (beta_max - beta_min) / 4 - t
    beta_min / 2, std^2 = 1 - mean^2."""
    if sde.kind == 've':
        log_sigma = math.log(sde.sigma)
        return torch.ones_like(t), (torch.expm1(2 * t * log_sigma) / (2 * log_sigma)).sqrt()
    log_mean = -0.25 * t ** 2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
    return log_mean.exp(), (-torch.expm1(2 * log_mean)).sqrt()

def drift_diffusion(sde, x, t):
    """f(x, t) and g(t) of the forward SDE dx = f dt + g dw; t broadcasts against x."""
    if sde.kind == 've':
        return torch.zeros_like(x), sde.sigma ** t
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    return -0.5 * beta * x, beta.sqrt()

def prior_std(sde):
    """The std of p_1's stand-in N(0, std^2 I): VE's marginal std at t = 1 (the data's mean is
    negligible beside it), VP's 1."""
    one = torch.tensor(1.0, dtype=torch.float64)
    return marginal_mean_std(sde, one)[1].item() if sde.kind == 've' else 1.0

def reverse_drift(sde, x, t, score, ode=False):
    """The reverse SDE's drift f - g^2 score (eq. 6), or the probability-flow ODE's f - g^2 score /
    2 (13)."""
    f, g = drift_diffusion(sde, x, t)
    return f - g ** 2 * score * (0.5 if ode else 1.0)

def prior_logp(sde, x):
    """log N(x; 0, prior_std^2 I) per sample of x (B, ...)."""
    s, D = prior_std(sde), x[0].numel()
    return -0.5 * D * math.log(2 * math.pi * s * s) - x.flatten(1).square().sum(1) / (2 * s * s)

def dsm_loss(score_fn, sde, x0, t, z):
    """Per-sample denoising score matching with lambda(t) = std^2: the mean over pixels of |std
    s(x_t, t) + z|^2, where x_t = mean x0 + std z, so -z / std is the score of p_0t(x_t | x0) (eq.
    7)."""
    mean, std = marginal_mean_std(sde, t.view(-1, *[1] * (x0.dim() - 1)))
    return (std * score_fn(mean * x0 + std * z, t) + z).square().flatten(1).mean(1)


# ---- model ----
def norm(ch):  # 8 groups: ddpm_cifar's min(32, ch / 4) would give 8-32 at these widths,
    return nn.GroupNorm(8, ch)  # and this network's README figures were measured with 8

def zero(layer):
    """The layer with its weights and bias zeroed: a residual branch that starts as the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; plus the time embedding; GroupNorm, SiLU, dropout, 3x3 conv
    (zeroed); a 1x1 conv on the skip path when the width changes."""
    def __init__(self, cin, cout, tdim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb, self.norm2, self.drop = nn.Linear(tdim, cout), norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))

class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, residual, its out-projection zeroed."""
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)

class UNet(nn.Module):
    """-std(t) x score, from the scaled x_t and t: ddpm_mnist.py's U-Net, with Gaussian Fourier
    features of t (Tancik et al. 2020) for the sinusoidal embedding."""
    def __init__(self, in_ch=1, size=28, channels=32, mults=(1, 2), res_blocks=2, attn_res=(7,),
                 dropout=0.0, patch=2, fourier_scale=16.0):
        super().__init__()
        tdim, res, self.patch = 4 * channels, size // patch, patch
        self.register_buffer('freqs', torch.randn(channels // 2) * fourier_scale)  # fixed, saved
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(in_ch * patch ** 2, channels, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for i, m in enumerate(mults):
            for _ in range(res_blocks):
                attn = [Attention(channels * m)] if res in attn_res else []  # made first, as ever
                self.down.append(nn.ModuleList([ResBlock(ch, channels * m, tdim, dropout)] + attn))
                ch = channels * m
                skips.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, tdim, dropout), Attention(ch),
                                  ResBlock(ch, ch, tdim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(res_blocks + 1):
                attn = [Attention(channels * m)] if res in attn_res else []
                block = ResBlock(ch + skips.pop(), channels * m, tdim, dropout)
                self.up.append(nn.ModuleList([block] + attn))
                ch = channels * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2)]))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(),
                                 zero(nn.Conv2d(ch, in_ch * patch ** 2, 3, padding=1)))

    def forward(self, x, t):  # x (B, C, S, S), t (B,) in [0, 1] -> (B, C, S, S)
        a = 2 * math.pi * t.float()[:, None] * self.freqs  # (B, channels / 2)
        emb = self.temb(torch.cat([a.sin(), a.cos()], 1))
        hs = [self.inp(F.pixel_unshuffle(x, self.patch))]  # (B, channels, S / patch, S / patch)
        for layers in self.down:
            hs.append(run(layers, hs[-1], emb))
        h = run(self.mid, hs[-1], emb)
        for layers in self.up:
            skip = isinstance(layers[0], ResBlock)
            h = run(layers, torch.cat([h, hs.pop()], 1) if skip else h, emb)
        return F.pixel_shuffle(self.out(h), self.patch)

def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h

def make_model(c):
    """The network contract, for a forker who swaps in another: net(x, t) -> out, x (B, C, S, S)
    the noisy image already scaled by c_in (score_model does that), t (B,) times in [eps, 1]; out
    has x's shape, and score_model makes it the score out / std(t). The loop also uses
    .parameters(), .state_dict() and .train()/.eval(), nothing else."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['channels'], mults,
                c['res_blocks'], attn, c['dropout'], c['patch'], c['fourier_scale'])

def score_model(net, sde):
    """score(x, t) = net(c_in x, t) / std(t) with c_in = 1 / sqrt(mean^2 0.5^2 + std^2), t (B,)."""
    def score_fn(x, t):
        mean, std = marginal_mean_std(sde, t.view(-1, 1, 1, 1))
        return net(x / (0.25 * mean ** 2 + std ** 2).sqrt(), t).float() / std
    return score_fn


# ---- sampling ----
@torch.no_grad()
def em_sampler(score_fn, sde, shape, steps, eps, generator=None, device='cpu', corrector_snr=0.0):
    """Euler-Maruyama on the reverse SDE over the steps intervals of linspace(1, eps, steps + 1): x
    <- x - (f - g^2 s) dt + g sqrt(dt) z, returning the last step's mean. corrector_snr > 0 makes it
    PC: first a Langevin step x <- x + e s + sqrt(2e) z, e = 2 alpha (snr |z| / |s|)^2 (Algorithms
    4-5; alpha = 1 - beta(t) dt for VP, 1 for VE), the norms averaged over the batch as in the
    reference code (per sample, the step grows as x nears the mode: +12% std on 16-d Gaussian data).
    Returns (x, NFE). (The reference steps from each of linspace(1, eps, N) by (1 - eps) / (N - 1),
    so its last step ends below t = 0.)"""
    x = torch.randn(shape, generator=generator, device=device) * prior_std(sde)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt, vec_t, tt = t - t_next, torch.full(shape[:1], t, device=device), torch.tensor(t)
        if corrector_snr:
            s, z = score_fn(x, vec_t), torch.randn(shape, generator=generator, device=device)
            beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
            alpha = 1.0 if sde.kind == 've' else 1 - beta * dt
            norm = lambda v: v.flatten(1).norm(dim=1).mean()
            e = 2 * alpha * (corrector_snr * norm(z) / norm(s)) ** 2
            x = x + e * s + (2 * e).sqrt() * z
        mean = x - reverse_drift(sde, x, tt, score_fn(x, vec_t)) * dt
        z = torch.randn(shape, generator=generator, device=device)
        x = mean + drift_diffusion(sde, x, tt)[1] * math.sqrt(dt) * z
    return mean, steps * (2 if corrector_snr else 1)

def rk45(fun, t0, t1, y0, rtol, atol):
    """Dormand-Prince 5(4) with adaptive steps, first-same-as-last, and scipy's solve_ivp('RK45')
    step control: error = RMS of (5th - 4th order) / (atol + rtol max(|y|, |y_new|)), step factor
    0.9 err^(-1/5) within [0.2, 10] (scipy also caps it at 1 right after a rejected step). The first
    step is h0 of Hairer et al.'s rule (II.4), which scipy refines with one more call. Returns
    (y(t1), NFE)."""
    C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1)
    A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
    B = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
    E = (-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)  # 4th - 5th
    rms = lambda v: v.square().mean().sqrt().item()
    t, y, k1, nfe, sign = t0, y0, fun(t0, y0), 1, 1 if t1 > t0 else -1
    d0, d1 = rms(y0 / (atol + rtol * y0.abs())), rms(k1 / (atol + rtol * y0.abs()))
    h = abs(t1 - t0) * 1e-3 if min(d0, d1) < 1e-5 else min(0.01 * d0 / d1, abs(t1 - t0))
    while sign * (t1 - t) > 0:
        h = min(h, abs(t1 - t))
        ks = [k1]
        for c_i, a_i in zip(C[1:], A[1:]):
            ks.append(fun(t + sign * h * c_i, y + sign * h * sum(a * k for a, k in zip(a_i, ks))))
        y_new = y + sign * h * sum(b * k for b, k in zip(B, ks))
        ks.append(fun(t + sign * h, y_new))
        nfe += 6
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err = rms(sign * h * sum(e * k for e, k in zip(E, ks)) / scale)
        if err <= 1:
            t, y, k1 = t + sign * h, y_new, ks[-1]
        h *= min(10.0, max(0.2, 0.9 * max(err, 1e-10) ** -0.2)) if err <= 1 else \
            max(0.2, 0.9 * err ** -0.2)
    return y, nfe

@torch.no_grad()
def ode_sampler(score_fn, sde, shape, eps, tol=1e-5, generator=None, device='cpu'):
    """The probability-flow ODE dx/dt = f - g^2 s / 2 (eq. 13) from x(1) ~ prior to t = eps by RK45,
    then Tweedie's E[x(0) | x(eps)] = (x + std^2 s) / mean (Efron 2011): the ODE stops with std(eps)
    of noise left, 8 levels of 255 on VE. (The reference code's noise_removal takes one
    reverse-diffusion step at eps instead: the same on VE, close on VP.) Returns (x, NFE)."""
    def fun(t, x):
        score = score_fn(x, torch.full(shape[:1], t, device=device))
        return reverse_drift(sde, x, torch.tensor(t), score, ode=True)
    x = torch.randn(shape, generator=generator, device=device) * prior_std(sde)
    x, nfe = rk45(fun, 1.0, eps, x, tol, tol)
    mean, std = marginal_mean_std(sde, torch.tensor(eps))
    return (x + std ** 2 * score_fn(x, torch.full(shape[:1], eps, device=device))) / mean, nfe + 1

def ode_log_likelihood(score_fn, sde, x, eps, tol=1e-5, generator=None):
    """log p_0(x) per sample (nats) = log p_1(x(1)) + int_eps^1 div f~(x(t), t) dt, x and the
    divergence integrated together from eps to 1 (appendix D.2); div f~ ~ z^T (df~/dx) z with one
    Rademacher z per sample (Hutchinson), z^T J by a vector-Jacobian product. Returns (log p, NFE).
    """
    B = len(x)
    z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).float() * 2 - 1

    def fun(t, y):  # y (B, D + 1): the flattened x and the running integral of the divergence
        with torch.enable_grad():
            xt = y[:, :-1].reshape(x.shape).detach().requires_grad_(True)
            score = score_fn(xt, torch.full((B,), t, device=x.device))
            drift = reverse_drift(sde, xt, torch.tensor(t), score, ode=True)
            div = (torch.autograd.grad((drift * z).sum(), xt)[0] * z).flatten(1).sum(1)
        return torch.cat([drift.detach().flatten(1), div[:, None]], 1)
    y, nfe = rk45(fun, eps, 1.0, torch.cat([x.flatten(1), x.new_zeros(B, 1)], 1), tol, tol)
    return prior_logp(sde, y[:, :-1].reshape(x.shape)) + y[:, -1], nfe

def data_range(c):
    """(low, high) of the training data: [0, 1] for VE as in the seed, [-1, 1] for VP (centred, as
    DDPM)."""
    return (0.0, 1.0) if c['sde'] == 've' else (-1.0, 1.0)

def bits_per_dim(score_fn, sde, images, c, generator=None):
    """Bits/dim of uint8 images (B, C, S, S): x = (k + u) / 256 on the data range, u ~ U(0, 1)
    (uniform dequantisation), -log2 p(x) / D + log2(256 / width): the density on the range as mass
    per 8-bit bin."""
    lo, hi = data_range(c)
    u = torch.rand(images.shape, generator=generator, device=images.device)
    x = lo + (hi - lo) * (images.float() + u) / 256
    logp, nfe = ode_log_likelihood(score_fn, sde, x, c['eps'], c['ode_tol'], generator)
    return -logp / (x[0].numel() * math.log(2)) + math.log2(256 / (hi - lo)), nfe

def sample_with(score_fn, sde, method, n, c, generator, dev):
    """n uint8 images (n, C, S, S) on the CPU, 500 at a time, and the NFE of one batch."""
    shape = (1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['image_size'])
    out, nfe = [], 0
    for b in range(0, n, 500):
        sh = (min(500, n - b),) + shape
        if method == 'ode':
            x, nfe = ode_sampler(score_fn, sde, sh, c['sample_eps'], c['ode_tol'], generator, dev)
        else:
            steps = c['steps'] * (2 if method == 'em2' else 1)
            x, nfe = em_sampler(score_fn, sde, sh, steps, c['sample_eps'], generator, dev,
                                c['snr'] if method == 'pc' else 0.0)
        out.append(to_uint8(x, *data_range(c)))
    return torch.cat(out), nfe


# ---- train ----
def train(c, dev, rank, world):
    """Step s draws t and z for the whole global batch on the device from a generator seeded by
    (seed, s), and rank r takes rows r, r + world, ..., as it does of the data: any number of
    processes trains the same model as one, and --resume continues exactly without RNG state."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds = load_dataset(c, c['dataset'], n=c['train_images'])[0]
    B, per_epoch = c['batch_size'], epoch_steps(ds, c, world)
    if rank == 0:
        write_run_files(c)
    sde, (lo, hi) = make_sde(c), data_range(c)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA's too
    model = make_model(c).to(dev, memory_format=layout)
    ema = make_model(c).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), c['lr'], weight_decay=0.0, fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step = ckpt['step'] if ckpt else 0
    if ckpt:
        load_state(ckpt, dev, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    score_fn = score_model(net, sde)
    total = c['epochs'] * per_epoch  # the lr schedule's length; --max-steps stops early
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: (c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5
                       * (1 + math.cos(math.pi * min(1, s / total))))
    shape = (1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['image_size'])
    if rank == 0:
        print(f"data: {len(ds):,} {c['dataset']} images {shape} in [{lo:g}, {hi:g}] | {sde.kind} "
              f"SDE{f', sigma {sde.sigma:g}' if sde.kind == 've' else ''} | U-Net "
              f'{sum(p.numel() for p in model.parameters()):,} parameters | {dev}, '
              f"{c['dtype']}, {world} process(es) | {stop} of {total} steps of batch {B}"
              + (f' | resumed at step {step}' if step else ''))
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, 0, opt, [scaler], rank, world)
    with boundary, closing(batches(ds, c, dev, rank, world, step, stop, per_epoch)) as data:
        for x, _ in data:
            # noise draw: this step's t and z for the global batch; this rank's rows
            g.manual_seed((c['seed'] * 1_000_003 + step) * 1024)
            t = (c['eps'] + (1 - c['eps']) * torch.rand(B, generator=g, device=dev))[rank::world]
            z = torch.randn((B, *shape), generator=g, device=dev)[rank::world]
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + 1 + rank)  # dropout
            x0 = lo + (hi - lo) * x.to(dev, non_blocking=True).float() / 255
            # loss (eq. 7)
            with autocast(c, dev):
                loss = dsm_loss(score_fn, sde, x0.contiguous(memory_format=layout), t,
                                z.contiguous(memory_format=layout)).mean()
            # update
            for group in opt.param_groups:
                group['lr'] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if c['grad_clip']:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, c['grad_clip'])
            scaler.step(opt)
            scaler.update()
            step += 1
            # EMA, no autograd record (else a graph of every step); warm-up: covers the steps so far
            with torch.no_grad():
                w = 1 - min(c['ema'], (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, params, w)
            # boundary: log, save and stop where due
            boundary.add(loss=loss)
            boundary(step, params, save)
    return ema.eval(), boundary.curve

def figures(c, model, dev, curve):
    """The grid of the configured sampler and the loss curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    sde, g = make_sde(c), torch.Generator(dev).manual_seed(c['seed'])
    x = sample_with(score_model(model, sde), sde, c['sampler'], c['n_samples'], c, g, dev)[0]
    save_grid(x, os.path.join(c['out_dir'], 'samples.png'))
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(*zip(*curve))
        ax.set(xlabel='step', ylabel='loss', yscale='log', title=f"mean of {c['log_every']} steps")
        fig.tight_layout()
        write_whole(os.path.join(c['out_dir'], 'loss.png'), lambda tmp: fig.savefig(tmp, dpi=80))
        plt.close(fig)

def evaluate(c, model, dev):
    """For each sampler: NFE, seconds for eval_samples samples, a grid and on MNIST the judge's
    figures (with real training images as the floor); then bits/dim on likelihood_images."""
    sde, n, k = make_sde(c), c['eval_samples'], c['steps']
    score_fn, judge = score_model(model, sde), Judge(c, dev, n) if c['dataset'] == 'mnist' else None
    names = dict(em=f'em {k} steps', em2=f'em {2 * k} steps', pc=f'pc {k} steps',
                 ode=f"ode rk45 tol {c['ode_tol']:g}")
    for method in [m for m in c['eval_samplers'].replace(' ', '').split(',') if m]:
        g, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), time.time()
        x, nfe = sample_with(score_fn, sde, method, n, c, g, dev)
        print(f'eval | {names[method]} | NFE {nfe} | {n} samples in {time.time() - t0:.0f}s'
              + (judge.line(judge(x)) if judge else ''), flush=True)
        save_grid(x[:100], os.path.join(c['out_dir'], f'samples_{method}.png'))
    if c['likelihood_images']:
        train = c['dataset'] == 'folder'  # a folder has no test set
        test = load_dataset(c, c['dataset'], train=train, n=c['likelihood_images'])[0]
        images, t0 = torch.stack([test[i][0] for i in range(len(test))]).to(dev), time.time()
        g = torch.Generator(dev).manual_seed(c['seed'] + 2)
        bpd, nfe = bits_per_dim(score_fn, sde, images, c, g)
        print(f"eval | bits/dim on {len(bpd)} {'training' if train else 'test'} images "
              f'{bpd.mean():.3f} +- {bpd.std() / math.sqrt(len(bpd)):.3f} | NFE {nfe} | '
              f'{time.time() - t0:.0f}s')

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev, rank, world = setup(c)
    with after_training(c):
        if c['sample_only']:
            model, sde = make_model(c).to(dev), make_sde(c)
            model.load_state_dict(load_checkpoint(c)['ema'])
            g, t0 = torch.Generator(dev).manual_seed(c['seed']), time.time()
            x, nfe = sample_with(score_model(model.eval(), sde), sde, c['sampler'], c['n_samples'],
                                 c, g, dev)
            print(f"{c['sampler']}: NFE {nfe} per batch, {time.time() - t0:.0f}s")
            write_samples(c, x)
        else:
            model, curve = train(c, dev, rank, world)
            if rank == 0:
                figures(c, model, dev, curve)
        if c['eval'] and rank == 0:
            evaluate(c, model, dev)


# ---- plumbing: the same in ddpm_mnist.py, ddpm_cifar.py, score_sde.py, gan_baseline.py ----
# What is not research, written once (a test keeps the copies equal): flags, device and torchrun,
# safe writes, checkpoints, stop signals, the loop's boundary, data, grids, FID and IS.
SCRIPT = os.path.basename(__file__)
RUN = {}  # this run's: 'saved', the step of the checkpoint it wrote or resumed; 'data', its size

def fail(why):
    raise SystemExit(f'{SCRIPT}: {why}')  # one line, no traceback

def get_config(argv=None):
    """Each lowercase constant from the config banner to the next banner is a --dashed-flag of its
    type ('a' | 'b' first in its comment: the choices); then finish_config(c, the flags given)."""
    def parse_bool(s):
        if s.lower() not in ('true', '1', 'false', '0'):
            raise argparse.ArgumentTypeError(f"expected true/false/1/0, got '{s}'")
        return s.lower() in ('true', '1')
    block = open(__file__).read().split('# ---- config ----\n')[1].split('\n# ----')[0]
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    for name, note in re.findall(r'^([a-z_][a-z0-9_]*) *=.*?(?:# *(.*))?$', block, re.M):
        default, listed = globals()[name], re.match(r"'[^']*'(?: *\| *'[^']*')+", note)
        ap.add_argument('--' + name.replace('_', '-'), default=default,
                        choices=re.findall(r"'([^']*)'", listed[0]) if listed else None,
                        type=parse_bool if isinstance(default, bool) else type(default),
                        help=f'{note} [{default!r}]'.replace('%', '%%'))
    c, argv = vars(ap.parse_args(argv)), sys.argv[1:] if argv is None else argv
    given = {a[2:].split('=')[0].replace('-', '_') for a in argv if a[:2] == '--'}
    flags, c = set(c), finish_config(c, given)
    return continued(c, given, flags) if c['resume'] or c['sample_only'] else c

def continued(c, given, flags):
    """--resume and --sample-only continue the run in --out-dir: its checkpoint's config, changed
    only by the flags given now, each change printed. Where and how far it runs now (--device,
    --out-dir, --max-steps) are this command's."""
    try:
        ckpt = torch.load(checkpoint(c), map_location='cpu', weights_only=True, mmap=True)
        old, step = dict(ckpt['config']), int(ckpt['step'])
    except Exception:  # none, or not this script's: load_checkpoint says which
        return c
    if 'preset' in given and c['preset'] != old.get('preset'):
        fail(f"--preset {c['preset']}: the run in {c['out_dir']} is --preset {old.get('preset')}")
    now = given | {'resume', 'sample_only', 'overwrite', 'out_dir', 'device', 'max_steps'}
    now |= set(c) - flags  # and what finish_config derived from the flags given
    new = old | {k: v for k, v in c.items() if k in now or k not in old}
    changed = [f"--{k.replace('_', '-')} {old[k]} -> {new[k]}" for k in sorted(given)
               if old.get(k, new[k]) != new[k] and k not in ('resume', 'sample_only')]
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"{'resuming' if c['resume'] else 'sampling'} {checkpoint(c)} (step {step}) with its "
              f"config{'; changed: ' + ', '.join(changed) if changed else ''}")
    return new

def refuse(c, problems):
    """Stops at the first (bad, why): a float not finite (nan passes every comparison), two of
    --resume, --sample-only and --overwrite, then the script's own problems."""
    for bad, why in [*[(not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number, "
                        f'not {v}') for k, v in c.items() if isinstance(v, float)],
                     (c['resume'] + c['sample_only'] + c['overwrite'] > 1,
                      '--resume, --sample-only, --overwrite: pick one'), *problems]:
        if bad:
            fail(why)

def pick_device(name, local_rank=0):
    """'auto' is cuda, then mps, then cpu; under torchrun a process takes its LOCAL_RANK's GPU."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    try:
        dev = torch.device('cuda' if gpus else 'mps' if mps else 'cpu') if name == 'auto' else \
            torch.device(name)
    except RuntimeError:
        fail(f"--device '{name}' is not a torch device; try cpu, cuda or auto")
    procs = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    dev = torch.device('cuda', local_rank) if dev.type == 'cuda' and dev.index is None else dev
    if dev.type == 'mps' and not mps or dev.type == 'cuda' and max(dev.index + 1, procs) > gpus:
        fail(f'torchrun started {procs} processes on a machine with {gpus} GPU(s); use '
             f'--nproc_per_node={gpus}, or --device cpu' if 1 < procs > gpus else
             f'--device {name}: this machine has {gpus} GPU(s); try --device auto')
    return dev

def setup(c):
    """(device, rank, world size), the process group joined under torchrun (nccl on CUDA, else
    gloo), the out-dir made, or refused if it holds a run this one would replace."""
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    dev, ckpt = pick_device(c['device'], int(os.environ.get('LOCAL_RANK', 0))), checkpoint(c)
    native, why = native_bf16(dev), ''
    if c['dtype'] == 'auto':
        c['dtype'] = 'bfloat16' if native else 'float32'
        why = f" (auto: {dev.type} {'has' if native else 'lacks'} native bfloat16)"
    elif c['dtype'] == 'bfloat16' and not native:
        why = ' (emulated on this device, several times slower than float32: try --dtype auto)'
    refuse(c, [(c['dtype'] == 'float16' and dev.type != 'cuda', '--dtype float16 needs CUDA'),
               (c['batch_size'] % world, f"--batch-size {c['batch_size']} won't split in {world}"),
               (c.get('fid') and not importlib.util.find_spec('torch_fidelity'),
                '--fid needs torch-fidelity: pip install torch-fidelity'),
               (os.path.exists(ckpt) and not (c['resume'] or c['sample_only'] or c['overwrite']),
                f'{ckpt} holds a run; continue it with --resume true, or start over with '
                '--overwrite true or another --out-dir')])
    torch.backends.cudnn.benchmark = dev.type == 'cuda'  # the fastest convolutions for the shapes
    if 'RANK' in os.environ:  # torchrun; rank 0 evaluates alone while the others wait
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        backend = 'nccl' if dev.type == 'cuda' else 'gloo'
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    try:
        os.makedirs(c['out_dir'], exist_ok=True)
    except OSError as e:
        fail(f"cannot make --out-dir {c['out_dir']} ({e.strerror})")
    RUN.clear()
    if rank == 0:
        lock_out_dir(c['out_dir'])
        print(f"device {dev} | dtype {c['dtype']}{why} | output {c['out_dir']}")
    return dev, rank, world

def native_bf16(dev, cpuinfo='/proc/cpuinfo'):
    """A CUDA GPU with bfloat16, or a CPU with AVX512-BF16 or AMX (Linux says so in cpuinfo):
    elsewhere autocast emulates it (a 2-core AVX2 CPU: 10x slower than float32)."""
    if dev.type != 'cpu':
        return dev.type == 'cuda' and torch.cuda.is_bf16_supported()
    flags = open(cpuinfo).read() if os.path.isfile(cpuinfo) else ''
    return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))

def lock_out_dir(out):
    """One run an out-dir: an flock on out/.lock, held until the run ends (the OS drops it when the
    process dies, however it dies), refuses a second run; then a killed run's temporary files go."""
    try:
        import fcntl
    except ImportError:  # Windows: runs are not locked
        return
    RUN['lock'] = lock = open(os.path.join(out, '.lock'), 'a+')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"another run (pid {lock.read().strip() or '?'}) is using --out-dir {out}; wait for "
             'it to end, or pass another --out-dir')
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    for f in os.listdir(out):
        if re.search(r'\.tmp\d+\.\w+$', f):
            os.remove(os.path.join(out, f))

def autocast(c, dev):
    dtype = getattr(torch, c['dtype'])
    return nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype)

@contextmanager
def after_training(c):
    """The run's frame. Outside the training loop (whose boundary saves first) SIGTERM stops a run
    as Ctrl-C does, with one line saying what is kept; so do running out of memory and a file that
    cannot be read. On success the processes meet at the end (after an error a process ends at
    once, and torchrun stops the others). The out-dir's lock is released."""
    def stop(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    old = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt as e:
        fail(f"interrupted ({e.args[0] if e.args else 'SIGINT'}); {kept(c)}")
    except OSError as e:  # a file read outside the loop (an image that cannot be decoded)
        fail(f'{e}; {kept(c)}')
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; the CPU's allocator says so
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        fail(f'out of memory ({str(e).splitlines()[0][:90]}); lower --batch-size or the model\'s '
             f'or images\' size; {kept(c)}')
    finally:
        signal.signal(signal.SIGTERM, old)
        if 'lock' in RUN:
            RUN.pop('lock').close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def write_whole(path, write):
    """write(tmp), synced to the disk, then renamed over path (tmp, named by this process, keeps
    path's extension for savez, savefig and PIL): a kill or a power cut leaves the file there
    before. Any failure, Ctrl-C too, removes tmp; a failed write (a full disk) is one line."""
    tmp, folder = f'.tmp{os.getpid()}'.join(os.path.splitext(path)), os.path.dirname(path) or '.'
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if hasattr(os, 'O_DIRECTORY'):  # the rename, on POSIX
            fd = os.open(folder, os.O_DIRECTORY)
            os.fsync(fd)
            os.close(fd)
        return
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save raises RuntimeError
            raise
        full = getattr(e, 'errno', 0) == errno.ENOSPC or shutil.disk_usage(folder).free < 2 ** 20
        why = 'no space left on device' if full else getattr(e, 'strerror', 0) or str(e)[:100]
    free = shutil.disk_usage(folder).free / 2 ** 20  # once the failed write let go of its file
    fail(f'could not write {path} ({why}; {free:,.0f} MB free); the file there before is kept')

def write_run_files(c):
    """config.json and a copy of this script, once the checkpoint and the data are accepted."""
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(c, f, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), dump)
    write_whole(os.path.join(c['out_dir'], SCRIPT), lambda tmp: shutil.copy(__file__, tmp))

def checkpoint(c):
    return os.path.join(c['out_dir'], 'ckpt.pt')

def load_checkpoint(c):
    """ckpt.pt, checked to be this script's, of the model that the ARCH flags describe."""
    if not os.path.exists(path := checkpoint(c)):
        fail(f'no checkpoint at {path}; train first, or point --out-dir at the run')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        fail(f'{path} is not a readable checkpoint ({type(e).__name__})')
    if not isinstance(ckpt, dict) or ckpt.get('script') != SCRIPT:
        fail(f'{path} was not written by {SCRIPT} (script: '
             f"{ckpt.get('script') if isinstance(ckpt, dict) else type(ckpt).__name__})")
    if not isinstance(ckpt.get('config'), dict) or not isinstance(ckpt.get('step'), int):
        fail(f'{path} lacks its config or step: not a whole checkpoint of {SCRIPT}')
    bad = [f"{k} {ckpt['config'].get(k)!r} (flag {c[k]!r})" for k in ARCH
           if ckpt['config'].get(k) != c[k]]
    if bad:
        fail(f"{path} has a different model: {', '.join(bad)}; drop those flags to continue it")
    RUN.update(saved=ckpt['step'], data=ckpt.get('data'))
    return ckpt

def load_state(ckpt, dev, **objects):
    """Each module's, optimizer's and scaler's state from the checkpoint's entry of its name."""
    for name, obj in objects.items():
        for group in ckpt[name].get('param_groups', []):
            group['fused'] = dev.type == 'cuda'  # whatever device wrote it
        obj.load_state_dict(ckpt[name])

def save_checkpoint(c, step, **state):
    """ckpt.pt, written whole: the state_dict of each object that has one, the rest as it is."""
    ckpt = {k: v.state_dict() if hasattr(v, 'state_dict') else v for k, v in state.items()}
    ckpt.update(step=step, config=c, script=SCRIPT, data=RUN.get('data'))
    write_whole(checkpoint(c), lambda tmp: torch.save(ckpt, tmp))

def kept(c):
    """What a stopped run leaves, as it is on disk: the checkpoint this run last wrote (each save
    checks first that the weights are finite) or resumed from; never an older run's as its own."""
    if RUN.get('saved') is not None:
        return f"the last good checkpoint, step {RUN['saved']}, is kept: {checkpoint(c)}"
    old = f" ({checkpoint(c)}, an earlier run's, is as it was)" * os.path.exists(checkpoint(c))
    return 'this run saved no checkpoint' + old

class Boundary:
    """The training loop's step boundary, the one place that waits for the device. Each step add()s
    its losses; each log_every steps their means over all processes are checked and printed; each
    save_every steps, at the last step and after SIGINT or SIGTERM (which, while it is open, only
    note themselves) the weights' norm is checked too and rank 0 saves; a signal then ends the run.
    Under float16 a non-finite loss is a step the GradScaler skipped: counted, not averaged."""
    def __init__(self, c, step, stop, eval_every, opt, scalers, rank, world):
        self.c, self.stop, self.eval_every, self.opt = c, stop, eval_every, opt
        self.scalers, self.scaled = scalers, scalers[0].is_enabled()
        self.rank, self.world = rank, world
        self.rows, self.curve, self.caught, self.s, self.t = [], [], [], step, time.time()
        self.first = step
        self.path = checkpoint(c)

    def __enter__(self):
        self.old = [(s, signal.signal(s, lambda n, f: self.caught.append(n)))
                    for s in (signal.SIGINT, signal.SIGTERM)]
        return self

    def __exit__(self, error, *_):
        [signal.signal(s, h) for s, h in self.old]
        if self.caught and not error:  # it came during the last save, which holds the run
            why = signal.Signals(self.caught[0]).name
            fail(f'interrupted ({why}) at the end; saved {self.path}')

    def add(self, **losses):
        """This step's losses: scalar tensors on the device, or None for one it did not compute."""
        self.names, got = list(losses), [x is not None for x in losses.values()]
        v = torch.stack([x.detach().float() for x in losses.values() if x is not None])
        ok = v.isfinite().all() | (not self.scaled)
        v, ok = iter(torch.where(ok, v, 0)), ok.float()
        row = [next(v) if g else ok * 0 for g in got] + [ok * g for g in got] + [ok]
        self.rows.append(torch.stack(row))

    def __call__(self, step, params, save, evaluate=None):
        """Where due: the means (and the norm) checked and printed, evaluate(step) (rank 0, each
        eval_every steps and at the last), save(step) (rank 0), and the stop after a signal."""
        c, k, last = self.c, len(self.names), step == self.stop
        log, keep = (step % c[n] == 0 or last for n in ('log_every', 'save_every'))
        ev = evaluate and (last or self.eval_every and step % self.eval_every == 0)
        if not (log or keep or ev or (self.caught and self.world == 1)):
            return
        sums = torch.stack(self.rows).sum(0)  # k sums, k counts, the steps kept
        norm = sums[0] * 0
        if keep or self.caught:
            norm = torch.stack(torch._foreach_norm(params)).sum()
        flags = torch.cat([sums, torch.stack([norm, torch.full_like(norm, bool(self.caught))])])
        if self.world > 1:
            dist.all_reduce(flags)  # the processes agree on the means, the norm and on stopping
        *flags, norm, halt = flags.tolist()
        means = [s / n if n else math.nan for s, n in zip(flags, flags[k:])][:k]
        skipped = len(self.rows) * self.world - flags[-1]
        scale = min(s.get_scale() for s in self.scalers) if self.scaled else 1.0
        if not (math.isfinite(norm) and all(map(math.isfinite, flags)) and scale >= 2 ** -8):
            what = [f'{n} is {v}' for n, v in zip(self.names, flags) if not math.isfinite(v)]
            what = ', '.join(what) or (f"the weights' norm is {norm}" if not math.isfinite(norm)
                                       else "float16 overflows in every step (the GradScaler's "
                                       'scale fell under 2^-8)')
            fail(f'{what} in steps {self.s + 1}-{step}; {kept(c)}; ' + ('check the flags given'
                 if self.s == self.first else 'try a lower --lr or --dtype float32'))
        if log:
            ms = (time.time() - self.t) / (step - self.s) * 1e3  # this window's; evals, saves out
            mem = torch.cuda.max_memory_allocated() / 2 ** 30 if sums.is_cuda else 0
            self.curve.append((step, means[0]))
            if self.rank == 0:
                parts = [f'step {step}/{self.stop}', *map('{} {:.4f}'.format, self.names, means),
                         f"lr {self.opt.param_groups[0]['lr']:.1e}", f'{ms:.1f} ms/step',
                         f"{c['batch_size'] / ms * 1e3:,.0f} img/s"]
                parts += [f'peak mem {mem:.2f} GB'] * bool(mem)
                parts += [f'{skipped:.0f} steps skipped by the float16 GradScaler'] * bool(skipped)
                print(' | '.join(parts + [f'eta {ms * (self.stop - step) / 6e4:.1f}m']), flush=True)
            self.rows, self.s = [], step
        pause = time.time()
        if self.rank == 0 and ev:
            evaluate(step)
        if keep or halt:
            if self.rank == 0:
                save(step)
            RUN['saved'] = step
        if halt:
            why = signal.Signals(self.caught[0]).name if self.caught else 'a signal elsewhere'
            fail(f'interrupted at step {step} ({why}); saved {self.path}; go on with --resume true')
        self.t = time.time() if log else self.t + time.time() - pause

def epoch_steps(ds, c, world):
    """Steps in an epoch: DistributedSampler(drop_last) deals len // world rows to a process. A
    resumed run whose data changed size (a file removed) goes on, saying so."""
    if not (n := len(ds) // world // (c['batch_size'] // world)):
        fail(f"{len(ds)} training examples make no batch of {c['batch_size']}; lower --batch-size")
    if RUN.get('data') not in (None, len(ds)) and int(os.environ.get('RANK', 0)) == 0:
        print(f"note: the checkpoint's run had {RUN['data']:,} training examples, this data "
              f'{len(ds):,}: from here on the data order and the epoch ({n} steps) are new')
    RUN['data'] = len(ds)
    return n

def batches(ds, c, dev, rank, world, first, stop, per_epoch):
    """This process's (x, y) of steps first .. stop - 1. Epoch e's order is DistributedSampler's
    (seed, e), of which process r takes rows r, r + world, ... of each global batch: any number of
    processes sees the data of one. A TensorDataset is indexed on the device (if under a quarter of
    its memory); files are decoded by a DataLoader whose workers leave stopping to this process."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    sampler = DistributedSampler(range(len(ds)), world, rank, seed=c['seed'], drop_last=True)
    n = c['batch_size'] // world

    def order(where):  # the rows of steps first .. stop - 1, epoch by epoch
        for e in range(first // per_epoch, math.ceil(stop / per_epoch)):
            sampler.set_epoch(e)
            rows = torch.tensor(list(sampler))[:per_epoch * n].view(per_epoch, n)
            yield from rows.to(where)[max(0, first - e * per_epoch):stop - e * per_epoch]
    if isinstance(ds, TensorDataset):
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == 'cuda' else math.inf
        x, y = (t.to(dev) if t.nbytes < free / 4 else t for t in ds.tensors)
        yield from ((x[i], y[i]) for i in order(x.device))
        return
    mute = lambda _: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
    loader = iter(DataLoader(ds, batch_sampler=(i.tolist() for i in order('cpu')), num_workers=c[
        'workers'], pin_memory=dev.type == 'cuda', worker_init_fn=mute))
    try:
        yield from loader
    except OSError as e:  # from a worker, the last line of its traceback is __getitem__'s
        fail(f"{str(e).strip().splitlines()[-1].removeprefix('OSError: ')}; "
             f'{kept(c)}; replace the file and continue with --resume true')
    finally:  # the workers ignore SIGTERM, so multiprocessing's exit would wait for them forever
        getattr(loader, '_shutdown_workers', lambda: None)()

def load_dataset(c, name, train=True, n=0):
    """(Dataset of (uint8 image (C, S, S), label), classes), its first n (0 = all): torchvision's
    MNIST or CIFAR-10 from data_dir (downloaded if missing), or image files under it ('folder')."""
    root, label = os.path.abspath(c['data_dir']), dict(mnist='MNIST', cifar10='CIFAR-10').get(name)
    if name == 'folder':
        ds = ImageFiles(root, c['image_size'], c.get('folder_classes', False))
        ds.samples = ds.samples[:n or None]
        return ds, ds.classes
    from torchvision.datasets import CIFAR10, MNIST
    folder = os.path.join(root, 'MNIST/raw' if name == 'mnist' else 'cifar-10-batches-py')
    try:
        ds = (MNIST if name == 'mnist' else CIFAR10)(root, train=train, download=True)
    except Exception as e:  # offline, or a damaged file
        fail(f'{label} under {folder} cannot be read ({type(e).__name__}: {str(e)[:90]}); a file '
             'there is truncated, damaged or missing: replace it' if os.path.isdir(folder)
             and os.listdir(folder) else f'no {label} under {folder} and the download failed '
             f'({type(e).__name__}); place its files there (README), or pass --data-dir')
    x = torch.as_tensor(ds.data[:n or None])  # MNIST (N, 28, 28), CIFAR-10 (N, 32, 32, 3)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    return torch.utils.data.TensorDataset(x, torch.as_tensor(ds.targets[:n or None])), ds.classes

class ImageFiles(torch.utils.data.Dataset):
    """The images under root as (uint8 (3, S, S), label), resized and centre-cropped, listed by
    ImageFolder's functions: with classes each sub-folder is a class (ImageFolder's layout);
    without, the images at any depth are one unconditional set (FFHQ's 70 sub-folders are no
    classes). A file that cannot be decoded stops the run when its batch comes up, with one line
    naming it."""
    def __init__(self, root, size, classes):
        from torchvision import transforms as T
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
        try:
            self.classes, index = find_classes(root) if classes else ([], {'': 0})
            self.samples = make_dataset(root, index, IMG_EXTENSIONS)
        except OSError:
            fail(f"no images ({', '.join(IMG_EXTENSIONS)}) in " + (f'class sub-folders of {root}'
                 if classes else f'{root} or its sub-folders') + '; pass --data-dir')
        self.transform = T.Compose([T.Resize(size, T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                                    T.PILToTensor()])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.samples[i][0]) as img:
                return self.transform(img.convert('RGB')), self.samples[i][1]
        except Exception as e:  # truncated, not an image, over PIL's size limit
            raise OSError(f'{self.samples[i][0]} cannot be decoded ({type(e).__name__}: '
                          f'{str(e)[:80]})') from None

def to_uint8(x, lo=-1.0, hi=1.0):
    """Images in [lo, hi] (N, C, H, W) -> uint8 on the CPU, as they are saved and scored."""
    return ((x.float() - lo) * (255 / (hi - lo))).round().clamp(0, 255).to(torch.uint8).cpu()

def save_grid(images, path, nrow=10):
    """uint8 images (N, C, H, W) -> one PNG, nrow to a row, 1-pixel white gaps."""
    from torchvision.utils import save_image
    write_whole(path, lambda tmp: save_image(images / 255, tmp, nrow=nrow, padding=1, pad_value=1))

def write_samples(c, images, **labels):
    """--sample-only: samples.npz (uint8 images N x H x W x C, labels where given), samples.png."""
    path = os.path.join(c['out_dir'], 'samples.npz')
    nhwc = images.permute(0, 2, 3, 1).numpy()
    write_whole(path, lambda tmp: np.savez(tmp, images=nhwc, **labels))
    save_grid(images[:100], os.path.join(c['out_dir'], 'samples.png'))
    print(f'wrote {len(images)} samples to {path} (images: uint8, N x H x W x C'
          f"{', labels' * bool(labels)}) and a grid of the first 100, samples.png")

class Uint8Images(torch.utils.data.Dataset):
    """Images as torch-fidelity takes them, uint8 (3, H, W), of a uint8 tensor or of (x, y) items.
    """
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return (self.data[i] if torch.is_tensor(self.data) else self.data[i][0]).expand(3, -1, -1)

def fid_is(c, images, reference, dev):
    """FID of uint8 images (N, C, H, W) to the reference dataset, and their Inception Score, with
    torch-fidelity's TF-Inception as the papers; the reference's statistics are cached by name."""
    import torch_fidelity
    name = f"{SCRIPT[:-3]}-{c['dataset']}-{os.path.basename(os.path.abspath(c['data_dir']))}"
    try:
        m = torch_fidelity.calculate_metrics(
            input1=Uint8Images(images), input2=Uint8Images(reference), fid=True, isc=True,
            cuda=dev.type == 'cuda', verbose=False, save_cpu_ram=True, samples_shuffle=False,
            input2_cache_name=f'{name}-{images.shape[-1]}px-{len(reference)}',
            feature_extractor_weights_path=c['fid_weights'] or None)
    except Exception as e:  # most often offline, without --fid-weights
        fail(f'FID failed ({type(e).__name__}: {str(e)[:80]}); offline, pass --fid-weights '
             f'weights-inception-2015-12-05-6726825d.pth; {kept(c)}')
    return m['frechet_inception_distance'], m['inception_score_mean']


# ---- the MNIST judge: the same in ddpm_mnist.py, score_sde.py, gan_baseline.py ----
class Judge:
    """MNIST samples measured without Inception: a small CNN (two conv-pool layers, a 128-d feature
    layer, 10 logits), trained once (5 epochs of Adam 1e-3, cosine: 99.0% test accuracy) and kept as
    --classifier, scores uint8 digits (N, 1, 28, 28) by the share it classifies with confidence
    >= 0.9, the KL of their class histogram from uniform, and the Frechet distance of its features
    to the test set's, beside those of n real training digits (the floor, printed here)."""
    def __init__(self, c, dev, n):
        (x, y), (x_test, y_test) = (load_dataset(c, 'mnist', t)[0].tensors for t in (True, False))
        conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*conv(1, 32), *conv(32, 64), nn.Flatten(), nn.Linear(3136, 128),
                                 nn.ReLU(), nn.Linear(128, 10)).to(dev)
        self.dev, path = dev, c['classifier'] or os.path.join(c['out_dir'], 'classifier.pt')
        if os.path.exists(path):
            try:
                self.net.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
            except Exception as e:  # not a file torch reads, or another network's weights
                fail(f"{path} is not the MNIST judge's weights ({type(e).__name__}); pass the "
                     "classifier.pt a run wrote, or --classifier '' to train one")
        else:
            opt, g = torch.optim.Adam(self.net.parameters()), torch.Generator().manual_seed(0)
            lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5 * math.ceil(len(x) / 128))
            for i in [i for _ in range(5) for i in torch.randperm(len(x), generator=g).split(128)]:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(x[i].to(dev) / 127.5 - 1), y[i].to(dev)).backward()
                opt.step()
                lr.step()
            acc = (self.features(x_test)[1].argmax(1) == y_test).float().mean().item()
            print(f'eval | classifier trained (5 epochs): test accuracy {acc:.2%}; saved {path}')
            write_whole(path, lambda tmp: torch.save(self.net.state_dict(), tmp))
        self.f_test, self.floor = self.features(x_test)[0], None
        pick = torch.randperm(len(x), generator=torch.Generator().manual_seed(c['seed']))[:n]
        self.floor = self(x[pick])
        print(f'eval | {n} training images' + self.line(self.floor))

    @torch.no_grad()
    def features(self, images):
        """(features (N, 128) float64, logits (N, 10)) of uint8 digits, on the CPU."""
        f = torch.cat([self.net[:-1](b.to(self.dev) / 127.5 - 1) for b in images.split(500)])
        return f.double().cpu(), self.net[-1](f).float().cpu()

    def __call__(self, images):
        return digit_figures(*self.features(images), self.f_test)

    def line(self, m):
        floor = f" ({m['frechet'] / self.floor['frechet']:.2f}x floor)" if self.floor else ''
        return (f" | confident (p >= 0.9) {m['confident']:.1%} | KL(classes || uniform) "
                f"{m['kl']:.4f} | frechet {m['frechet']:.2f}{floor}")


def digit_figures(f, logits, f_test):
    """{'confident': the share with confidence >= 0.9, 'kl': KL(class histogram || uniform),
    'frechet': |mu - mu_t|^2 + tr(C + C_t - 2 (C^(1/2) C_t C^(1/2))^(1/2)) of f and f_test}."""
    p = logits.softmax(1)
    hist = torch.bincount(p.argmax(1), minlength=10).double() / len(p)
    mu, mu_t, cov, cov_t = f.mean(0), f_test.mean(0), torch.cov(f.T), torch.cov(f_test.T)
    w, v = torch.linalg.eigh(cov)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ cov_t @ root).clamp(min=0).sqrt().sum()
    d2 = (mu - mu_t).square().sum() + cov.trace() + cov_t.trace() - 2 * cross
    return {'confident': (p.max(1).values >= 0.9).double().mean().item(), 'frechet': d2.item(),
            'kl': (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item()}


if __name__ == '__main__':
    main()
