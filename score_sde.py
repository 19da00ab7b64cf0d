"""
Score-based generative modelling through SDEs on MNIST (or CIFAR-10, or an image folder: FFHQ).

Song et al. 2021: 've' dx = sigma^t dw and 'vp' dx = -beta(t)/2 x dt + sqrt(beta(t)) dw (eqs. 11,
32-33); denoising score matching (eq. 7). Samplers: Euler-Maruyama on the reverse SDE (eq. 6),
predictor-corrector (Algorithms 4-5), the probability-flow ODE (eq. 13) by RK45. Likelihood
(appendix D.2) in bits/dim. --eval: each sampler's NFE, time and, on MNIST, the judge's figures.

    python score_sde.py --eval true                                  # VE on MNIST, CPU
    python score_sde.py --sde vp --eval true --out-dir out/score_sde_vp
    torchrun --nproc_per_node=2 score_sde.py --preset gpu --dataset cifar10 --sde vp   # DDP
    python score_sde.py --sample-only true --sampler ode --n-samples 1000   # samples.npz, a grid
"""
import argparse
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
from contextlib import closing, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
data_dir = './data'           # MNIST / CIFAR-10 root, or the image folder
dataset = 'mnist'             # 'mnist' | 'cifar10' | 'folder' (images at any depth)
image_size = 0                # 0 = 28 (mnist), 32 (cifar10), 96 (folder)
out_dir = 'out/score_sde'     # ckpt.pt, figures, samples.npz, config.json, this file
preset = 'cpu'                # 'cpu' | 'gpu': PRESETS['gpu'] for the flags not given
sde = 've'                    # 've' | 'vp'
sigma = 0.0                   # VE's sigma; 0 = 25 for mnist, 50 otherwise
beta_min = 0.1                # VP: beta(0)
beta_max = 20.0               # VP: beta(1)
eps = 1e-5                    # smallest t in training and likelihood
sample_eps = 1e-3             # the samplers stop at this t
patch = 2                     # pixels folded into channels: patch x patch
channels = 32                 # U-Net base width, a multiple of 8
channel_mults = '1,2'         # width multiplier per resolution, halving
res_blocks = 2                # residual blocks per resolution down (one more up)
attn_res = '7,8'              # resolutions with self-attention ('' = none)
dropout = 0.0                 # in the residual blocks
fourier_scale = 16.0          # std of the Fourier features' frequencies
epochs = 7                    # passes over the training images
batch_size = 64               # global, split across DDP ranks
lr = 2e-3                     # peak AdamW lr: linear warm-up, cosine to 0
warmup = 200                  # warm-up steps
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.995                   # decay of the sampled weight average
train_images = 0              # 0 = all; fewer for quick runs
workers = 4                   # DataLoader processes decoding a folder
sampler = 'pc'                # 'em' | 'pc' | 'ode': for the grid and --sample-only
steps = 100                   # time steps of em and pc (pc: 2 NFE a step)
snr = 0.16                    # the Langevin corrector's signal-to-noise ratio
ode_tol = 1e-5                # rtol and atol of RK45
n_samples = 100               # samples in the grid, or samples.npz
eval = False                  # after training (or --sample-only): the samplers' figures
eval_samples = 1000           # samples per sampler that --eval scores
eval_samplers = 'em,em2,pc,ode'  # em2: EM at twice --steps
likelihood_images = 100       # test images whose bits/dim --eval computes; 0 = skip
classifier = ''               # the judge's weights; '' = out_dir/classifier.pt
device = 'auto'               # 'cpu', 'cuda:1', ...; auto: cuda, mps, cpu
dtype = 'auto'                # 'auto' | 'float32' | 'bfloat16' | 'float16': auto: bf16 if native
compile = False               # torch.compile the training model
resume = False                # continue out_dir's run with its config
overwrite = False             # start over in an out_dir that holds a checkpoint
sample_only = False           # out_dir/ckpt.pt's EMA weights -> samples.npz
max_steps = 0                 # stop early (the lr schedule keeps its length)
save_every = 500              # steps between checkpoints
log_every = 100               # steps between progress lines
seed = 0                      # data order, noise, weights, Fourier features

PRESETS = {'gpu': dict(patch=1, channels=128, channel_mults='1,2,2', res_blocks=2, attn_res='16,14',
                       dropout=0.1, epochs=200, batch_size=128, lr=2e-4, warmup=5000, ema=0.9999)}
ARCH = ('dataset', 'image_size', 'sde', 'sigma', 'beta_min', 'beta_max', 'patch', 'channels',
        'channel_mults', 'res_blocks', 'attn_res', 'fourier_scale')

def finish_config(c, given):
    c.update({k: v for k, v in PRESETS.get(c['preset'], {}).items() if k not in given})
    c['image_size'] = c['image_size'] or {'mnist': 28, 'cifar10': 32, 'folder': 96}[c['dataset']]
    c['sigma'] = c['sigma'] or (25.0 if c['dataset'] == 'mnist' else 50.0)
    return c

def check_config(c):  # flags a run cannot use, each refused with one line
    side, halvings = c['image_size'] // max(c['patch'], 1), c['channel_mults'].count(',')
    native = {'mnist': 28, 'cifar10': 32}.get(c['dataset'])
    refuse([(native and c['image_size'] != native,
             f"--image-size: {c['dataset']} images are {native} pixels; only folders resize"),
            (c['image_size'] % c['patch'] or side % 2 ** halvings,
             f"--image-size {c['image_size']} / --patch {c['patch']} must halve {halvings} times"),
            (c['sigma'] <= 1, '--sigma must exceed 1: std(t)^2 = (sigma^2t - 1) / (2 log sigma)'),
            (set(c['eval_samplers'].replace(' ', '').split(',')) - {'em', 'em2', 'pc', 'ode', ''},
             '--eval-samplers takes a list of em, em2, pc and ode')])

# ---- sde ----
SDE = namedtuple('SDE', 'kind sigma beta_min beta_max')

def make_sde(c):
    return SDE(c['sde'], c['sigma'], c['beta_min'], c['beta_max'])

def marginal_mean_std(sde, t):
    """p_0t(x(t) | x(0)) = N(mean x(0), std^2 I): VE, VP (eq. 33)."""
    if sde.kind == 've':
        log_sigma = math.log(sde.sigma)
        return torch.ones_like(t), (torch.expm1(2 * t * log_sigma) / (2 * log_sigma)).sqrt()
    log_mean = -0.25 * t ** 2 * (sde.beta_max - sde.beta_min) - 0.5 * t * sde.beta_min
    return log_mean.exp(), (-torch.expm1(2 * log_mean)).sqrt()

def drift_diffusion(sde, x, t):  # f(x, t) and g(t) of dx = f dt + g dw; t broadcasts
    if sde.kind == 've':
        return torch.zeros_like(x), sde.sigma ** t
    beta = sde.beta_min + t * (sde.beta_max - sde.beta_min)
    return -0.5 * beta * x, beta.sqrt()

def prior_std(sde):
    """The std of the prior N(0, std^2 I) for p_1: VE's std(1), VP's 1."""
    one = torch.tensor(1.0, dtype=torch.float64)
    return marginal_mean_std(sde, one)[1].item() if sde.kind == 've' else 1.0

def reverse_drift(sde, x, t, score, ode=False):
    """f - g^2 score (reverse SDE, eq. 6), or f - g^2 score / 2 (ODE, eq. 13)."""
    f, g = drift_diffusion(sde, x, t)
    return f - g ** 2 * score * (0.5 if ode else 1.0)

def prior_logp(sde, x):  # log N(x; 0, prior_std^2 I) per sample
    s, D = prior_std(sde), x[0].numel()
    return -0.5 * D * math.log(2 * math.pi * s * s) - x.flatten(1).square().sum(1) / (2 * s * s)

def dsm_loss(score_fn, sde, x0, t, z):
    """Denoising score matching (eq. 7), lambda(t) = std^2: per sample, mean |std s(x_t, t) + z|^2,
    x_t = mean x0 + std z."""
    mean, std = marginal_mean_std(sde, t.view(-1, *[1] * (x0.dim() - 1)))
    return (std * score_fn(mean * x0 + std * z, t) + z).square().flatten(1).mean(1)

# ---- model ----
def norm(ch):
    return nn.GroupNorm(8, ch)

def zero(layer):  # weights and bias zeroed: a residual branch that starts as the identity
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

class ResBlock(nn.Module):  # norm, SiLU, conv, + embedding; norm, SiLU, dropout, conv (zeroed)
    def __init__(self, cin, cout, tdim, dropout):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb, self.norm2, self.drop = nn.Linear(tdim, cout), norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))

class Attention(nn.Module):  # multi-head self-attention over the H x W positions, residual
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
    """std(t) score: ddpm_mnist.py's U-Net, Gaussian Fourier features of t (Tancik 2020)."""
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
        hs = [self.inp(F.pixel_unshuffle(x, self.patch))]  # (B, channels, S / p, S / p)
        for layers in self.down:
            hs.append(run(layers, hs[-1], emb))
        h = run(self.mid, hs[-1], emb)
        for layers in self.up:
            skip = isinstance(layers[0], ResBlock)  # it takes the matching skip
            h = run(layers, torch.cat([h, hs.pop()], 1) if skip else h, emb)
        return F.pixel_shuffle(self.out(h), self.patch)

def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h

def make_model(c):
    """EDIT ME: any net(c_in x_t, t (B,) in [eps, 1]) -> out of x's shape (score: out / std(t))."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['channels'], mults,
                c['res_blocks'], attn, c['dropout'], c['patch'], c['fourier_scale'])

def score_model(net, sde):
    """score(x, t) = net(c_in x, t) / std(t), EDM's c_in = (mean^2 / 4 + std^2)^(-1/2)."""
    def score_fn(x, t):
        mean, std = marginal_mean_std(sde, t.view(-1, 1, 1, 1))
        return net(x / (0.25 * mean ** 2 + std ** 2).sqrt(), t).float() / std
    return score_fn

# ---- sampling ----
@torch.no_grad()
def em_sampler(score_fn, sde, shape, steps, eps, generator=None, device='cpu', corrector_snr=0.0):
    """Euler-Maruyama on the reverse SDE from t = 1 to eps, the last step's mean; corrector_snr:
    PC, a Langevin step first (Algorithms 4-5, norms averaged over the batch). (x, NFE)."""
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
    """Dormand-Prince 5(4) with scipy's solve_ivp('RK45') step control and Hairer's first step
    (II.4). Returns (y(t1), NFE)."""
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
    """The probability-flow ODE (eq. 13) from t = 1 to eps by RK45, then Tweedie's E[x(0) |
    x(eps)] = (x + std^2 s) / mean. Returns (x, NFE)."""
    def fun(t, x):
        score = score_fn(x, torch.full(shape[:1], t, device=device))
        return reverse_drift(sde, x, torch.tensor(t), score, ode=True)
    x = torch.randn(shape, generator=generator, device=device) * prior_std(sde)
    x, nfe = rk45(fun, 1.0, eps, x, tol, tol)
    mean, std = marginal_mean_std(sde, torch.tensor(eps))
    return (x + std ** 2 * score_fn(x, torch.full(shape[:1], eps, device=device))) / mean, nfe + 1

def ode_log_likelihood(score_fn, sde, x, eps, tol=1e-5, generator=None):
    """log p_0(x) = log p_1(x(1)) + int_eps^1 div f~ dt (appendix D.2), div f~ by Hutchinson's
    z^T J z (a Rademacher z per sample). Returns (log p in nats, NFE)."""
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
    """The data's range: [0, 1] for VE as in the seed, [-1, 1] for VP."""
    return (0.0, 1.0) if c['sde'] == 've' else (-1.0, 1.0)

def bits_per_dim(score_fn, sde, images, c, generator=None):
    """Bits/dim of uint8 images, uniformly dequantised: -log2 p(x) / D + log2(256 / width)."""
    lo, hi = data_range(c)
    u = torch.rand(images.shape, generator=generator, device=images.device)
    x = lo + (hi - lo) * (images.float() + u) / 256
    logp, nfe = ode_log_likelihood(score_fn, sde, x, c['eps'], c['ode_tol'], generator)
    return -logp / (x[0].numel() * math.log(2)) + math.log2(256 / (hi - lo)), nfe

def sample_with(score_fn, sde, method, n, c, generator, dev):
    """n uint8 images on the CPU, 500 at a time, and the NFE of one batch."""
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
    """Step s draws t and z for the global batch seeded by (seed, s); rank r takes rows r::world."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: fails fast
    ds = load_dataset(c, c['dataset'], n=c['train_images'])[0]
    B, per_epoch = c['batch_size'], epoch_steps(ds, c, world)
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
        load_state(ckpt, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    score_fn = score_model(net, sde)
    stop = min(total := c['epochs'] * per_epoch, c['max_steps'] or total)  # the lr's: total
    lr_at = lambda s: (c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5
                       * (1 + math.cos(math.pi * min(1, s / total))))
    shape = (1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['image_size'])
    if rank == 0:
        print(f"data: {len(ds):,} {c['dataset']} images {shape} in [{lo:g}, {hi:g}] | {sde.kind} "
              f"SDE{f', sigma {sde.sigma:g}' if sde.kind == 've' else ''} | U-Net "
              f'{sum(p.numel() for p in model.parameters()):,} parameters | {dev}, '
              f"{c['dtype']}, {world} process(es) | {stop} of {total} steps of batch {B}")
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, 0, opt, rank, world)
    with boundary, closing(batches(ds, c, dev, rank, world, step, stop, per_epoch)) as data:
        for x, _ in data:
            # noise draw: t, z for the global batch; this rank's rows
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
            # EMA, no autograd record; warm-up: the average covers the steps so far
            with torch.no_grad():
                w = 1 - min(c['ema'], (1 + step) / (10 + step))
                torch._foreach_lerp_(ema_params, params, w)
            # boundary: log, save, stop
            boundary.add(loss=loss)
            boundary(step, params, save)
    return ema.eval(), boundary.curve

def figures(c, model, dev, curve):
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
    """Each sampler's NFE, time, grid and judge's figures; bits/dim."""
    sde, n, k = make_sde(c), c['eval_samples'], c['steps']
    score_fn, judge = score_model(model, sde), Judge(c, dev, n) if c['dataset'] == 'mnist' else None
    names = dict(em=f'em {k} steps', em2=f'em {2 * k} steps', pc=f'pc {k} steps',
                 ode=f"ode rk45 tol {c['ode_tol']:g}")
    for method in [m for m in c['eval_samplers'].replace(' ', '').split(',') if m]:
        g, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), time.time()
        x, nfe = sample_with(score_fn, sde, method, n, c, g, dev)
        print(f'eval | {names[method]} | NFE {nfe} | {n} samples in {time.time() - t0:.0f}s'
              + (judge(x)['line'] if judge else ''), flush=True)
        save_grid(x[:100], os.path.join(c['out_dir'], f'samples_{method}.png'))
    if c['likelihood_images']:
        train = c['dataset'] == 'folder'
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
    end_run()

# ---- plumbing: the same in the four image scripts (a test keeps it so) ----
SCRIPT, LOCK = os.path.basename(__file__), []  # LOCK: the open out_dir/.lock of this run

def fail(why):
    raise SystemExit(f'{SCRIPT}: {why}')  # one line, no traceback

def get_config(argv=None):  # the config block as flags ('a' | 'b': choices)
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
    c, argv = vars(ap.parse_args(argv)), sys.argv[1:] if argv is None else argv
    given = {a[2:].split('=')[0].replace('-', '_') for a in argv if a[:2] == '--'}
    flags, c = set(c), finish_config(c, given)
    return continued(c, given, flags) if c['resume'] or c['sample_only'] else c

def continued(c, given, flags):  # the checkpoint's config, changed by the flags given
    try:
        ckpt = torch.load(checkpoint(c), map_location='cpu', weights_only=True, mmap=True)
        old, step = dict(ckpt['config']), int(ckpt['step'])
    except Exception:  # none, or not this script's: load_checkpoint says which
        return c
    now = given | {'resume', 'sample_only', 'overwrite', 'out_dir', 'device', 'max_steps'}
    new = old | {k: v for k, v in c.items() if k in now | (set(c) - flags) or k not in old}
    changed = ', '.join(f"--{k.replace('_', '-')} {old[k]} -> {new[k]}" for k in sorted(given)
                        if old.get(k, new[k]) != new[k] and k not in ('resume', 'sample_only'))
    if int(os.environ.get('RANK', 0)) == 0:
        print(f'continuing {checkpoint(c)} (step {step}); changed flags: {changed or None}')
    return new

def refuse(problems):  # stops at the first (bad, why) with one line
    for bad, why in problems:
        if bad:
            fail(why)

def setup(c):  # (device, rank, world size), torchrun's process group joined, the out-dir locked
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    gpus, auto = torch.cuda.device_count(), 'mps' if torch.backends.mps.is_available() else 'cpu'
    dev = torch.device(('cuda' if gpus else auto) if c['device'] == 'auto' else c['device'])
    if dev.type == 'cuda' and dev.index is None:  # under torchrun, the LOCAL_RANK's GPU
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
    c['dtype'] = c['dtype'].replace('auto', 'bfloat16' if native_bf16(dev) else 'float32')
    refuse([(c['resume'] + c['sample_only'] + c['overwrite'] > 1,
             '--resume, --sample-only, --overwrite: pick one'),
            (dev.type == 'cuda' and dev.index >= gpus, f'no {dev}: {gpus} GPU(s) here'),
            (c['dtype'] == 'float16' and dev.type != 'cuda', '--dtype float16 needs CUDA'),
            (c['batch_size'] % world, f"--batch-size {c['batch_size']} won't split in {world}"),
            (c.get('fid') and not importlib.util.find_spec('torch_fidelity'),
             '--fid needs torch-fidelity: pip install torch-fidelity'),
            (os.path.exists(checkpoint(c)) and not c['resume'] + c['sample_only'] + c['overwrite'],
             f'{checkpoint(c)} holds a run: --resume true goes on, --overwrite true starts over')])
    torch.backends.cudnn.benchmark = dev.type == 'cuda'
    if 'RANK' in os.environ and not dist.is_initialized():  # torchrun
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo',
                                timeout=timedelta(hours=2))
    os.makedirs(c['out_dir'], exist_ok=True)
    if rank == 0:
        import fcntl
        LOCK[:] = [open(os.path.join(c['out_dir'], '.lock'), 'w')]  # closes the last run's
        try:  # held while the process lives, however it ends
            fcntl.flock(LOCK[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"another run is using --out-dir {c['out_dir']}; wait, or pass another --out-dir")
        print(f"device {dev} | dtype {c['dtype']} | output {c['out_dir']}")
    return dev, rank, world

def native_bf16(dev, cpuinfo='/proc/cpuinfo'):  # else autocast emulates it, slowly
    if dev.type != 'cpu':
        return dev.type == 'cuda' and torch.cuda.is_bf16_supported()
    flags = open(cpuinfo).read() if os.path.isfile(cpuinfo) else ''
    return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))

def autocast(c, dev):
    dtype = getattr(torch, c['dtype'])
    return nullcontext() if dtype == torch.float32 else torch.autocast(dev.type, dtype)

def end_run():
    if dist.is_initialized():  # the processes meet at the end
        dist.barrier()
        dist.destroy_process_group()

def write_whole(path, write):  # write(tmp), renamed over path: a kill leaves the old file
    tmp = '.tmp'.join(os.path.splitext(path))  # keeps the extension
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save raises RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        fail(f"could not write {path} ({getattr(e, 'strerror', 0) or e}); the old one is kept")

def checkpoint(c):
    return os.path.join(c['out_dir'], 'ckpt.pt')

def load_checkpoint(c):  # this script's, of the model the ARCH flags describe
    try:
        ckpt = torch.load(path := checkpoint(c), map_location='cpu', weights_only=True)
    except Exception as e:  # none, or not a file torch reads
        fail(f'no readable checkpoint at {path} ({type(e).__name__}); train first or fix --out-dir')
    if not (isinstance(ckpt, dict) and ckpt.get('script') == SCRIPT and 'config' in ckpt):
        fail(f'{path} is not a checkpoint of {SCRIPT}')
    if bad := [f"{k} {ckpt['config'].get(k)!r} (flag {c[k]!r})" for k in ARCH
               if ckpt['config'].get(k) != c[k]]:
        fail(f"{path} has a different model: {', '.join(bad)}; drop those flags to continue it")
    return ckpt

def load_state(ckpt, **objects):  # each object's state from the entry of its name
    for name, obj in objects.items():
        obj.load_state_dict(ckpt[name])

def save_checkpoint(c, step, **state):  # ckpt.pt, config.json and a copy of this script
    ckpt = {k: v.state_dict() if hasattr(v, 'state_dict') else v for k, v in state.items()}
    ckpt.update(step=step, config=c, script=SCRIPT)
    write_whole(checkpoint(c), lambda tmp: torch.save(ckpt, tmp))
    dump = json.dumps(c, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), lambda tmp: open(tmp, 'w').write(dump))
    write_whole(os.path.join(c['out_dir'], SCRIPT), lambda tmp: shutil.copy(__file__, tmp))

class Boundary:
    """Logs the losses' means, checks them finite, saves, and stops on a signal."""
    def __init__(self, c, step, stop, eval_every, opt, rank, world):
        self.c, self.stop, self.eval_every, self.opt, self.rank, self.world = \
            c, stop, eval_every, opt, rank, world
        self.rows, self.curve, self.caught, self.s, self.t = [], [], [], step, time.time()
        self.saved = step or None  # the step of the checkpoint this run stands on

    def __enter__(self):  # a stop signal only notes itself
        note = lambda signum, frame: self.caught.append(signal.Signals(signum).name)
        self.old = [(s, signal.signal(s, note)) for s in (signal.SIGINT, signal.SIGTERM)]
        return self

    def __exit__(self, *_):
        [signal.signal(s, h) for s, h in self.old]

    def add(self, **losses):  # scalar tensors on the device, or None for one not computed
        self.names, first = list(losses), next(x for x in losses.values() if x is not None)
        zero = torch.zeros((), device=first.device)  # sum, count of a loss not computed
        self.rows.append(torch.stack([v for x in losses.values() for v in (
            [x.detach().float(), zero + 1] if x is not None else [zero, zero])]))

    def __call__(self, step, params, save, evaluate=None):  # log, eval, save, stop if due
        c, last, path = self.c, step == self.stop, checkpoint(self.c)
        log, keep = (step % c[n] == 0 or last for n in ('log_every', 'save_every'))
        ev = evaluate and (last or self.eval_every and step % self.eval_every == 0)
        if not (log or keep or ev or self.caught and self.world == 1):
            return
        norm = torch.stack(torch._foreach_norm(params)).sum()[None]
        sums = torch.cat([torch.stack(self.rows).sum(0), norm, norm * 0 + bool(self.caught)])
        if self.world > 1:
            dist.all_reduce(sums)  # all processes agree
        *sums, norm, halt = sums.tolist()
        bad = [f'{k} is {v}' for k, v in zip(self.names, sums[::2]) if not math.isfinite(v)]
        if not math.isfinite(norm) or bad and c['dtype'] != 'float16':
            kept = f'{path} holds step {self.saved}' if self.saved else 'this run saved none'
            fail(f"{', '.join(bad) or f'the weights norm is {norm}'} in steps {self.s + 1}-{step};"
                 f' {kept}; try a lower --lr or --dtype float32')
        if log:
            ms = (time.time() - self.t) / (step - self.s) * 1e3
            means = [s / n if n else math.nan for s, n in zip(sums[::2], sums[1::2])]
            self.curve.append((step, means[0]))
            if self.rank == 0:
                print(' | '.join([f'step {step}/{self.stop}', *map('{} {:.4f}'.format, self.names,
                      means), f"lr {self.opt.param_groups[0]['lr']:.1e}", f'{ms:.1f} ms/step',
                      f"{c['batch_size'] / ms * 1e3:,.0f} img/s",
                      f'eta {ms * (self.stop - step) / 6e4:.1f}m']), flush=True)
        if self.rank == 0 and ev:
            evaluate(step)
        if keep or halt:
            if self.rank == 0:
                save(step)
            self.saved = step
        if halt:
            fail(f"interrupted at step {step} ({(self.caught or ['a signal elsewhere'])[0]}); "
                 f'saved {path}; go on with --resume true')
        if log:  # the next window's time leaves this eval and save out
            self.rows, self.s, self.t = [], step, time.time()

def epoch_steps(ds, c, world):  # DistributedSampler(drop_last) deals len // world a process
    return len(ds) // world // (c['batch_size'] // world) or fail(
        f"{len(ds)} training examples make no batch of {c['batch_size']}; lower --batch-size")

def batches(ds, c, dev, rank, world, first, stop, per_epoch):  # rank::world of each batch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    sampler = DistributedSampler(range(len(ds)), world, rank, seed=c['seed'], drop_last=True)

    def order(where):  # the rows of steps first .. stop - 1
        for e in range(first // per_epoch, math.ceil(stop / per_epoch)):
            sampler.set_epoch(e)
            rows = torch.tensor(list(sampler))[:per_epoch * (c['batch_size'] // world)]
            yield from rows.view(per_epoch, -1)[max(0, first - e * per_epoch):stop - e * per_epoch
                                                ].to(where)
    if isinstance(ds, TensorDataset):  # indexed on the device, if under a quarter of its memory
        free = torch.cuda.mem_get_info(dev)[0] if dev.type == 'cuda' else math.inf
        x, y = (t.to(dev) if t.nbytes < free / 4 else t for t in ds.tensors)
        yield from ((x[i], y[i]) for i in order(x.device))
        return
    mute = lambda _: [signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)]
    loader = iter(DataLoader(ds, batch_sampler=(i.tolist() for i in order('cpu')), num_workers=c[
        'workers'], pin_memory=dev.type == 'cuda', worker_init_fn=mute))
    try:
        yield from loader
    finally:  # the workers ignore SIGTERM: end them
        getattr(loader, '_shutdown_workers', lambda: None)()

def load_dataset(c, name, train=True, n=0):  # ((uint8 (C, S, S), label) items, classes)
    if name == 'folder':
        ds = ImageFiles(os.path.abspath(c['data_dir']), c['image_size'], c.get('folder_classes'), n)
        return ds, ds.classes
    from torchvision.datasets import CIFAR10, MNIST
    try:
        ds = (MNIST if name == 'mnist' else CIFAR10)(c['data_dir'], train=train, download=True)
    except Exception as e:  # offline, or a damaged file
        fail(f"{name} under {c['data_dir']} is missing or damaged and the download "
             f'failed ({type(e).__name__}: {str(e).splitlines()[0][:80]}); place the files there')
    x = torch.as_tensor(ds.data[:n or None])  # MNIST (N, 28, 28), CIFAR-10 (N, 32, 32, 3)
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    return torch.utils.data.TensorDataset(x, torch.as_tensor(ds.targets[:n or None])), ds.classes

class ImageFiles(torch.utils.data.Dataset):  # sub-folders as classes, or none (FFHQ's 70)
    def __init__(self, root, size, classes, n=0):
        from torchvision import transforms as T
        from torchvision.datasets import folder
        try:
            self.classes, index = folder.find_classes(root) if classes else ([], {'': 0})
            self.samples = folder.make_dataset(root, index, folder.IMG_EXTENSIONS)[:n or None]
        except OSError:
            fail(f"no images in {root}{' class sub-folders' if classes else ''}; pass --data-dir")
        self.transform = T.Compose([folder.pil_loader, T.Resize(size, T.InterpolationMode.BICUBIC),
                                    T.CenterCrop(size), T.PILToTensor()])  # a file's path -> uint8

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.transform(self.samples[i][0]), self.samples[i][1]

def to_uint8(x, lo=-1.0, hi=1.0):  # images in [lo, hi] -> uint8 on the CPU
    return ((x.float() - lo) * (255 / (hi - lo))).round().clamp(0, 255).to(torch.uint8).cpu()

def save_grid(images, path, nrow=10):  # uint8 (N, C, H, W), 1-pixel white gaps
    from torchvision.utils import save_image
    write_whole(path, lambda tmp: save_image(images / 255, tmp, nrow=nrow, padding=1, pad_value=1))

def write_samples(c, images, **labels):  # --sample-only: samples.npz, samples.png
    path, nhwc = os.path.join(c['out_dir'], 'samples.npz'), images.permute(0, 2, 3, 1).numpy()
    write_whole(path, lambda tmp: np.savez(tmp, images=nhwc, **labels))
    save_grid(images[:100], os.path.join(c['out_dir'], 'samples.png'))
    print(f'wrote {len(images)} samples to {path} (uint8 NHWC) and samples.png')

class Uint8Images(torch.utils.data.Subset):  # as torch-fidelity takes them: uint8 (3, H, W)
    __getitems__ = None  # the DataLoader then reads by __getitem__

    def __getitem__(self, i):
        x = self.dataset[i]  # an image, or (image, label)
        return (x if torch.is_tensor(x) else x[0]).expand(3, -1, -1)

def fid_is(c, images, reference, dev):  # FID to the reference dataset, and IS, of uint8 images
    import torch_fidelity
    name = f"{c['dataset']}-{os.path.abspath(c['data_dir'])}-{images.shape[-1]}-{len(reference)}"
    try:  # the reference's statistics are cached by name
        m = torch_fidelity.calculate_metrics(
            input1=Uint8Images(images, range(len(images))), fid=True, isc=True, verbose=False,
            input2=Uint8Images(reference, range(len(reference))), cuda=dev.type == 'cuda',
            save_cpu_ram=True, samples_shuffle=False, input2_cache_name=re.sub(r'\W', '_', name),
            feature_extractor_weights_path=c['fid_weights'] or None)
    except Exception as e:  # most often offline, without --fid-weights
        fail(f'FID failed ({type(e).__name__}: {str(e)[:80]}); offline, pass --fid-weights '
             'weights-inception-2015-12-05-6726825d.pth')
    return m['frechet_inception_distance'], m['inception_score_mean']


# ---- the MNIST judge: the same in the three MNIST scripts ----
class Judge:  # digits scored by a small CNN, trained once (99% test accuracy), kept as --classifier
    def __init__(self, c, dev, n):  # the floor: the figures of n real training digits
        (x, y), (x_test, y_test) = (load_dataset(c, 'mnist', t)[0].tensors for t in (True, False))
        conv = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*conv(1, 32), *conv(32, 64), nn.Flatten(), nn.Linear(3136, 128),
                                 nn.ReLU(), nn.Linear(128, 10)).to(dev)
        self.dev, path = dev, c['classifier'] or os.path.join(c['out_dir'], 'classifier.pt')
        if os.path.exists(path):
            self.net.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        else:  # 5 epochs of Adam 1e-3, cosine
            opt, g = torch.optim.Adam(self.net.parameters()), torch.Generator().manual_seed(0)
            lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5 * math.ceil(len(x) / 128))
            for i in [i for _ in range(5) for i in torch.randperm(len(x), generator=g).split(128)]:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.net(x[i].to(dev) / 127.5 - 1), y[i].to(dev)).backward()
                opt.step()
                lr.step()
            write_whole(path, lambda tmp: torch.save(self.net.state_dict(), tmp))
        (f, p), g = self.features(x_test), torch.Generator().manual_seed(c['seed'])
        self.test, self.floor = (f.mean(0), torch.cov(f.T)), {}
        self.floor = self(x[torch.randperm(len(x), generator=g)[:n]])
        print(f'eval | judge {path}: test accuracy {(p.argmax(1) == y_test).double().mean():.2%} | '
              f'{n} training images' + self.floor['line'])
    @torch.no_grad()
    def features(self, images):  # (features (N, 128) float64, class probabilities (N, 10))
        f = torch.cat([self.net[:-1](b.to(self.dev) / 127.5 - 1) for b in images.split(500)])
        return f.double().cpu(), self.net[-1](f).float().cpu().softmax(1)
    def __call__(self, images):  # the share >= 90% sure, KL(classes || uniform), Frechet distance
        (f, p), (mu_t, cov_t) = self.features(images), self.test
        hist, cov = torch.bincount(p.argmax(1), minlength=10).double() / len(p), torch.cov(f.T)
        cross = torch.linalg.eigvals(cov @ cov_t).real.clamp(min=0).sqrt().sum()  # tr (C C_t)^(1/2)
        d2 = ((f.mean(0) - mu_t).square().sum() + cov.trace() + cov_t.trace() - 2 * cross).item()
        m = {'confident': (p.max(1).values >= 0.9).double().mean().item(), 'frechet': d2,
             'kl': (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item()}
        return m | {'line': f" | confident (p >= 0.9) {m['confident']:.1%} | KL(classes || uniform)"
                    f" {m['kl']:.4f} | frechet {d2:.2f}" + (f" ({d2 / self.floor['frechet']:.2f}x "
                                                            'floor)' if self.floor else '')}


if __name__ == '__main__':
    main()
