"""
Class-conditional DDPM with classifier-free guidance on CIFAR-10 (or an image folder: FFHQ at 96).

DDPM (Ho et al. 2020): the loss |eps - eps_theta(x_t, t, y)|^2 (eq. 14), the linear schedule (or
cosine, Nichol & Dhariwal eq. 17), the CIFAR-10 U-Net (35.75M parameters with the class embedding).
Classifier-free guidance (Ho & Salimans 2022, eq. 6, s = 1 + w): labels become the null class with
probability p_uncond; sampling takes eps_u + s (eps_c - eps_u). Samplers: ancestral (Algorithm 2)
and DDIM (Song et al. 2020, eq. 12); t = 0..T-1 stands for the papers' 1..T. --fid N: FID and IS
by torch-fidelity (at 50k samples DDPM reports 3.17 unconditional, EDM 1.79).

    python ddpm_cifar.py --epochs 600 --cfg 3.0                        # one GPU
    torchrun --nproc_per_node=8 ddpm_cifar.py --epochs 600 --cfg 3.0   # --batch-size is global
    python ddpm_cifar.py --preset tiny --dataset shapes --image-size 16   # CPU: under a minute
    python ddpm_cifar.py --sample-only true --n-samples 50000 --fid 50000   # samples.npz, FID
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
dataset = 'cifar10'           # 'cifar10' | 'folder' | 'shapes' (3 generated classes)
data_dir = './data'           # torchvision's CIFAR-10 root (cifar-10-batches-py/), or a folder
folder_classes = False        # --dataset folder: its sub-folders are classes; false = unconditional
image_size = 32               # folder images are resized and centre-cropped to this; CIFAR-10 is 32
out_dir = 'out/ddpm_cifar'    # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'default'            # 'default' | 'tiny': PRESETS['tiny'] for the flags not given
channels = 128                # U-Net base width, a multiple of 32
channel_mults = '1,2,2,2'     # width multiplier per resolution, from image_size down, halving
res_blocks = 2                # residual blocks per resolution down (one more up)
attn_res = '16'               # resolutions with self-attention ('' = none; the middle has it)
dropout = 0.1                 # in the residual blocks
schedule = 'linear'           # 'linear' | 'cosine'
timesteps = 1000              # T
beta_start = 1e-4             # beta_1 of 'linear'
beta_end = 0.02               # beta_T of 'linear'
p_uncond = 0.1                # probability that a training label becomes the null class
cfg = 3.0                     # guidance scale s: 1 = conditional, 0 = unconditional
epochs = 600                  # passes over the training images
batch_size = 128              # global, split across DDP ranks
lr = 2e-4                     # peak AdamW learning rate, after a linear warm-up, then constant
warmup = 5000                 # warm-up steps
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.9999                  # decay of the weight average that is sampled from
flip = True                   # random horizontal flips of the training images
train_images = 0              # 0 = all; fewer for quick runs
workers = 4                   # DataLoader processes decoding a folder; 0 = in the main process
sampler = 'ddim'              # 'ddim' | 'ddpm'
sample_steps = 50             # reverse steps; 0 = T (DDPM runs all T)
eta = 0.0                     # DDIM noise: 0 = deterministic, 1 = DDPM-like
sigma = 'beta'                # 'beta' | 'beta_tilde': variance of the DDPM step
n_samples = 100               # samples --sample-only writes (labels cycling); the grid: <= 100
fid = 0                       # samples scored by FID and IS at the end (or --sample-only); 0 = off
fid_every = 0                 # epochs between FIDs during training; 0 = only at the end
fid_weights = ''              # torch-fidelity's Inception weights, offline; '' = download once
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, mps, cpu
dtype = 'auto'                # 'auto' | 'float32' | 'bfloat16' | 'float16': auto: bf16 if native
compile = False               # torch.compile the training model
resume = False                # continue the run in out_dir: its config, changed by the flags given
overwrite = False             # start over in an out_dir that holds a checkpoint
sample_only = False           # load out_dir/ckpt.pt (EMA weights), write n_samples to samples.npz
max_steps = 0                 # stop after this many steps (the lr schedule keeps its length)
save_every = 1000             # steps between checkpoints
log_every = 100               # steps between progress lines
seed = 0                      # data order, noise and initial weights

PRESETS = {'tiny': dict(channels=32, channel_mults='1,2', res_blocks=1, attn_res='', dropout=0.0,
                        timesteps=200, beta_start=5e-4, beta_end=0.1, epochs=10, batch_size=32,
                        lr=1e-3, warmup=20, ema=0.99, workers=0, sample_steps=20,
                        train_images=2000, log_every=10)}  # betas: DDPM's times 1000 / T
ARCH = ('dataset', 'folder_classes', 'image_size', 'channels', 'channel_mults', 'res_blocks',
        'attn_res', 'schedule', 'timesteps', 'beta_start', 'beta_end')

def finish_config(c, given):
    c.update({k: v for k, v in PRESETS.get(c['preset'], {}).items() if k not in given})
    c['cfg_given'] = 'cfg' in given  # an unconditional model refuses an explicit --cfg
    return c

def check_config(c):  # flags a run cannot use, each refused with one line
    halvings = 2 ** c['channel_mults'].count(',')
    refuse([(c['image_size'] % halvings, f'--image-size: the U-Net halves it, so k * {halvings}'),
            (c['dataset'] == 'cifar10' and c['image_size'] != 32, 'CIFAR-10 is 32x32'),
            (c['cfg'] != 1 and c['p_uncond'] == 0, '--cfg needs the null class: --p-uncond > 0'),
            (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
             '--sample-steps needs --sampler ddim (DDPM runs all T steps)'),
            (c['fid_every'] and not c['fid'], '--fid-every needs --fid N, the samples to score')])

# ---- schedule ----
def linear_betas(T, beta_start, beta_end):  # Ho et al. sec. 4, float64, index t = 0..T-1
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)

def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), abar(t) = cos((t/T + s) / (1 + s) pi/2)^2 (N&D eq. 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)

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

def guided_eps(eps_cond, eps_uncond, s):  # classifier-free guidance (Ho & Salimans eq. 6)
    return eps_uncond + s * (eps_cond - eps_uncond)

def drop_labels(y, null, p, u):  # each label becomes the null class where its draw u < p
    return torch.where(u < p, torch.full_like(y, null), y)

# ---- model ----
def timestep_embedding(t, dim):  # (B,) -> (B, dim): sin, cos at frequencies 1 .. 1e-4
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)

def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)  # DDPM's 32 groups; fewer in the narrow tiny preset

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
    """eps_theta(x_t, t, y): DDPM's U-Net (appendix B) with a class embedding (last row: null)."""
    def __init__(self, channels=128, mults=(1, 2, 2, 2), res_blocks=2, attn_res=(16,), dropout=0.1,
                 image_size=32, num_classes=10):
        super().__init__()
        tdim, res, self.channels = 4 * channels, image_size, channels
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label = nn.Embedding(num_classes + 1, tdim)
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
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
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2),
                                              nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, 3, 3, padding=1)))

    def forward(self, x, t, y):  # x (B, 3, S, S), t (B,), y (B,) in 0..num_classes (null: last)
        emb = self.temb(timestep_embedding(t, self.channels)) + self.label(y)
        hs = [self.inp(x)]
        for layers in self.down:
            hs.append(run(layers, hs[-1], emb))
        h = run(self.mid, hs[-1], emb)
        for layers in self.up:
            skip = isinstance(layers[0], ResBlock)  # it takes the matching skip
            h = run(layers, torch.cat([h, hs.pop()], 1) if skip else h, emb)
        return self.out(h)

def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h

def make_model(c, num_classes):
    """EDIT ME: any model(x_t (B, 3, S, S), t (B,) in 0..T-1, y (B,) in 0..num_classes (null))
    -> eps_hat of x_t's shape, with .parameters(), .state_dict(), .train() and .eval()."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['image_size'],
                num_classes)

# ---- sampling ----
def slerp(z0, z1, a):  # per sample (Shoemake 1985): the noise keeps its norm, about sqrt(D)
    cos = (z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1))
    theta = cos.clamp(-1, 1).acos().view(-1, *[1] * (z0.dim() - 1))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

@torch.no_grad()
def sample(model, shape, betas, labels, null, cfg=1.0, steps=0, method='ddim', sigma='beta',
           eta=0.0, generator=None, device='cpu', x_T=None):
    """x_0 in [-1, 1] from x_T ~ N(0, I), guided at scale cfg (labels and nulls in one pass).
    'ddpm': Algorithm 2 over all T steps, the posterior mean (eq. 7) at the clipped x0 plus sigma_t
    z; 'ddim': eq. 12 on `steps` evenly spaced timesteps (0 = all T), noise eta * eq. 16."""
    alphas_cumprod, T = torch.cumprod(1 - betas.double(), 0).tolist(), len(betas)
    betas, labels = betas.tolist(), labels.to(device)
    nulls = torch.full_like(labels, null)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = torch.linspace(T - 1, 0, T if method == 'ddpm' else steps or T).round().long().tolist()
    for i, t in enumerate(ts):
        tt = torch.full(shape[:1], t, device=device, dtype=torch.long)
        if cfg in (0, 1):  # one pass: the label, or the null label
            eps = model(x, tt, labels if cfg == 1 else nulls).float()
        else:
            both = model(x.repeat(2, 1, 1, 1), tt.repeat(2), torch.cat([labels, nulls])).float()
            eps = guided_eps(*both.chunk(2), cfg)
        a = alphas_cumprod[t]
        x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).clamp(-1, 1)  # eq. 4 inverted, clipped
        if method == 'ddpm':
            mean, var = q_posterior_mean_var(x0, x, t, betas, alphas_cumprod)
            z = torch.randn(shape, generator=generator, device=device) if t > 0 else 0
            x = mean + (betas[t] if sigma == 'beta' else var) ** 0.5 * z
        else:
            a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else 1.0
            eps = (x - a ** 0.5 * x0) / (1 - a) ** 0.5  # the eps that agrees with the clipped x0
            s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5  # eq. 16
            z = torch.randn(shape, generator=generator, device=device) if eta else 0
            x = a_prev ** 0.5 * x0 + (1 - a_prev - s ** 2) ** 0.5 * eps + s * z
    return x.clamp(-1, 1)

def sample_as_configured(model, num_classes, labels, c, generator, dev, x_T=None, **override):
    """uint8 images for these labels by the config's sampler (an unconditional model: no cfg)."""
    how = dict(cfg=c['cfg'] if num_classes else 1.0, steps=c['sample_steps'], method=c['sampler'],
               sigma=c['sigma'], eta=c['eta'])
    shape = (len(labels), 3, c['image_size'], c['image_size'])
    return to_uint8(sample(model, shape, make_betas(c), labels, num_classes, **(how | override),
                           generator=generator, device=dev, x_T=x_T))

def balanced_labels(n, num_classes):
    return torch.arange(n) % num_classes if num_classes else torch.zeros(n, dtype=torch.long)

def samples(model, num_classes, n, c, seed, dev):  # (n uint8 images, their cycling labels)
    y, g = balanced_labels(n, num_classes), torch.Generator(dev).manual_seed(seed)
    return torch.cat([sample_as_configured(model, num_classes, part, c, g, dev)
                      for part in y.split(500)]), y

# ---- data ----
def make_shapes(n, size, seed):
    """n red, green or blue squares and discs: 3 classes that show guidance on a CPU."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    r = (0.2 + 0.15 * torch.rand(n, 1, 1, generator=g)) * size  # half-width or radius
    cy, cx = r + (size - 2 * r) * torch.rand(2, n, 1, 1, generator=g)
    grid = torch.arange(size) + 0.5
    dy, dx = (grid[:, None] - cy).abs(), (grid[None, :] - cx).abs()  # (n, size, size)
    square = torch.rand(n, 1, 1, generator=g) < 0.5
    inside = torch.where(square, torch.maximum(dx, dy) <= r, dx ** 2 + dy ** 2 <= r ** 2)
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[torch.arange(n), y] = inside.to(torch.uint8) * 255
    return torch.utils.data.TensorDataset(x, y), ['red', 'green', 'blue']

def load_data(c):  # the training set of (uint8 (3, S, S), label), its classes ([]: none)
    if c['dataset'] == 'shapes':
        return make_shapes(c['train_images'] or 3000, c['image_size'], c['seed'])
    return load_dataset(c, c['dataset'], n=c['train_images'])

# ---- train ----
def train(c, dev, rank, world):
    """Step s draws t, noise, flips and label drops for the global batch seeded by (seed, s), rank r
    taking rows r::world: any number of processes trains one model, --resume continues exactly."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds, classes = load_data(c)
    if not classes and c['cfg_given'] and c['cfg'] != 1:
        fail(f"{c['data_dir']} has no classes, so the model is unconditional; drop --cfg")
    B, S, per_epoch = c['batch_size'], c['image_size'], epoch_steps(ds, c, world)
    alphas_cumprod = torch.cumprod(1 - make_betas(c), 0).float().to(dev)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA's too
    model = make_model(c, len(classes)).to(dev, memory_format=layout)
    ema = make_model(c, len(classes)).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), c['lr'], weight_decay=0.0, fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step, fids = (ckpt['step'], ckpt['fid']) if ckpt else (0, [])
    if ckpt:
        load_state(ckpt, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    stop = min(total := c['epochs'] * per_epoch, c['max_steps'] or total)
    lr_at = lambda s: c['lr'] * min(1, (s + 1) / (c['warmup'] + 1))
    if rank == 0:
        print(f"data: {len(ds):,} images, {len(classes) or 'no'} classes | {c['schedule']}, T "
              f"{c['timesteps']}, abar_T {alphas_cumprod[-1]:.1e} | U-Net "
              f"{sum(p.numel() for p in model.parameters()):,} parameters | {dev}, {c['dtype']}, "
              f'{world} process(es) | {stop} of {total} steps of batch {B}')

    def evaluate(step):  # FID and IS of --fid samples of the EMA weights
        x = samples(ema.eval(), len(classes), c['fid'], c, c['seed'] + 1, dev)[0]
        fid, isc = fid_is(c, x, ds, dev)
        fids.append([step, fid])
        print(f'eval | epoch {step / per_epoch:.2f} | step {step} | fid {fid:.2f} | is '
              f"{isc:.2f} | {c['fid']} samples, cfg {c['cfg']}", flush=True)
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch, classes=classes, fid=fids)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, c['fid_every'] * per_epoch, opt, rank, world)
    with boundary, closing(batches(ds, c, dev, rank, world, step, stop, per_epoch)) as data:
        for x, y in data:
            # noise draw: t, noise, flips and label drops for the global batch; this rank's rows
            g.manual_seed(c['seed'] * 1_000_003 + step)
            t = torch.randint(0, c['timesteps'], (B,), generator=g, device=dev)[rank::world]
            noise = torch.randn((B, 3, S, S), generator=g, device=dev)[rank::world]
            mirror = (torch.rand(B, generator=g, device=dev) < 0.5)[rank::world] & c['flip']
            drop = torch.rand(B, generator=g, device=dev)[rank::world]
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + rank)  # dropout
            x0 = x.to(dev, non_blocking=True).float() / 127.5 - 1
            x0 = torch.where(mirror[:, None, None, None], x0.flip(3), x0)
            y = y.to(dev, non_blocking=True)
            y = drop_labels(y, len(classes), c['p_uncond'], drop) if classes else t * 0
            xt = q_sample(x0, alphas_cumprod[t].view(-1, 1, 1, 1), noise)
            # loss (eq. 14)
            with autocast(c, dev):
                eps = net(xt.contiguous(memory_format=layout), t, y)
                loss = (eps.float() - noise).square().mean()
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
            # boundary: log, FID, save and stop where due
            boundary.add(loss=loss)
            boundary(step, params, save, evaluate if c['fid'] else None)
    return ema.eval(), classes, boundary.curve, fids

def figures(c, model, num_classes, dev, curve, fids):
    """A class grid (a row a class), 4 slerps of 9 noises through DDIM, the loss and FID curves."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g, out = torch.Generator(dev).manual_seed(c['seed']), c['out_dir']
    k = min(num_classes, 10) or 10
    per = max(1, min(10, c['n_samples'] // k))
    labels = balanced_labels(per * k, num_classes).view(per, k).T.flatten()  # row i: class i
    x = sample_as_configured(model, num_classes, labels, c, g, dev)
    save_grid(x, os.path.join(out, 'samples.png'), per)
    z0, z1 = torch.randn(2, 4, 3, c['image_size'], c['image_size'], generator=g, device=dev)
    x_T = torch.stack([slerp(z0, z1, a) for a in torch.linspace(0, 1, 9, device=dev)], 1)
    y = balanced_labels(4, num_classes).repeat_interleave(9)  # a row a pair
    x = sample_as_configured(model, num_classes, y, c, g, dev, x_T.flatten(0, 1), method='ddim',
                             eta=0.0, steps=c['sample_steps'] or 50)
    save_grid(x, os.path.join(out, 'interpolation.png'), nrow=9)
    for name, points, label in (('loss.png', curve, 'loss'), ('fid.png', fids, 'FID')):
        if points:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(*zip(*points), marker='o' if name == 'fid.png' else None)
            ax.set(xlabel='step', ylabel=label, yscale='log')
            fig.tight_layout()
            write_whole(os.path.join(out, name), lambda tmp, fig=fig: fig.savefig(tmp, dpi=80))
            plt.close(fig)

def shapes_hit_rates(c, model, num_classes, dev, n=90):
    """The share of n samples whose brightest channel is the class asked, unguided and guided."""
    labels, g = balanced_labels(n, num_classes), torch.Generator(dev).manual_seed(c['seed'] + 2)
    hit = lambda s: sample_as_configured(model, num_classes, labels, c, g, dev, cfg=s).sum((2, 3))
    rates = {s: (hit(s).argmax(1) == labels).double().mean().item() for s in (0.0, c['cfg'])}
    print(f'eval | shapes: the requested class (brightest channel) in {n} samples | '
          + ' | '.join(f'cfg {s:g}: {r:.0%}' for s, r in rates.items()), flush=True)

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev, rank, world = setup(c)
    if c['sample_only']:
        ckpt = load_checkpoint(c)
        classes, model = ckpt['classes'], make_model(c, len(ckpt['classes'])).to(dev)
        if not classes and c['cfg_given'] and c['cfg'] != 1:
            fail('this checkpoint is unconditional (no classes); drop --cfg')
        model.load_state_dict(ckpt['ema'])
        x, y = samples(model.eval(), len(classes), c['n_samples'], c, c['seed'], dev)
        write_samples(c, x, **({'labels': y.numpy()} if classes else {}))
        if c['fid']:
            x = samples(model, len(classes), c['fid'], c, c['seed'] + 1, dev)[0]
            fid, isc = fid_is(c, x, load_data(c)[0], dev)
            print(f"eval | step {ckpt['step']} | fid {fid:.2f} | is {isc:.2f} | {c['fid']} "
                  f"samples, cfg {c['cfg']}")
    else:
        model, classes, curve, fids = train(c, dev, rank, world)
        if rank == 0:
            figures(c, model, len(classes), dev, curve, fids)
    if c['dataset'] == 'shapes' and rank == 0:
        shapes_hit_rates(c, model, len(classes), dev)
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


if __name__ == '__main__':
    main()
