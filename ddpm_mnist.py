"""
DDPM on MNIST: a small U-Net that trains to clean, balanced digits on a CPU and measures itself.

DDPM (Ho et al. 2020): the loss |eps - eps_theta(x_t, t)|^2 (eq. 14), or v (Salimans & Ho 2022)
with --pred v, weighted by min-SNR (Hang et al. 2023); the cosine (Nichol & Dhariwal eq. 17) or
linear schedule; ancestral sampling (Algorithm 2) and DDIM (Song et al. 2020, eq. 12). t = 0..T-1
stands for the papers' 1..T. The cpu preset folds 2x2 pixels into 4 channels (pixel unshuffle), so
its U-Net runs at 14 and 7. --eval scores samples with the MNIST judge (below), then the negative
ELBO in bits/dim on test images (eq. 5, L_0 the discretised Gaussian of eq. 13).

    python ddpm_mnist.py --eval true                              # CPU: 147 ms/step, 16 min
    python ddpm_mnist.py --preset gpu                             # a wider U-Net, 100 epochs
    torchrun --nproc_per_node=2 ddpm_mnist.py --preset gpu        # DDP; --batch-size is global
    python ddpm_mnist.py --sample-only true --n-samples 1000      # samples.npz and a grid
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
from contextlib import closing, nullcontext
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

def check_config(c):  # flags a run cannot use, each refused with one line
    side, halvings = 28 // max(c['patch'], 1), c['channel_mults'].count(',')
    refuse([(c['patch'] not in (1, 2, 4, 7), '--patch must divide 28: 1, 2, 4 or 7'),
            (side % 2 ** halvings, f'--channel-mults: the U-Net cannot halve {side} pixels '
             f'{halvings} times'),
            (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
             '--sample-steps needs --sampler ddim (DDPM runs all T steps)')])

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

def q_sample(x0, alphas_cumprod_t, noise):  # x_t ~ q(x_t | x0) (eq. 4); abar_t broadcasts
    return alphas_cumprod_t.sqrt() * x0 + (1 - alphas_cumprod_t).sqrt() * noise

def q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod):
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t) (eqs. 6-7), abar_{-1} = 1."""
    a, b, ap = alphas_cumprod[t], betas[t], alphas_cumprod[t - 1] if t > 0 else 1.0
    c0, ct = ap ** 0.5 * b / (1 - a), (1 - b) ** 0.5 * (1 - ap) / (1 - a)
    return c0 * x0 + ct * xt, (1 - ap) / (1 - a) * b

def x0_eps_from_output(xt, out, alphas_cumprod_t, pred):
    """The output as (x0, eps), a = sqrt(abar_t), b = sqrt(1 - abar_t): from eps, x0 = (x_t - b eps)
    / a (eq. 4 inverted); from v = a eps - b x0, x0 = a x_t - b v and eps = b x_t + a v."""
    a, b = alphas_cumprod_t ** 0.5, (1 - alphas_cumprod_t) ** 0.5
    return ((xt - b * out) / a, out) if pred == 'eps' else (a * xt - b * out, b * xt + a * out)

# ---- model ----
def timestep_embedding(t, dim):  # (B,) -> (B, dim): sin, cos at frequencies 1 .. 1e-4
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)

def norm(ch):  # 8 groups: ddpm_cifar's min(32, ch / 4) would give 8-32 at these widths,
    return nn.GroupNorm(8, ch)  # and this network's README figures were measured with 8

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
    """eps_theta(x_t, t) (or v): ddpm_cifar.py's U-Net on patches, without labels or the conv
    after each upsampling (the next ResBlock starts with one)."""
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
            skip = isinstance(layers[0], ResBlock)  # it takes the matching skip
            h = run(layers, torch.cat([h, hs.pop()], 1) if skip else h, emb)
        return F.pixel_shuffle(self.out(h), self.patch)

def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h

def make_model(c):
    """EDIT ME: any model(x_t (B, 1, 28, 28), t (B,) in 0..T-1) -> eps or v (--pred) of x_t's
    shape, with .parameters(), .state_dict(), .train() and .eval()."""
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

def normal_kl(mean1, var1, mean2, var2):  # KL(N(mean1, var1) || N(mean2, var2)), nats
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
    """Step s draws t and noise for the global batch seeded by (seed, s), rank r taking rows
    r::world: any number of processes trains one model, and --resume continues exactly."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds = load_dataset(c, 'mnist', n=c['train_images'])[0]
    B, per_epoch = c['batch_size'], epoch_steps(ds, c, world)
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
        load_state(ckpt, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    stop = min(total := c['epochs'] * per_epoch, c['max_steps'] or total)  # the lr's: total
    lr_at = lambda s: (c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5
                       * (1 + math.cos(math.pi * min(1, s / total))))
    if rank == 0:
        print(f"data: {len(ds):,} MNIST images | {c['schedule']}, T {c['timesteps']}, abar_T "
              f"{alphas_cumprod[-1]:.1e} | predicts {c['pred']} | U-Net "
              f"{sum(p.numel() for p in model.parameters()):,} parameters | {dev}, {c['dtype']}, "
              f'{world} process(es) | {stop} of {total} steps of batch {B}')
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, 0, opt, rank, world)
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
    """The sample grid, 8 samples' x0-predictions from x_T to x_0, the loss curve."""
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
    """The judge's figures of eval_samples samples, then bits/dim on elbo_images test images."""
    judge, n = Judge(c, dev, c['eval_samples']), c['eval_samples']
    g, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), time.time()
    x = sample_as_configured(model, n, c, g, dev)
    print(f"eval | {n} samples ({c['sampler']} {c['sample_steps'] or c['timesteps']} steps, "
          f'{time.time() - t0:.0f}s)' + judge(x)['line'], flush=True)
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
