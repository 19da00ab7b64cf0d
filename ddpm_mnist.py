"""
DDPM on MNIST: a small U-Net that trains to clean, balanced digits on a CPU and measures itself.

DDPM (Ho et al. 2020, arXiv:2006.11239): the simple loss |eps - eps_theta(x_t, t)|^2 (eq. 14), or v
(Salimans & Ho 2022) with --pred v, weighted by min-SNR (Hang et al. 2023); the cosine schedule
(Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999) or the linear one; ancestral sampling
(Algorithm 2) and DDIM (Song et al. 2020, eq. 12) on a respaced subset of the steps. t = 0..T-1
stands for the papers' 1..T. The cpu preset folds each 2x2 block of pixels into 4 channels (pixel
unshuffle, exactly invertible), so its U-Net runs at 14 and 7 for a quarter of the cost; the gpu
preset (--patch 1) runs at 28, 14 and 7. --eval scores N samples with the MNIST judge (below: no
Inception weights needed), then the negative ELBO in bits/dim on test images: L_T + sum_t L_{t-1}
+ L_0 (eq. 5), L_0 the discretised Gaussian over 256 bins (eq. 13).

Run (times on a 2-core CPU):
    python ddpm_mnist.py --eval true                              # cpu preset: 26 min training
    python ddpm_mnist.py --preset gpu                             # a wider U-Net, 100 epochs
    torchrun --nproc_per_node=2 ddpm_mnist.py --preset gpu        # DDP; --batch-size is global
    python ddpm_mnist.py --sample-only true --n-samples 1000      # samples.npz and a grid
    python ddpm_mnist.py --sample-only true --eval true --sampler ddpm --sample-steps 0   # T steps
    python ddpm_mnist.py --resume true                            # continue exactly
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
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
data_dir = './data'           # torchvision's MNIST root (MNIST/raw/...), downloaded there if online
out_dir = 'out/ddpm_mnist'    # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'cpu'                # 'cpu' | 'gpu': PRESETS['gpu'] for the flags not given
patch = 2                     # the image enters as (28 / patch)^2 cells of patch^2 pixels
channels = 32                 # U-Net base width, a multiple of 8
channel_mults = '1,2'         # width multiplier per resolution, from 28 / patch down, halving
res_blocks = 2                # residual blocks per resolution down (one more up)
attn_res = '7'                # resolutions with self-attention ('' = none; the middle has it)
dropout = 0.0                 # in the residual blocks
schedule = 'cosine'           # 'cosine' | 'linear'
timesteps = 1000              # T
beta_start = 1e-4             # beta_1 of 'linear'
beta_end = 0.02               # beta_T of 'linear'
pred = 'eps'                  # 'eps' | 'v': what the network predicts
min_snr = 5.0                 # gamma of the min-SNR weighting min(SNR_t, gamma) / SNR_t; 0 = off
epochs = 7                    # passes over the training images
batch_size = 64               # global, split across DDP ranks
lr = 2e-3                     # peak AdamW learning rate, after a linear warm-up, cosine to 0
warmup = 200                  # warm-up steps
weight_decay = 0.0            # AdamW's
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.995                   # decay of the weight average that is sampled from
train_images = 0              # 0 = all 60,000; fewer for quick runs
sampler = 'ddim'              # 'ddim' | 'ddpm'
sample_steps = 50             # reverse steps; 0 = T (DDPM runs all T)
eta = 0.0                     # DDIM noise: 0 = deterministic, 1 = DDPM-like
sigma = 'beta_tilde'          # 'beta_tilde' | 'beta': variance of the DDPM step and of the ELBO's p
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval = False                  # after training (or --sample-only): the judge's figures, bits/dim
eval_samples = 1000           # samples (and real images, the floor) that --eval scores
elbo_images = 100             # test images whose negative ELBO is computed (T steps each); 0 = off
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
seed = 0                      # data order, noise and initial weights

PRESETS = {'gpu': dict(patch=1, channels=64, channel_mults='1,2,2', res_blocks=2, dropout=0.1,
                       epochs=100, batch_size=128, lr=2e-4, warmup=1000, ema=0.9995)}
ARCH = ('patch', 'channels', 'channel_mults', 'res_blocks', 'attn_res', 'schedule', 'timesteps',
        'beta_start', 'beta_end', 'pred')

def finish_config(c, given):
    return c | {k: v for k, v in PRESETS.get(c['preset'], {}).items() if k not in given}

def check_config(c):
    """One line saying what is wrong and what would work, for flags a run cannot use."""
    mults, side = c['channel_mults'].split(','), 28 // max(c['patch'], 1)
    refuse(c, [
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults),
         "--channel-mults takes positive integers like '1,2,2'"),
        (c['patch'] not in (1, 2, 4, 7), '--patch must divide 28: 1, 2, 4 or 7'),
        (side % 2 ** (len(mults) - 1),
         f'--channel-mults: {len(mults)} levels would halve {side} pixels {len(mults) - 1} times'),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')),
         "--attn-res takes resolutions like '7' or '14,7'"),
        (c['channels'] % 8 or c['channels'] <= 0, '--channels must be a positive multiple of 8'),
        (c['timesteps'] < 2 or not 0 < c['beta_start'] < c['beta_end'] < 1,
         'need --timesteps >= 2 and 0 < --beta-start < --beta-end < 1'),
        (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
         '--sample-steps needs --sampler ddim (DDPM runs all T steps)'),
        (not 0 <= c['sample_steps'] <= c['timesteps'], '--sample-steps must be 0..--timesteps'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every and --log-every must be >= 1'),
        (min(c['train_images'], c['max_steps'], c['elbo_images'], c['warmup'], c['min_snr']) < 0,
         '--train-images, --max-steps, --elbo-images, --warmup and --min-snr must be >= 0'),
        (c['eval_samples'] < 20, '--eval-samples must be at least 20 (a histogram of 10 classes)'),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and 0 <= c['eta'] <= 1 and 0 <= c['dropout'] < 1
              and c['grad_clip'] >= 0 and c['weight_decay'] >= 0), 'need --lr > 0, 0 <= --ema < 1,'
         ' 0 <= --eta <= 1, 0 <= --dropout < 1, --grad-clip >= 0 and --weight-decay >= 0')])


# ---- schedule ----
def linear_betas(T, beta_start, beta_end):
    """Ho et al. sec. 4: beta_1 .. beta_T evenly spaced (float64, index t = 0..T-1)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)

def cosine_alphas_cumprod(T, s=0.008):
    """abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) pi/2)^2, t = 0..T (N&D eq. 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]

def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), clipped at max_beta (abar(T) = 0 would make beta_T 1)."""
    alphas_cumprod = cosine_alphas_cumprod(T, s)
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)

def make_betas(c):
    if c['schedule'] == 'cosine':
        return cosine_betas(c['timesteps'])
    return linear_betas(c['timesteps'], c['beta_start'], c['beta_end'])

def q_sample(x0, alphas_cumprod_t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps ~ q(x_t | x0) (eq. 4); abar_t broadcasts."""
    return alphas_cumprod_t.sqrt() * x0 + (1 - alphas_cumprod_t).sqrt() * noise

def q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod):
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t) (eqs. 6-7), abar_{-1} = 1. The
    schedule: float64 tensors, or lists of floats (the sampler's: MPS has no float64)."""
    a, b, ap = alphas_cumprod[t], betas[t], alphas_cumprod[t - 1] if t > 0 else 1.0
    c0, ct = ap ** 0.5 * b / (1 - a), (1 - b) ** 0.5 * (1 - ap) / (1 - a)
    return c0 * x0 + ct * xt, (1 - ap) / (1 - a) * b

def x0_eps_from_output(xt, out, alphas_cumprod_t, pred):
    """The output as (x0, eps), a = sqrt(abar_t), b = sqrt(1 - abar_t): from eps, x0 = (x_t - b eps)
    / a (eq. 4 inverted); from v = a eps - b x0, x0 = a x_t - b v and eps = b x_t + a v."""
    a, b = alphas_cumprod_t ** 0.5, (1 - alphas_cumprod_t) ** 0.5
    return ((xt - b * out) / a, out) if pred == 'eps' else (a * xt - b * out, b * xt + a * out)


# ---- model ----
def timestep_embedding(t, dim):
    """(B,) -> (B, dim) sin and cos of t at geometric frequencies 1 .. 1e-4 (Vaswani et al.)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)

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
    """eps_theta(x_t, t) (or v): ddpm_cifar.py's U-Net on patches, without labels, and without
    DDPM's 3x3 conv after each upsampling (the next ResBlock starts with one; the README's figures
    were measured so)."""
    def __init__(self, channels=32, mults=(1, 2), res_blocks=2, attn_res=(7,), dropout=0.0,
                 patch=2):
        super().__init__()
        tdim, res, self.channels, self.patch = 4 * channels, 28 // patch, channels, patch
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(patch ** 2, channels, 3, padding=1)
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
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, patch ** 2, 3, padding=1)))

    def forward(self, x, t):  # x (B, 1, 28, 28), t (B,) -> (B, 1, 28, 28)
        emb = self.temb(timestep_embedding(t, self.channels))
        hs = [self.inp(F.pixel_unshuffle(x, self.patch))]  # (B, C, 28 / patch, 28 / patch)
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
    """The network contract, for a forker who swaps in another: model(x_t, t) -> out, x_t (B, 1,
    28, 28) in [-1, 1]-data units, t (B,) integer steps 0..T-1; out has x_t's shape: the predicted
    eps or v (--pred). The loop also uses .parameters(), .state_dict() and .train()/.eval()."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['patch'])


# ---- loss ----
def loss_weight(alphas_cumprod_t, pred, min_snr):
    """Per-example weight of the squared error. In x0 terms the eps error is SNR_t |x0 - x0_hat|^2,
    the v error (SNR_t + 1) |x0 - x0_hat|^2 (SNR_t = abar_t / (1 - abar_t)); min-SNR makes either
    min(SNR_t, gamma) |x0 - x0_hat|^2 (Hang et al. 2023): the many easy steps weigh less."""
    if not min_snr:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=min_snr) / (snr + (pred == 'v'))

def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)

def discretized_gaussian_log_likelihood(x, mean, std):
    """log P(x) for x on the 256 levels of [-1, 1]: the mass of N(mean, std^2) over the level's bin
    of width 2/255, the outermost reaching to -inf and +inf (eq. 13): the masses sum to 1."""
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), (x + 1 / 255 - mean) / std)
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), (x - 1 / 255 - mean) / std)
    flip = (lower + upper) > 0  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): the side without cancelling
    hi, lo = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_u, log_l = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_u + torch.log1p(-torch.exp(log_l - log_u).clamp(max=1 - 1e-12))

@torch.no_grad()
def nll_bits_per_dim(model, x0, betas, pred='eps', sigma='beta_tilde', generator=None):
    """Negative ELBO per image (B,) in bits/dim (eq. 5): KL(q(x_T | x0) || N(0, I)) + the sum over
    t >= 2 of KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) + -log p(x0 | x1) (eq. 13), an x_t drawn
    per t. p's variance is beta_t or beta_tilde_t; at t = 1, where beta_tilde is 0, beta_tilde_2."""
    betas, x0 = betas.to(x0.device, torch.float64), x0.double()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    a_T = alphas_cumprod[-1]
    total = normal_kl(a_T.sqrt() * x0, 1 - a_T, torch.zeros(()), torch.ones(())).sum((1, 2, 3))
    for t in range(len(betas) - 1, -1, -1):
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        xt = q_sample(x0, alphas_cumprod[t], noise)
        out = model(xt.float(), torch.full((len(x0),), t, device=x0.device)).double()
        x0_hat = x0_eps_from_output(xt, out, alphas_cumprod[t], pred)[0].clamp(-1, 1)
        mean_p, var_tilde = q_posterior_mean_var(x0_hat, xt, t, betas, alphas_cumprod)
        var_p = betas[t] if sigma == 'beta' else var_tilde if t > 0 else q_posterior_mean_var(
            x0, xt, 1, betas, alphas_cumprod)[1]
        if t > 0:
            q = q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod)
            total += normal_kl(*q, mean_p, var_p).sum((1, 2, 3))
        else:
            total -= discretized_gaussian_log_likelihood(x0, mean_p, var_p.sqrt()).sum((1, 2, 3))
    return total / (x0[0].numel() * math.log(2))


# ---- sampling ----
@torch.no_grad()
def sample(model, shape, betas, steps=0, method='ddim', sigma='beta_tilde', eta=0.0, pred='eps',
           generator=None, device='cpu', keep=()):
    """Reverse process from x_T ~ N(0, I). 'ddpm': Algorithm 2 over all T steps, x_{t-1} = the
    posterior mean (eq. 7) at the predicted x0 (clipped to [-1, 1]) plus sigma_t z. 'ddim': eq. 12
    of Song et al. on `steps` evenly spaced timesteps (0 = all T), noise eta * eq. 16. The schedule
    stays float64, each step's coefficients Python floats. Returns x_0 in [-1, 1] and {t: the x0
    prediction at t} for t in keep (t = T: the starting noise)."""
    alphas_cumprod, T = torch.cumprod(1 - betas.double(), 0).tolist(), len(betas)
    betas, x = betas.tolist(), torch.randn(shape, generator=generator, device=device)
    snaps = {T: x.cpu()} if T in keep else {}
    ts = range(T - 1, -1, -1) if method == 'ddpm' else torch.linspace(T - 1, 0, steps or T).round()
    ts = [int(t) for t in ts]
    for i, t in enumerate(ts):
        a = alphas_cumprod[t]
        out = model(x, torch.full(shape[:1], t, device=device, dtype=torch.long)).float()
        x0 = x0_eps_from_output(x, out, a, pred)[0].clamp(-1, 1)
        if method == 'ddpm':
            mean, var = q_posterior_mean_var(x0, x, t, betas, alphas_cumprod)
            z = torch.randn(shape, generator=generator, device=device) if t > 0 else 0
            x = mean + (betas[t] if sigma == 'beta' else var) ** 0.5 * z
        else:
            a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0
            eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5  # the eps that agrees with the clipped x0
            s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5  # eq. 16
            z = torch.randn(shape, generator=generator, device=device)
            x = a_prev ** 0.5 * x0 + (1 - a_prev - s ** 2) ** 0.5 * eps + s * z
        if t in keep:
            snaps[t] = x0.cpu()
    return x.clamp(-1, 1), snaps

def sample_as_configured(model, n, c, generator, dev):
    """n uint8 digits (n, 1, 28, 28) by the config's sampler, 500 at a time."""
    how = (c['sample_steps'], c['sampler'], c['sigma'], c['eta'], c['pred'], generator, dev)
    return torch.cat([to_uint8(sample(model, (min(500, n - i), 1, 28, 28), make_betas(c), *how)[0])
                      for i in range(0, n, 500)])


# ---- train ----
def train(c, dev, rank, world):
    """Step s draws t and noise for the whole global batch on the device from a generator seeded by
    (seed, s), and rank r takes rows r, r + world, ..., as it does of the data: any number of
    processes trains the same model as one, and --resume continues exactly without RNG state."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds = load_dataset(c, 'mnist', n=c['train_images'])[0]
    B, per_epoch = c['batch_size'], epoch_steps(ds, c, world)
    if rank == 0:
        write_run_files(c)
    alphas_cumprod = torch.cumprod(1 - make_betas(c), 0).float().to(dev)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA's too
    model = make_model(c).to(dev, memory_format=layout)
    ema = make_model(c).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), c['lr'], weight_decay=c['weight_decay'],
                            fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step = ckpt['step'] if ckpt else 0
    if ckpt:
        load_state(ckpt, dev, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    total = c['epochs'] * per_epoch  # the lr schedule's length; --max-steps stops early
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: (c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5
                       * (1 + math.cos(math.pi * min(1, s / total))))
    if rank == 0:
        print(f"data: {len(ds):,} MNIST images | {c['schedule']} schedule, T {c['timesteps']} | "
              f"predicts {c['pred']} | U-Net {sum(p.numel() for p in model.parameters()):,} "
              f"parameters | {dev}, {c['dtype']}, {world} process(es) | {stop} of {total} steps "
              f'of batch {B}' + (f' | resumed at step {step}' if step else ''))
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, 0, opt, [scaler], rank, world)
    with boundary, closing(batches(ds, c, dev, rank, world, step, stop, per_epoch)) as data:
        for x, _ in data:
            # noise draw: this step's t and noise for the global batch; this rank's rows
            g.manual_seed((c['seed'] * 1_000_003 + step) * 1024)
            t = torch.randint(0, c['timesteps'], (B,), generator=g, device=dev)[rank::world]
            noise = torch.randn((B, 1, 28, 28), generator=g, device=dev)[rank::world]
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + 1 + rank)  # dropout
            x0 = x.to(dev, non_blocking=True).float() / 127.5 - 1
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            target = noise if c['pred'] == 'eps' else a.sqrt() * noise - (1 - a).sqrt() * x0
            xt = q_sample(x0, a, noise).contiguous(memory_format=layout)
            # loss (eq. 14, weighted)
            with autocast(c, dev):
                error = (net(xt, t).float() - target).square()
                loss = (loss_weight(a, c['pred'], c['min_snr']) * error).mean()
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
    """The sample grid, the reverse process of 8 samples (x0-predictions from x_T to x_0), the
    loss curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g, T, out = torch.Generator(dev).manual_seed(c['seed']), c['timesteps'], c['out_dir']
    x = sample_as_configured(model, c['n_samples'], c, g, dev)
    save_grid(x, os.path.join(out, 'samples.png'))
    ts = sorted({T, 0} | {int(T * f / 10) for f in range(1, 10)}, reverse=True)
    _, snaps = sample(model, (8, 1, 28, 28), make_betas(c), 0, 'ddpm', c['sigma'], 0, c['pred'], g,
                      dev, keep=set(ts))
    strip = torch.stack([snaps[t] for t in ts], 1).flatten(0, 1)  # (8 len(ts), 1, 28, 28)
    save_grid(to_uint8(strip), os.path.join(out, 'reverse.png'), nrow=len(ts))  # a row a sample
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(*zip(*curve))
        ax.set(xlabel='step', ylabel='loss', yscale='log', title=f"mean of {c['log_every']} steps")
        fig.tight_layout()
        write_whole(os.path.join(out, 'loss.png'), lambda tmp: fig.savefig(tmp, dpi=80))
        plt.close(fig)

def evaluate(c, model, dev):
    """The judge's figures for eval_samples samples (and as many real images: the floor), then
    bits/dim on elbo_images test images."""
    judge, n = Judge(c, dev, c['eval_samples']), c['eval_samples']
    g, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), time.time()
    x = sample_as_configured(model, n, c, g, dev)
    print(f"eval | {n} samples ({c['sampler']} {c['sample_steps'] or c['timesteps']} steps, "
          f'{time.time() - t0:.0f}s)' + judge.line(judge(x)), flush=True)
    if c['elbo_images']:
        x, t0 = load_dataset(c, 'mnist', False)[0].tensors[0][:c['elbo_images']], time.time()
        x = (x.float() / 127.5 - 1).to(dev)
        bpd = nll_bits_per_dim(model, x, make_betas(c), c['pred'], c['sigma'], g).cpu()
        print(f'eval | negative ELBO on {len(bpd)} test images {bpd.mean():.3f} +- '
              f'{bpd.std() / math.sqrt(len(bpd)):.3f} bits/dim | {time.time() - t0:.0f}s')

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev, rank, world = setup(c)
    with after_training(c):
        if c['sample_only']:
            model = make_model(c).to(dev)
            model.load_state_dict(load_checkpoint(c)['ema'])
            g = torch.Generator(dev).manual_seed(c['seed'])
            write_samples(c, sample_as_configured(model.eval(), c['n_samples'], c, g, dev))
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
