"""
Class-conditional DDPM with classifier-free guidance on CIFAR-10 (or an image folder: FFHQ at 96).

DDPM (Ho et al. 2020, arXiv:2006.11239): the loss |eps - eps_theta(x_t, t, y)|^2 (eq. 14), the
linear schedule 1e-4 .. 0.02 over T = 1000 (or cosine, Nichol & Dhariwal eq. 17), the CIFAR-10 U-Net
(width 128, multipliers 1,2,2,2, two residual blocks a level, dropout 0.1, attention at 16x16:
35.75M parameters with the class embedding). Classifier-free guidance (Ho & Salimans 2022, eq. 6,
s = 1 + w): training swaps each label for a null class with probability p_uncond; sampling takes
eps_u + s (eps_c - eps_u). Samplers: ancestral (Algorithm 2) and DDIM (Song et al. 2020, eq. 12) on
a respaced subset of the steps; the interpolation figure slerps two x_T through DDIM. t = 0..T-1
stands for the papers' 1..T. --fid N scores N guided samples against the training set (FID and IS
by torch-fidelity); the literature at 50k samples: DDPM 3.17 (unconditional), EDM 1.79.

Run:
    python ddpm_cifar.py --epochs 600 --cfg 3.0                        # one GPU (bf16 autocast)
    torchrun --nproc_per_node=8 ddpm_cifar.py --epochs 600 --cfg 3.0   # DDP; --batch-size is global
    python ddpm_cifar.py --dataset folder --data-dir ffhq --image-size 96 --attn-res 24
    python ddpm_cifar.py --preset tiny --dataset shapes --image-size 16   # CPU: minutes (README)
    python ddpm_cifar.py --sample-only true --n-samples 50000 --fid 50000   # samples.npz, FID
    python ddpm_cifar.py --resume true                                 # continue exactly
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
weight_decay = 0.0            # AdamW's
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
                        timesteps=200, epochs=10, batch_size=32, lr=1e-3, warmup=20, ema=0.99,
                        workers=0, sample_steps=20, train_images=2000, log_every=10)}
ARCH = ('dataset', 'folder_classes', 'image_size', 'channels', 'channel_mults', 'res_blocks',
        'attn_res', 'schedule', 'timesteps', 'beta_start', 'beta_end')

def finish_config(c, given):
    c.update({k: v for k, v in PRESETS.get(c['preset'], {}).items() if k not in given})
    c['cfg_given'] = 'cfg' in given  # an unconditional model refuses an explicit --cfg
    return c

def check_config(c):
    """One line saying what is wrong and what would work, for flags a run cannot use."""
    mults, halvings = c['channel_mults'].split(','), 2 ** c['channel_mults'].count(',')
    refuse(c, [
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults),
         "--channel-mults takes positive integers like '1,2,2,2'"),
        (c['image_size'] < 8 or c['image_size'] % halvings,
         f"--image-size {c['image_size']}: the U-Net halves it, so a multiple of {halvings}"),
        (c['dataset'] == 'cifar10' and c['image_size'] != 32, 'CIFAR-10 is 32x32'),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')),
         "--attn-res takes resolutions like '16' or '16,8'"),
        (c['channels'] % 32 or c['channels'] <= 0, '--channels must be a positive multiple of 32'),
        (c['timesteps'] < 2 or not 0 < c['beta_start'] < c['beta_end'] < 1,
         'need --timesteps >= 2 and 0 < --beta-start < --beta-end < 1'),
        (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
         '--sample-steps needs --sampler ddim (DDPM runs all T steps)'),
        (not 0 <= c['sample_steps'] <= c['timesteps'], '--sample-steps must be 0..--timesteps'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every and --log-every must be >= 1'),
        (min(c['train_images'], c['max_steps'], c['warmup'], c['workers'], c['fid_every']) < 0,
         '--train-images, --max-steps, --warmup, --workers and --fid-every are counts'),
        (c['fid_every'] and not c['fid'], '--fid-every needs --fid N, the samples to score'),
        (c['fid'] < 0 or c['fid'] == 1, '--fid needs at least 2 samples'),
        (c['cfg'] < 0 or not 0 <= c['p_uncond'] < 1, 'need --cfg >= 0 and 0 <= --p-uncond < 1'),
        (c['cfg'] != 1 and c['p_uncond'] == 0, '--cfg other than 1 needs the null class: train '
         'with --p-uncond > 0'),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and 0 <= c['eta'] <= 1 and 0 <= c['dropout'] < 1
              and c['grad_clip'] >= 0), 'need --lr > 0, 0 <= --ema < 1, 0 <= --eta <= 1, '
         '0 <= --dropout < 1 and --grad-clip >= 0')])


# ---- schedule ----
def linear_betas(T, beta_start, beta_end):
    """Ho et al. sec. 4: beta_1 .. beta_T evenly spaced (float64, index t = 0..T-1)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)

def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), abar(t) = cos((t/T + s) / (1 + s) pi/2)^2 (N&D eq. 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)

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

def guided_eps(eps_cond, eps_uncond, s):
    """Classifier-free guidance (Ho & Salimans eq. 6, s = 1 + w): eps_u + s (eps_c - eps_u)."""
    return eps_uncond + s * (eps_cond - eps_uncond)

def drop_labels(y, null, p, u):
    """Each label replaced by the null class where its uniform draw u < p (per sample)."""
    return torch.where(u < p, torch.full_like(y, null), y)


# ---- model ----
def timestep_embedding(t, dim):
    """(B,) -> (B, dim) sin and cos of t at geometric frequencies 1 .. 1e-4 (Vaswani et al.)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)

def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)  # DDPM's 32 groups; fewer in the narrow tiny preset

def zero(layer):
    """The layer with its weights and bias zeroed: a residual branch that starts as the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer

class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; plus the time-and-class embedding; GroupNorm, SiLU, dropout, 3x3
    conv (zeroed); a 1x1 conv on the skip path when the width changes."""
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
    """eps_theta(x_t, t, y): the DDPM U-Net (Ho et al. appendix B) with a class embedding (rows
    0..num_classes, the last the null class) added to the time embedding. Per resolution, res_blocks
    ResBlocks down (attention after each where listed) then a stride-2 conv; the middle is ResBlock,
    attention, ResBlock; up, res_blocks + 1 ResBlocks, each fed the matching skip, then a 2x nearest
    upsampling and a 3x3 conv."""
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
            skip = isinstance(layers[0], ResBlock)
            h = run(layers, torch.cat([h, hs.pop()], 1) if skip else h, emb)
        return self.out(h)

def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h

def make_model(c, num_classes):
    """The network contract, for a forker who swaps in another: model(x_t, t, y) -> eps_hat, x_t
    (B, 3, S, S) in [-1, 1]-data units, t (B,) integer steps 0..T-1, y (B,) labels 0..num_classes,
    num_classes being the null label; eps_hat has x_t's shape. The loop also uses .parameters(),
    .state_dict() and .train()/.eval(), nothing else."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['image_size'],
                num_classes)


# ---- sampling ----
def slerp(z0, z1, a):
    """Spherical interpolation per sample (Shoemake 1985): the norm (about sqrt(D) for Gaussian
    noise) stays where the sampler expects it, unlike the linear mix's."""
    cos = (z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1))
    theta = cos.clamp(-1, 1).acos().view(-1, *[1] * (z0.dim() - 1))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

@torch.no_grad()
def sample(model, shape, betas, labels, null, cfg=1.0, steps=0, method='ddim', sigma='beta',
           eta=0.0, generator=None, device='cpu', x_T=None):
    """Reverse process from x_T ~ N(0, I) (or the given x_T), guided at scale cfg with the labels
    and the null label in one batched pass. 'ddpm': Algorithm 2 over all T steps, x_{t-1} = the
    posterior mean (eq. 7) at the predicted x0 (clipped to [-1, 1]) plus sigma_t z. 'ddim': eq. 12
    of Song et al. on `steps` evenly spaced timesteps (0 = all T), noise eta * eq. 16. The schedule
    stays float64, each step's coefficients Python floats. Returns x_0 in [-1, 1]."""
    alphas_cumprod, T = torch.cumprod(1 - betas.double(), 0).tolist(), len(betas)
    betas, labels = betas.tolist(), labels.to(device)
    nulls = torch.full_like(labels, null)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = range(T - 1, -1, -1) if method == 'ddpm' else torch.linspace(T - 1, 0, steps or T).round()
    ts = [int(t) for t in ts]
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
    """uint8 images (n, 3, S, S) for these labels with the config's sampler, steps and guidance
    (an unconditional model has only the null label), or those in override."""
    how = dict(cfg=c['cfg'] if num_classes else 1.0, steps=c['sample_steps'], method=c['sampler'],
               sigma=c['sigma'], eta=c['eta'])
    shape = (len(labels), 3, c['image_size'], c['image_size'])
    return to_uint8(sample(model, shape, make_betas(c), labels, num_classes, **(how | override),
                           generator=generator, device=dev, x_T=x_T))

def balanced_labels(n, num_classes):
    return torch.arange(n) % num_classes if num_classes else torch.zeros(n, dtype=torch.long)

def samples(model, num_classes, n, c, seed, dev):
    """n samples from a generator seeded by seed, labels cycling through the classes, 500 at a
    time: (uint8 images, labels)."""
    y, g = balanced_labels(n, num_classes), torch.Generator(dev).manual_seed(seed)
    return torch.cat([sample_as_configured(model, num_classes, part, c, g, dev)
                      for part in y.split(500)]), y


# ---- data ----
def make_shapes(n, size, seed):
    """n images of one square or disc on black, red, green or blue by class: a generated 3-class
    set on which a CPU shows in minutes that guidance steers (a sample's class: its brightest
    channel)."""
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

def load_data(c):
    """The training set of (uint8 (3, S, S), label) and its class names ([] = unconditional)."""
    if c['dataset'] == 'shapes':
        return make_shapes(c['train_images'] or 3000, c['image_size'], c['seed'])
    return load_dataset(c, c['dataset'], n=c['train_images'])


# ---- train ----
def train(c, dev, rank, world):
    """Step s draws t, noise, flips and label drops for the whole global batch on the device from
    a generator seeded by (seed, s), and rank r takes rows r, r + world, ..., as it does of the
    data: any number of processes trains the same model as one, and --resume continues exactly
    without saving RNG state."""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds, classes = load_data(c)
    if not classes and c['cfg_given'] and c['cfg'] != 1:
        fail(f"{c['data_dir']} has no classes, so the model is unconditional; drop --cfg")
    if ckpt and ckpt['classes'] != classes:
        fail(f"the checkpoint has {len(ckpt['classes'])} classes, the data {len(classes)}")
    B, S, per_epoch = c['batch_size'], c['image_size'], epoch_steps(ds, c, world)
    if rank == 0:
        write_run_files(c)
    alphas_cumprod = torch.cumprod(1 - make_betas(c), 0).float().to(dev)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA's too
    model = make_model(c, len(classes)).to(dev, memory_format=layout)
    ema = make_model(c, len(classes)).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), c['lr'], weight_decay=c['weight_decay'],
                            fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step, fids = (ckpt['step'], ckpt['fid']) if ckpt else (0, [])
    if ckpt:
        load_state(ckpt, dev, model=model, ema=ema, optimizer=opt, scaler=scaler)
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, [dev.index] if dev.type == 'cuda' else None)
    total = c['epochs'] * per_epoch
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: c['lr'] * min(1, (s + 1) / (c['warmup'] + 1))
    if rank == 0:
        print(f"data: {len(ds):,} images, {len(classes) or 'no'} classes | {c['schedule']} "
              f"schedule, T {c['timesteps']} | U-Net {sum(p.numel() for p in model.parameters()):,}"
              f" parameters | {dev}, {c['dtype']}, {world} process(es) | {stop} of {total} steps "
              f'of batch {B}' + (f' | resumed at step {step}' if step else ''))

    def evaluate(step):  # FID and IS of --fid samples of the EMA weights
        if c['fid']:
            x = samples(ema.eval(), len(classes), c['fid'], c, c['seed'] + 1, dev)[0]
            fid, isc = fid_is(c, x, ds, dev)
            fids.append([step, fid])
            print(f'eval | epoch {step / per_epoch:.2f} | step {step} | fid {fid:.2f} | is '
                  f"{isc:.2f} | {c['fid']} samples, cfg {c['cfg']}", flush=True)
    save = lambda step: save_checkpoint(c, step, model=model, ema=ema, optimizer=opt, scaler=scaler,
                                        epoch=step // per_epoch, classes=classes, fid=fids)
    g, params, ema_params = torch.Generator(dev), list(model.parameters()), list(ema.parameters())
    boundary = Boundary(c, step, stop, c['fid_every'] * per_epoch, opt, [scaler], rank, world)
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
            boundary(step, params, save, evaluate)
    return ema.eval(), classes, boundary.curve, fids

def figures(c, model, num_classes, dev, curve, fids):
    """A class grid (a row per class, or 10x10 unconditional), 4 slerp interpolations of 9 points
    between two noises through deterministic DDIM, the loss curve and the FID curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g, out = torch.Generator(dev).manual_seed(c['seed']), c['out_dir']
    k = min(num_classes, 10) or 10
    per = max(1, min(10, c['n_samples'] // k))
    labels = balanced_labels(per * k, num_classes).view(per, k).T.flatten()  # row i: class i
    x = sample_as_configured(model, num_classes, labels, c, g, dev)
    save_grid(x, os.path.join(out, 'samples.png'), per)
    z0, z1 = (torch.randn(4, 3, c['image_size'], c['image_size'], generator=g, device=dev)
              for _ in 'ab')
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
    """--dataset shapes: the share of n samples (labels balanced) whose brightest channel is the
    class asked for, unguided (s = 0: chance, 1/3) and at the config's guidance scale."""
    labels, g = balanced_labels(n, num_classes), torch.Generator(dev).manual_seed(c['seed'] + 2)
    hit = lambda s: sample_as_configured(model, num_classes, labels, c, g, dev, cfg=s).sum((2, 3))
    rates = {s: (hit(s).argmax(1) == labels).double().mean().item() for s in (0.0, c['cfg'])}
    print(f'eval | shapes: the requested class (brightest channel) in {n} samples | '
          + ' | '.join(f'cfg {s:g}: {r:.0%}' for s, r in rates.items()), flush=True)

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev, rank, world = setup(c)
    with after_training(c):
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


if __name__ == '__main__':
    main()
