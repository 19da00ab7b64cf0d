"""
Class-conditional DDPM with classifier-free guidance on CIFAR-10 (or an image folder: FFHQ at 96, LSUN at 64).

DDPM (Ho et al. 2020, arXiv:2006.11239): the loss |eps - eps_theta(x_t, t, y)|^2 (eq. 14), the linear schedule
1e-4 .. 0.02 over T = 1000 (or cosine, Nichol & Dhariwal eq. 17), the CIFAR-10 U-Net (width 128, multipliers 1,2,2,2,
two residual blocks per level, dropout 0.1, attention at 16x16; 35.75M parameters with the class embedding).
Classifier-free guidance (Ho & Salimans 2022, eq. 6 with s = 1 + w): training replaces each label by a null class
with probability p_uncond; sampling takes eps_u + s (eps_c - eps_u), s = 1 conditional, s = 0 unconditional.
Samplers: ancestral (Algorithm 2) and DDIM (Song et al. 2020, eq. 12) on a respaced subset of the steps; the
interpolation figure slerps two x_T through deterministic DDIM. lr 2e-4 after a warm-up (the seed's 1e-3 diverges).
Index t = 0..T-1 stands for the papers' 1..T; abar_t is alphas_cumprod[t]. --fid N scores N guided samples (FID and
Inception Score against the training set's cached statistics) with torch-fidelity's TF-Inception (pip install
torch-fidelity); --fid-every E repeats it every E epochs. Literature (50k samples): DDPM 3.17 unconditional, EDM 1.79.

Run:
    python ddpm_cifar.py --epochs 600 --cfg 3.0                        # one GPU (bf16 autocast)
    torchrun --nproc_per_node=8 ddpm_cifar.py --epochs 600 --cfg 3.0   # DDP; --batch-size is global
    python ddpm_cifar.py --dataset folder --data-dir ffhq --image-size 96 --attn-res 24 --channel-mults 1,2,2,2
    python ddpm_cifar.py --preset tiny --dataset shapes --image-size 16   # CPU: 3 generated classes, minutes (README)
    python ddpm_cifar.py --sample-only true --n-samples 50000 --fid 50000   # samples.npz (uint8 NHWC, labels), FID
    python ddpm_cifar.py --resume true                                 # continue exactly; Ctrl-C and SIGTERM save
"""
import argparse
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
dataset = 'cifar10'           # 'cifar10' | 'folder' | 'shapes': a folder (sub-folders = classes); 3 generated classes
data_dir = './data'           # torchvision's CIFAR-10 root (cifar-10-batches-py/...), or the image folder
image_size = 32               # folder images are centre-cropped and resized to this; CIFAR-10 is 32
out_dir = 'out/ddpm_cifar'    # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'default'            # 'default' | 'tiny': 'tiny' sets TINY_PRESET's values for the flags not given
channels = 128                # U-Net base width, a multiple of 32
channel_mults = '1,2,2,2'     # width multiplier per resolution, from image_size down, halving
res_blocks = 2                # residual blocks per resolution on the way down (one more on the way up)
attn_res = '16'               # resolutions with self-attention ('' = none; the middle always has it)
dropout = 0.1                 # in the residual blocks
schedule = 'linear'           # 'linear' | 'cosine'
timesteps = 1000              # T
beta_start = 1e-4             # beta_1 of 'linear'
beta_end = 0.02               # beta_T of 'linear'
p_uncond = 0.1                # probability that a training label is replaced by the null class
cfg = 3.0                     # guidance scale s: eps_u + s (eps_c - eps_u); 1 = conditional, 0 = unconditional
epochs = 600                  # passes over the training images
batch_size = 128              # global, split across DDP ranks
lr = 2e-4                     # peak AdamW learning rate, after a linear warm-up, then constant (as DDPM)
warmup = 5000                 # warm-up steps
weight_decay = 0.0            # AdamW's
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.9999                  # decay of the weight average that is sampled from
flip = True                   # random horizontal flips of the training images
train_images = 0              # 0 = all; fewer for quick runs
workers = 4                   # DataLoader processes decoding a --dataset folder; 0 = in the main process
sampler = 'ddim'              # 'ddim' | 'ddpm'
sample_steps = 50             # reverse steps; 0 = T (DDPM runs all T)
eta = 0.0                     # DDIM noise: 0 = deterministic, 1 = DDPM-like
sigma = 'beta'                # 'beta' | 'beta_tilde': variance of the DDPM step
n_samples = 100               # samples written by --sample-only (labels cycling through the classes); the grid's
fid = 0                       # samples scored by FID and IS at the end (and with --sample-only); 0 = off
fid_every = 0                 # epochs between FIDs during training (of --fid samples); 0 = only at the end
fid_stats = ''                # the training set's cached Inception statistics (.npz); '' = in out_dir
fid_weights = ''              # torch-fidelity's Inception weights (.pth) for offline use; '' = download once
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
dtype = 'auto'                # 'auto' | 'float32' | 'bfloat16' | 'float16': autocast; auto = bfloat16 on CUDA
compile = False               # torch.compile the training model
resume = False                # continue from out_dir/ckpt.pt
overwrite = False             # start over in an out_dir that holds a checkpoint (replaced at the first save)
sample_only = False           # load out_dir/ckpt.pt (EMA weights) and write n_samples to samples.npz
max_steps = 0                 # stop after this many steps (the lr schedule keeps its full length); 0 = all
save_every = 1000             # steps between checkpoints
log_every = 100               # steps between progress lines; each checks the loss is finite
seed = 0                      # data order, noise and initial weights

TINY_PRESET = dict(channels=32, channel_mults='1,2', res_blocks=1, attn_res='', dropout=0.0, timesteps=200,
                   epochs=10, batch_size=32, lr=1e-3, warmup=20, ema=0.99, workers=0, sample_steps=20,
                   train_images=2000, log_every=10)
ARCH = ('dataset', 'image_size', 'channels', 'channel_mults', 'res_blocks', 'attn_res', 'schedule', 'timesteps',
        'beta_start', 'beta_end')


def get_config(argv=None):
    """Every lowercase constant from the config banner to the next banner becomes --dashed-name with the
    default's type (blank lines and comment paragraphs may sit among them); a dict. --preset tiny then sets
    TINY_PRESET's values for the flags not given on the command line."""
    def parse_bool(s):
        if s.lower() in ('true', '1', 'false', '0'):
            return s.lower() in ('true', '1')
        raise argparse.ArgumentTypeError(f"expected true/false/1/0, got '{s}'")
    block = open(__file__).read().split('# ---- config ----\n')[1].split('\n# ----')[0]  # to the next banner
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    for name, comment in re.findall(r'^([a-z_][a-z0-9_]*) *=.*?(?:# *(.*))?$', block, re.M):
        default = globals()[name]
        listed = re.match(r"'[^']*'(?: *\| *'[^']*')+", comment)  # a leading 'a' | 'b' list gives the choices
        ap.add_argument('--' + name.replace('_', '-'), default=default,
                        choices=re.findall(r"'([^']*)'", listed[0]) if listed else None,
                        type=parse_bool if isinstance(default, bool) else type(default),
                        help=f'{comment} [{default!r}]'.replace('%', '%%'))
    c = vars(ap.parse_args(argv))
    argv = sys.argv[1:] if argv is None else argv
    given = {a[2:].split('=')[0].replace('-', '_') for a in argv if a.startswith('--')}
    if c['preset'] == 'tiny':
        c.update({k: v for k, v in TINY_PRESET.items() if k not in given})
    c['cfg_given'] = 'cfg' in given  # an unconditional model refuses an explicit --cfg, ignores the default
    return c


def check_config(c):
    """One line saying what is wrong and what would work, for flags argparse accepts but a run can't use."""
    mults = c['channel_mults'].split(',')
    down = 2 ** (len(mults) - 1)
    problems = [
        *[(not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number, not {v}") for k, v in c.items()
          if isinstance(v, float)],  # nan passes every comparison below
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults),
         "--channel-mults takes positive integers like '1,2,2,2'"),
        (c['image_size'] < 8 or c['image_size'] % down,
         f"--image-size {c['image_size']}: the U-Net halves it {len(mults) - 1} times, so a multiple of {down}"),
        (c['dataset'] == 'cifar10' and c['image_size'] != 32, 'CIFAR-10 is 32x32: drop --image-size or use a folder'),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')),
         "--attn-res takes resolutions like '16' or '16,8'"),
        (c['channels'] % 32 != 0 or c['channels'] <= 0, '--channels must be a positive multiple of 32 (GroupNorm)'),
        (c['timesteps'] < 2, '--timesteps must be at least 2'),
        (not 0 < c['beta_start'] < c['beta_end'] < 1, '--beta-start and --beta-end need 0 < start < end < 1'),
        (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
         '--sample-steps needs --sampler ddim (DDPM runs all T steps); use --sample-steps 0 with ddpm'),
        (not 0 <= c['sample_steps'] <= c['timesteps'], f"--sample-steps must be 0..{c['timesteps']} (the timesteps)"),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every and --log-every must be at least 1'),
        (min(c['train_images'], c['max_steps'], c['warmup'], c['workers'], c['fid'], c['fid_every']) < 0,
         '--train-images, --max-steps, --warmup, --workers, --fid and --fid-every are counts, 0 = default/off'),
        (c['fid_every'] and not c['fid'], '--fid-every needs --fid N, the number of samples to score'),
        (0 < c['fid'] < 2, '--fid needs at least 2 samples for a covariance'),
        (not 0 <= c['p_uncond'] < 1, '--p-uncond is a probability below 1'),
        (c['cfg'] < 0, '--cfg must be >= 0 (0 unconditional, 1 conditional, > 1 guided)'),
        (c['cfg'] != 1 and c['p_uncond'] == 0, '--cfg other than 1 needs the null class: train with --p-uncond > 0'),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and 0 <= c['eta'] <= 1 and 0 <= c['dropout'] < 1
              and c['grad_clip'] >= 0), 'need --lr > 0, 0 <= --ema < 1, 0 <= --eta <= 1, 0 <= --dropout < 1, '
                                        '--grad-clip >= 0'),
        (c['resume'] + c['sample_only'] + c['overwrite'] > 1, '--resume, --sample-only, --overwrite: pick one'),
    ]
    for bad, why in problems:
        if bad:
            raise SystemExit(f'ddpm_cifar.py: {why}')

# ---- schedule ----
def linear_betas(T, beta_start, beta_end):
    """Ho et al. sec. 4: beta_1 .. beta_T evenly spaced (float64, index t = 0..T-1)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), abar(t) = cos((t/T + s) / (1 + s) pi/2)^2 (Nichol & Dhariwal 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_betas(c):
    if c['schedule'] == 'cosine':
        return cosine_betas(c['timesteps'])
    return linear_betas(c['timesteps'], c['beta_start'], c['beta_end'])


def q_sample(x0, alphas_cumprod_t, noise):
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps ~ q(x_t | x0) (eq. 4); alphas_cumprod_t broadcasts."""
    return alphas_cumprod_t.sqrt() * x0 + (1 - alphas_cumprod_t).sqrt() * noise


def q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod):
    """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, beta_tilde_t) (eqs. 6-7), t a python int; abar_{-1} = 1."""
    alphas_cumprod_prev = alphas_cumprod[t - 1] if t > 0 else torch.ones((), dtype=alphas_cumprod.dtype)
    c0 = alphas_cumprod_prev.sqrt() * betas[t] / (1 - alphas_cumprod[t])
    ct = (1 - betas[t]).sqrt() * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod[t])
    return c0 * x0 + ct * xt, (1 - alphas_cumprod_prev) / (1 - alphas_cumprod[t]) * betas[t]


def guided_eps(eps_cond, eps_uncond, s):
    """Classifier-free guidance (Ho & Salimans eq. 6, s = 1 + w): eps_u + s (eps_c - eps_u)."""
    return eps_uncond + s * (eps_cond - eps_uncond)


def drop_labels(y, null, p, u):
    """Each label replaced by the null class where its uniform draw u < p (per sample, not per batch)."""
    return torch.where(u < p, torch.full_like(y, null), y)


# ---- model ----
def timestep_embedding(t, dim):
    """(B,) -> (B, dim) sin and cos of t at geometric frequencies 1 .. 1e-4 (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)


def norm(ch):
    return nn.GroupNorm(min(32, ch // 4), ch)  # 32 groups as DDPM, fewer for the narrow tiny preset


def zero(layer):
    """The layer with its weights and bias zeroed: a residual branch that starts as the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; plus the time-and-class embedding; GroupNorm, SiLU, dropout, 3x3 conv
    (zeroed); a 1x1 conv on the skip path when the width changes."""
    def __init__(self, cin, cout, tdim, dropout):
        super().__init__()
        self.norm1, self.conv1, self.temb = norm(cin), nn.Conv2d(cin, cout, 3, padding=1), nn.Linear(tdim, cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, residual, its output projection zeroed."""
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
    """eps_theta(x_t, t, y): the DDPM U-Net (Ho et al. appendix B) with a class embedding (num_classes + 1
    rows, the last the null class) added to the time embedding. Per resolution, res_blocks ResBlocks on the
    way down (attention after each where listed) then a stride-2 conv; the middle is ResBlock, attention,
    ResBlock; on the way up res_blocks + 1 ResBlocks, each fed the matching skip."""
    def __init__(self, channels=128, mults=(1, 2, 2, 2), res_blocks=2, attn_res=(16,), dropout=0.1, image_size=32,
                 num_classes=10):
        super().__init__()
        tdim, res, self.channels = 4 * channels, image_size, channels
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label = nn.Embedding(num_classes + 1, tdim)
        self.inp = nn.Conv2d(3, channels, 3, padding=1)
        block = lambda cin, cout: [ResBlock(cin, cout, tdim, dropout)] + ([Attention(cout)] if res in attn_res else [])
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for i, m in enumerate(mults):
            for _ in range(res_blocks):
                self.down.append(nn.ModuleList(block(ch, channels * m)))
                ch = channels * m
                skips.append(ch)
            if i < len(mults) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, tdim, dropout), Attention(ch), ResBlock(ch, ch, tdim, dropout)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(mults))):
            for _ in range(res_blocks + 1):
                self.up.append(nn.ModuleList(block(ch + skips.pop(), channels * m)))
                ch = channels * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2), nn.Conv2d(ch, ch, 3, padding=1)]))
                res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, 3, 3, padding=1)))

    def forward(self, x, t, y):  # x (B, 3, H, W), t (B,), y (B,) in 0..num_classes (the last: null) -> (B, 3, H, W)
        emb = self.temb(timestep_embedding(t, self.channels)) + self.label(y)
        hs = [self.inp(x)]
        for layers in self.down:
            hs.append(run(layers, hs[-1], emb))
        h = run(self.mid, hs[-1], emb)
        for layers in self.up:
            h = run(layers, torch.cat([h, hs.pop()], 1) if isinstance(layers[0], ResBlock) else h, emb)
        return self.out(h)


def run(layers, h, emb):
    for layer in layers:
        h = layer(h, emb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h


def make_model(c, num_classes):
    """The network contract, for a forker who swaps in another: model(x_t, t, y) -> eps_hat, with x_t (B, 3,
    S, S) in [-1, 1]-data units, t (B,) integer steps 0..T-1 and y (B,) labels 0..num_classes, where
    num_classes is the null label (unconditional); eps_hat has x_t's shape and is the predicted noise (the
    loss is eq. 14 and the samplers read eps). The loop also uses .parameters(), .state_dict() and
    .train()/.eval(), nothing else: the number of classes travels as an argument, not as an attribute of the
    model."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['image_size'], num_classes)


# ---- sampling ----
def slerp(z0, z1, a):
    """Spherical interpolation per sample (Shoemake 1985): the angle between z0 and z1 swept at rate a, so the
    norm (about sqrt(D) for Gaussian noise) stays where the sampler expects it, unlike the linear mix."""
    cos = (z0 * z1).flatten(1).sum(1) / (z0.flatten(1).norm(dim=1) * z1.flatten(1).norm(dim=1))
    theta = cos.clamp(-1, 1).acos().view(-1, *[1] * (z0.dim() - 1))
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def sample(model, shape, betas, labels, null, cfg=1.0, steps=0, method='ddim', sigma='beta', eta=0.0,
           generator=None, device='cpu', x_T=None):
    """Reverse process from x_T ~ N(0, I) (or the given x_T), guided at scale cfg with the condition and the
    null label (an integer: the number of classes) in one batched forward pass. 'ddpm': Algorithm 2 over all T
    steps, x_{t-1} = the posterior mean (eq. 7) at the predicted x0 (clipped to [-1, 1]) plus sigma_t z.
    'ddim': eq. 12 of Song et al. on `steps` evenly spaced timesteps (0 = all T), noise eta * eq. 16. Returns
    x_0 in [-1, 1]."""
    alphas_cumprod = torch.cumprod(1 - betas.double(), 0).float().to(device)
    T, labels = len(betas), labels.to(device)
    nulls = torch.full_like(labels, null)
    x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T.to(device)
    ts = range(T - 1, -1, -1) if method == 'ddpm' else torch.linspace(T - 1, 0, steps or T).round().long().tolist()
    ts = list(ts)
    for i, t in enumerate(ts):
        tt = torch.full(shape[:1], t, device=device, dtype=torch.long)
        if cfg == 1 or cfg == 0:  # one pass: the label, or the null label
            eps = model(x, tt, labels if cfg == 1 else nulls).float()
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, nulls])).float()
            eps = guided_eps(*both.chunk(2), cfg)
        a = alphas_cumprod[t]
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)  # eq. 4 inverted, clipped
        if method == 'ddpm':
            mean, var = q_posterior_mean_var(x0, x, t, betas.float().to(device), alphas_cumprod)
            var = betas[t].float() if sigma == 'beta' and t > 0 else var
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, device=device) if t > 0 else mean
        else:
            a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the eps that agrees with the clipped x0
            s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # eq. 16
            z = torch.randn(shape, generator=generator, device=device) if eta else 0
            x = a_prev.sqrt() * x0 + (1 - a_prev - s ** 2).sqrt() * eps + s * z
    return x.clamp(-1, 1)


def sample_as_configured(model, num_classes, labels, c, betas, generator, dev, x_T=None, **override):
    """Images (n, 3, S, S) in [-1, 1] on the CPU for these labels, with the config's sampler, steps and
    guidance (an unconditional model has only the null label), or those in override (cfg=0, method='ddim')."""
    how = dict(cfg=c['cfg'] if num_classes else 1.0, steps=c['sample_steps'], method=c['sampler'], sigma=c['sigma'],
               eta=c['eta'])
    shape = (len(labels), 3, c['image_size'], c['image_size'])
    return sample(model, shape, betas, labels, num_classes, **(how | override), generator=generator, device=dev,
                  x_T=x_T).cpu()


def balanced_labels(n, num_classes):
    return torch.arange(n) % num_classes if num_classes else torch.zeros(n, dtype=torch.long)


def to_uint8(x):
    """[-1, 1] (N, 3, H, W) -> uint8 (N, H, W, 3)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(x, path, nrow):
    """(N, 3, S, S) in [-1, 1] -> one PNG, nrow images per row, 1-pixel white gaps."""
    from torchvision.utils import save_image
    write_whole(path, lambda tmp: save_image((x + 1) / 2, tmp, nrow=nrow, padding=1, pad_value=1))


# ---- evaluation ----
def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) (Heusel et al. 2017); tr (C1 C2)^(1/2) is the trace of
    the root of the symmetric C1^(1/2) C2 C1^(1/2), so two symmetric eigendecompositions give it (float64)."""
    mu1, cov1, mu2, cov2 = (torch.as_tensor(a, dtype=torch.float64) for a in (mu1, cov1, mu2, cov2))
    w, v = torch.linalg.eigh(cov1)
    root1 = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) per split of the samples (Salimans et al. 2016): mean, std over splits."""
    scores = []
    for part in logits.double().chunk(splits):
        logp = part.log_softmax(1)
        scores.append((logp.exp() * (logp - logp.exp().mean(0).log())).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def make_inception(c, dev):
    """uint8 (B, 3, H, W) -> (pool features (B, 2048), logits (B, 1008)) of the TF-Inception used by FID, via
    torch-fidelity; its absence or an unreachable weights file stops the run here, before any training."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048', 'logits_unbiased'],
                                          feature_extractor_weights_path=c['fid_weights'] or None).to(dev)
    except Exception as e:
        raise SystemExit(f'ddpm_cifar.py: --fid needs torch-fidelity and its Inception weights ({type(e).__name__}: '
                         f'{str(e)[:120]}); pip install torch-fidelity, and offline pass --fid-weights '
                         'weights-inception-2015-12-05-6726825d.pth; or run without --fid') from None
    return lambda x: net(x.to(dev))


@torch.no_grad()
def features(extract, images, batch=250):
    """(features float64 (N, D), logits (N, K)) of uint8 images (N, 3, H, W) in batches."""
    outs = [extract(b) for b in images.split(batch)]
    return torch.cat([o[0] for o in outs]).double().cpu(), torch.cat([o[1] for o in outs]).double().cpu()


def reference_stats(c, extract, ds):
    """The training set's feature mean and covariance, computed once (unflipped images), cached in a file."""
    path = c['fid_stats'] or os.path.join(c['out_dir'], f"fid_stats_{c['dataset']}_{c['image_size']}px_{len(ds)}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return torch.from_numpy(f['mu']), torch.from_numpy(f['cov'])
    f = features(extract, torch.stack([ds[i][0] for i in range(len(ds))]))[0]
    mu, cov = f.mean(0), torch.cov(f.T)
    write_whole(path, lambda tmp: np.savez(tmp, mu=mu.numpy(), cov=cov.numpy(), n=len(f)))
    return mu, cov


def fid_and_is(c, model, num_classes, betas, extract, stats, dev):
    """FID of c['fid'] guided samples (labels cycling through the classes) to the reference stats, and IS."""
    g, n, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), c['fid'], time.time()
    imgs = torch.cat([sample_as_configured(model, num_classes, y, c, betas, g, dev)
                      for y in balanced_labels(n, num_classes).split(500)])
    f, logits = features(extract, torch.from_numpy(to_uint8(imgs)).permute(0, 3, 1, 2))  # scored as saved: uint8
    return frechet_distance(f.mean(0), torch.cov(f.T), *stats), inception_score(logits)[0], time.time() - t0


def shapes_hit_rates(c, model, num_classes, betas, dev, n=90):
    """For --dataset shapes: the share of n samples (labels balanced) whose brightest channel is the requested
    class, unguided (s = 0, where chance is 1/3) and at the config's guidance scale."""
    labels, g = balanced_labels(n, num_classes), torch.Generator(dev).manual_seed(c['seed'] + 2)
    hit = lambda s: sample_as_configured(model, num_classes, labels, c, betas, g, dev, cfg=s).sum((2, 3)).argmax(1)
    rates = {s: (hit(s) == labels).double().mean().item() for s in (0.0, c['cfg'])}
    print(f"eval | shapes: the requested class (brightest channel) in {n} samples | "
          + ' | '.join(f'cfg {s:g}: {r:.0%}' for s, r in rates.items()), flush=True)
    return rates


# ---- data ----
def open_rgb(path):
    """An image file as 8-bit RGB; 16-bit grey (PIL's I;16 modes) scaled by 1/257 first, since convert('RGB')
    clips it (such images came out white)."""
    from PIL import Image
    img = Image.open(path)
    if img.mode.startswith('I;16'):
        img = Image.fromarray((np.asarray(img, np.float64) / 257).round().astype(np.uint8))
    return img.convert('RGB')


class FolderImages(torch.utils.data.Dataset):
    """Images under root, centre-cropped and resized to size: sub-folders are the classes (sorted names), or
    with none the images in root itself, unconditional. Items are (uint8 (3, size, size), label)."""
    EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

    def __init__(self, root, size):
        images = lambda d: sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(self.EXTS))
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = [d for d in subdirs if images(os.path.join(root, d))]
        self.items = ([(p, i) for i, d in enumerate(self.classes) for p in images(os.path.join(root, d))]
                      or [(p, 0) for p in images(root)])
        self.size = size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image, ImageOps
        path, label = self.items[i]
        try:
            img = ImageOps.fit(open_rgb(path), (self.size, self.size), Image.BICUBIC)
        except Exception as e:  # a truncated or corrupt file, found when its batch comes up
            raise BadImage(f'{path} cannot be decoded ({type(e).__name__}: {str(e)[:80]})') from None
        return torch.from_numpy(np.array(img)).permute(2, 0, 1), label


class BadImage(Exception):
    pass


def make_shapes(n, size, seed):
    """n images of one square or disc on black, red, green or blue by class: a generated 3-class set on which
    a CPU can show in minutes that guidance steers (the class of a sample is its brightest channel)."""
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
    """The training set (its first --train-images) as a Dataset of (uint8 (3, S, S), label) and its class
    names ([] = unconditional)."""
    root, n = os.path.abspath(c['data_dir']), c['train_images'] or None
    if c['dataset'] == 'shapes':
        return make_shapes(c['train_images'] or 3000, c['image_size'], c['seed'])
    if c['dataset'] == 'folder':
        ds = FolderImages(root, c['image_size']) if os.path.isdir(root) else None
        if not ds:
            raise SystemExit(f'ddpm_cifar.py: no images ({", ".join(FolderImages.EXTS)}) in {root} or its '
                             'sub-folders; pass --data-dir, with one sub-folder per class for a conditional model')
        ds.items = ds.items[:n]
        from PIL import Image
        for path, _ in ds.items:  # headers before training (0.02 ms a file here); pixels when their batch comes up
            try:
                Image.open(path).close()
            except Exception as e:
                raise SystemExit(f'ddpm_cifar.py: {path} is not an image ({type(e).__name__}); remove it or fix it '
                                 'and run again') from None
        return ds, ds.classes
    from torchvision.datasets import CIFAR10
    try:
        cifar = CIFAR10(root, train=True, download=True)
    except Exception as e:  # no network, or a damaged file
        raise SystemExit(f'ddpm_cifar.py: no CIFAR-10 under {os.path.join(root, "cifar-10-batches-py")} and the '
                         f'download failed ({type(e).__name__}); place the extracted cifar-10-python.tar.gz there '
                         '(data_batch_1..5, test_batch, batches.meta), or pass --data-dir') from None
    x = torch.from_numpy(cifar.data[:n]).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return torch.utils.data.TensorDataset(x, torch.tensor(cifar.targets[:n])), cifar.classes


# ---- train ----
def pick_device(name, local_rank=0):
    """'auto' is cuda, then mps, then cpu; any other name must parse and be present. Under torchrun each
    process takes the GPU of its LOCAL_RANK, and more processes than GPUs stop here, in every process, with
    the same line."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"ddpm_cifar.py: --device '{name}' is not a torch device; try cpu, cuda or auto") from None
    if not {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(dev.type, lambda: True)():
        raise SystemExit(f'ddpm_cifar.py: --device {name} is not available on this machine; try --device auto')
    gpus = torch.cuda.device_count() if dev.type == 'cuda' else 0
    if dev.type == 'cuda' and dev.index is None:
        procs = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if procs > gpus:
            raise SystemExit(f'ddpm_cifar.py: torchrun started {procs} processes on a machine with {gpus} GPU(s); '
                             f'use --nproc_per_node={gpus} (one process per GPU), or --device cpu')
        dev = torch.device('cuda', local_rank)
    if dev.type == 'cuda' and dev.index >= gpus:
        raise SystemExit(f'ddpm_cifar.py: --device {name}: this machine has {gpus} GPU(s), cuda:0 to cuda:{gpus - 1}')
    return dev


def peak_memory_gb(dev):
    """Peak CUDA memory allocated, or elsewhere the peak resident set (ru_maxrss: KiB on Linux)."""
    if dev.type == 'cuda':
        return torch.cuda.max_memory_allocated(dev) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** (30 if sys.platform == 'darwin' else 20)


def load_checkpoint(path, c):
    """The checkpoint at path, checked to come from this script with the same architecture and schedule."""
    if not os.path.exists(path):
        raise SystemExit(f'ddpm_cifar.py: no checkpoint at {path}; train first, or point --out-dir at the run')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'ddpm_cifar.py: {path} is not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('script') != 'ddpm_cifar.py':
        script = ckpt.get('script') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f'ddpm_cifar.py: {path} was not written by ddpm_cifar.py (script: {script})')
    differ = [f"{k} {ckpt['config'][k]!r} (flag {c[k]!r})" for k in ARCH if ckpt['config'][k] != c[k]]
    if differ:
        raise SystemExit(f"ddpm_cifar.py: {path} has a different model: {', '.join(differ)}; pass the checkpoint's "
                         'values')
    return ckpt


def save_checkpoint(path, model, ema, opt, scaler, step, c, classes, fids):
    """Written whole to a temporary file, then renamed over the last one: a kill mid-save keeps that one."""
    write_whole(path, lambda tmp: torch.save({
        'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': opt.state_dict(),
        'scaler': scaler.state_dict(), 'step': step, 'config': c, 'classes': classes, 'fid': fids,
        'script': 'ddpm_cifar.py'}, tmp))


def write_whole(path, write):
    """write(tmp), then tmp renamed over path (tmp keeps path's extension: savez, savefig and PIL read it). If
    writing fails (a full disk, a read-only folder), tmp is removed, the file at path kept, and the run stops
    with one line saying why and how much space is free."""
    tmp = '.tmp'.join(os.path.splitext(path))
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        raise SystemExit(f'ddpm_cifar.py: could not write {path} ({str(e)[:100]}; {size / 2**20:.0f} MB '
                         f'written before it failed, {free / 2**20:.0f} MB free); the file there before is kept'
                         ) from None


def last_checkpoint(path):
    """What a stopped run leaves: the step of the checkpoint at path, which holds only finite numbers (every
    save checks the weights), or that none was saved."""
    if not os.path.exists(path):
        return f'no checkpoint was saved ({path} does not exist)'
    try:
        step = torch.load(path, 'cpu', weights_only=True, mmap=True)['step']
    except Exception as e:  # a damaged file, or another script's
        return f'the file at {path} is not a readable checkpoint ({type(e).__name__})'
    return f'the last good checkpoint, step {step}, is kept: {path}'


def prepare_out_dir(c):
    """The run's folder, created; refused before anything is written there if it holds a checkpoint that a run
    without --resume would replace."""
    path = os.path.join(c['out_dir'], 'ckpt.pt')
    if os.path.exists(path) and not (c['resume'] or c['sample_only'] or c['overwrite']):
        raise SystemExit(f'ddpm_cifar.py: {path} holds a run; continue it with --resume true, or start over '
                         'with --overwrite true or another --out-dir')
    try:
        os.makedirs(c['out_dir'], exist_ok=True)
    except OSError as e:
        raise SystemExit(f"ddpm_cifar.py: cannot make --out-dir {c['out_dir']} ({e.strerror})") from None


def write_run_files(c):
    """config.json and a copy of this script, once the run is accepted (the checkpoint and data checked)."""
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(c, f, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), dump)
    copy = os.path.join(c['out_dir'], os.path.basename(__file__))
    write_whole(copy, lambda tmp: shutil.copy(__file__, tmp))


def catch_stop_signals():
    """SIGINT (Ctrl-C, sent to the whole process group) and SIGTERM (a scheduler's notice before its kill)
    only note themselves: the loop saves and stops at the next step boundary, wherever the signal landed
    (native code, compiled code, a loader's queue). Returns the caught signals' list and a function restoring
    the old handlers."""
    caught, sigs = [], (signal.SIGINT, signal.SIGTERM)
    old = [signal.signal(s, lambda num, frame: caught.append(num)) for s in sigs]
    return caught, lambda: [signal.signal(s, h) for s, h in zip(sigs, old)]


def ignore_stop_signals(worker_id=None):
    """DataLoader workers leave stopping to the main process (a dead worker ends the run before it saves)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


def on_device(x, dev):
    """x on the device if it takes under a quarter of the free GPU memory (CIFAR-10: 150 MB), else host."""
    fits = dev.type != 'cuda' or x.nbytes < torch.cuda.mem_get_info(dev)[0] / 4
    return x.to(dev) if fits else x


def batches(ds, c, dev, rank, world, first, stop, steps_per_epoch):
    """This rank's (uint8 images, labels) for steps first .. stop - 1: epoch e's order is DistributedSampler's
    (seed, e), whose rank r takes rows r, r + world, ... of the global batch. CIFAR-10 and shapes are indexed
    out of tensors held on the device; an image folder is decoded by one DataLoader for the whole run."""
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    sampler = DistributedSampler(range(len(ds)), world, rank, shuffle=True, seed=c['seed'], drop_last=True)
    per_rank = c['batch_size'] // world

    def order(where):  # the rows of steps first .. stop - 1, epoch by epoch
        for epoch in range(first // steps_per_epoch, math.ceil(stop / steps_per_epoch)):
            sampler.set_epoch(epoch)
            rows = torch.tensor(list(sampler))[:steps_per_epoch * per_rank].view(steps_per_epoch, per_rank)
            yield from rows.to(where)[max(0, first - epoch * steps_per_epoch):stop - epoch * steps_per_epoch]
    if isinstance(ds, TensorDataset):
        x_all, y_all = (on_device(v, dev) for v in ds.tensors)
        return ((x_all[i], y_all[i]) for i in order(x_all.device))
    loader = DataLoader(ds, batch_sampler=(i.tolist() for i in order('cpu')), num_workers=c['workers'],
                        pin_memory=dev.type == 'cuda', worker_init_fn=ignore_stop_signals)
    return agreed(iter(loader), dist.new_group(backend='gloo') if world > 1 else None)


def agreed(loader, group):
    """The loader's batches, until an image cannot be decoded: then BadImage, naming it, in every process at the
    same step (alone, the others would wait for that process's gradients until the timeout). The processes agree
    on each batch through one integer all-reduced on the CPU (gloo), so no GPU waits for it."""
    try:
        while True:
            try:
                batch, bad = next(loader), ''
            except StopIteration:
                return
            except BadImage as e:  # from a worker, e's text is its traceback: the message is the last line
                batch, bad = None, str(e).splitlines()[-1].split('BadImage: ', 1)[-1]
            if group is not None:
                flag = torch.tensor(len(bad))
                dist.all_reduce(flag, group=group)
                if flag:  # some process met one: all say which
                    said = [''] * dist.get_world_size(group)
                    dist.all_gather_object(said, bad, group=group)
                    bad = max(said, key=len)
            if bad:
                raise BadImage(bad)
            yield batch
    finally:
        getattr(loader, '_shutdown_workers', lambda: None)()  # the workers end with the run, however it ends


def train(c, dev, out, rank, world):
    """Step s draws t, noise, flips and label drops for the whole global batch on the device from a generator
    seeded by (seed, s), and rank r takes rows r, r + world, ..., as it does of the data: any number of
    processes trains the same model as one, and --resume continues exactly without saving RNG state. Nothing
    waits for the GPU in a step: the loss's finiteness and a stop signal are acted on at each log and save."""
    # setup: the checkpoint before the data, so a wrong one fails at once; FID's network before training
    path = os.path.join(out, 'ckpt.pt')
    ckpt = load_checkpoint(path, c) if c['resume'] else None
    for k in ('batch_size', 'seed') if ckpt and rank == 0 else ():  # they set the data order and the noise
        if ckpt['config'][k] != c[k]:
            print(f"note: --{k.replace('_', '-')} {c[k]}, where the checkpoint has {ckpt['config'][k]}: the run goes on, "
                  "not as the checkpoint's run would have")
    ds, classes = load_data(c)
    if not classes and c['cfg_given'] and c['cfg'] != 1:
        raise SystemExit(f"ddpm_cifar.py: {c['data_dir']} has no class sub-folders, so the model is unconditional; "
                         'drop --cfg')
    if ckpt and ckpt['classes'] != classes:
        raise SystemExit(f"ddpm_cifar.py: {path} was trained on {len(ckpt['classes'])} classes, the data has "
                         f'{len(classes)}')
    extract = make_inception(c, dev) if c['fid'] and rank == 0 else None
    if rank == 0:
        write_run_files(c)
    betas = make_betas(c)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(dev)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA in the model's layout
    model = make_model(c, len(classes)).to(dev, memory_format=layout)
    ema = make_model(c, len(classes)).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=c['lr'], weight_decay=c['weight_decay'], fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step, fids = 0, []
    if ckpt:
        for group in ckpt['optimizer']['param_groups']:
            group['fused'] = dev.type == 'cuda'  # whatever device wrote it
        for obj, key in ((model, 'model'), (ema, 'ema'), (opt, 'optimizer'), (scaler, 'scaler')):
            obj.load_state_dict(ckpt[key])
        step, fids = ckpt['step'], ckpt['fid']
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == 'cuda' else None)
    autocast = torch.autocast(dev.type, dtype=getattr(torch, c['dtype'])) if c['dtype'] != 'float32' else nullcontext()
    B, S = c['batch_size'], c['image_size']
    steps_per_epoch = len(ds) // world // (B // world)  # DistributedSampler(drop_last) deals len // world to a rank
    if steps_per_epoch == 0:
        raise SystemExit(f'ddpm_cifar.py: {len(ds)} training images make no batch of {B}; lower --batch-size')
    total = c['epochs'] * steps_per_epoch
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: c['lr'] * min(1, (s + 1) / (c['warmup'] + 1))
    stats = reference_stats(c, extract, ds) if extract else None
    if rank == 0:
        print(f"data: {len(ds):,} images, {len(classes) or 'no'} classes | {c['schedule']} schedule, T {len(betas)} | "
              f"U-Net {sum(p.numel() for p in model.parameters()):,} parameters | {dev}, {c['dtype']}, {world} "
              f"process(es) | {stop} of {total} steps of batch {B}" + (f' | resumed at step {step}' if step else ''))
    g = torch.Generator(dev)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    losses, curve, t_win, s_win = [], [], time.time(), step
    data = batches(ds, c, dev, rank, world, step, stop, steps_per_epoch)
    caught, restore_signals = catch_stop_signals()
    try:
        for x, y in data:
            # noise draw: this step's t, noise, flips and label drops for the global batch; this rank's rows
            g.manual_seed(c['seed'] * 1_000_003 + step)
            t = torch.randint(0, len(betas), (B,), generator=g, device=dev)[rank::world]
            noise = torch.randn((B, 3, S, S), generator=g, device=dev)[rank::world]
            mirror = (torch.rand(B, generator=g, device=dev) < 0.5)[rank::world] & c['flip']
            drop = torch.rand(B, generator=g, device=dev)[rank::world]
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + rank)  # dropout
            x0 = x.to(dev, non_blocking=True).float() / 127.5 - 1
            x0 = torch.where(mirror[:, None, None, None], x0.flip(3), x0)
            y = y.to(dev, non_blocking=True)
            y = drop_labels(y, len(classes), c['p_uncond'], drop) if classes else torch.zeros_like(t)
            xt = q_sample(x0, alphas_cumprod[t].view(-1, 1, 1, 1), noise).contiguous(memory_format=layout)
            # loss (eq. 14)
            with autocast:
                loss = (net(xt, t, y).float() - noise).square().mean()
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
            # EMA, one fused op; warm-up: the average covers at most the steps taken so far
            torch._foreach_lerp_(ema_params, params, 1 - min(c['ema'], (1 + step) / (10 + step)))
            # log, eval, save: the only places that wait for the device
            losses.append(loss.detach())
            log, save = step % c['log_every'] == 0 or step == stop, step % c['save_every'] == 0 or step == stop
            if not (log or save or (caught and world == 1)):
                continue
            # the loss finite, and at a save the weights' norm (so no checkpoint holds inf, nan or overflowing
            # weights); the ranks agree on both and on stopping
            zero = torch.zeros((), device=dev)
            norm = torch.stack(torch._foreach_norm(params)).sum() if save or caught else zero
            flags = torch.stack([torch.stack(losses).mean(), norm, zero + bool(caught)])
            if world > 1:
                dist.all_reduce(flags)
            mean, norm, stopping = (flags / world).tolist()
            if not math.isfinite(mean + norm):
                what = f'loss is {mean}' if not math.isfinite(mean) else f"the weights' norm is {norm}"
                raise SystemExit(f'ddpm_cifar.py: {what} in steps {step - len(losses) + 1}-{step}; '
                                 f'{last_checkpoint(path)}; try a lower --lr or --dtype float32')
            if log:
                curve.append((step, mean))
                ms = (time.time() - t_win) / (step - s_win) * 1e3  # this window's, saves and evals left out
                if rank == 0:
                    print(f"step {step}/{stop} | loss {mean:.4f} | lr {lr_at(step - 1):.1e} | {ms:.1f} ms/step | "
                          f"{B / ms * 1e3:,.0f} img/s | peak mem {peak_memory_gb(dev):.2f} GB | "
                          f"eta {ms * (stop - step) / 6e4:.1f}m", flush=True)
                losses, s_win = [], step
            t_pause = time.time()
            if rank == 0 and c['fid_every'] and (step % (c['fid_every'] * steps_per_epoch) == 0 or step == stop):
                fid, isc, sec = fid_and_is(c, ema.eval(), len(classes), betas, extract, stats, dev)
                fids.append([step, fid])
                print(f"eval | epoch {step / steps_per_epoch:.2f} | step {step} | fid {fid:.2f} | is {isc:.2f} | "
                      f"{c['fid']} samples, {sec:.0f}s", flush=True)
            if rank == 0 and (save or stopping > 0):
                save_checkpoint(path, model, ema, opt, scaler, step, c, classes, fids)
            if stopping > 0:
                why = signal.Signals(caught[0]).name if caught else 'a signal to another rank'
                raise SystemExit(f'ddpm_cifar.py: interrupted at step {step} ({why}); saved {path}; '
                                 'continue with --resume true')
            t_win = time.time() if log else t_win + time.time() - t_pause
    except BadImage as e:  # at a step boundary: the steps so far are whole
        if rank == 0:
            save_checkpoint(path, model, ema, opt, scaler, step, c, classes, fids)
        raise SystemExit(f'ddpm_cifar.py: {e} at step {step}; saved {path}; remove or '
                         'replace the file and continue with --resume true') from None
    finally:
        restore_signals()
        data.close()  # a loader's workers end with the run, however it ends
    return ema.eval(), len(classes), betas, step, curve, fids, extract, stats


def figures(c, model, num_classes, betas, dev, out, curve, fids):
    """A class grid (a row per class, or 10x10 unconditional), 4 slerp interpolations of 9 points between two
    noises with deterministic DDIM, the loss curve and the FID curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g, k = torch.Generator(dev).manual_seed(c['seed']), min(num_classes, 10) or 10
    per = max(1, min(10, c['n_samples'] // k))
    labels = balanced_labels(per * k, num_classes).view(per, k).T.flatten()  # row i: per samples of class i
    x = sample_as_configured(model, num_classes, labels, c, betas, g, dev)
    save_grid(x, os.path.join(out, 'samples.png'), nrow=per)
    shape = (4, 3, c['image_size'], c['image_size'])
    z0, z1 = torch.randn(shape, generator=g, device=dev), torch.randn(shape, generator=g, device=dev)
    x_T = torch.stack([slerp(z0, z1, a) for a in torch.linspace(0, 1, 9, device=dev)], 1).flatten(0, 1)  # a row a pair
    y = balanced_labels(4, num_classes).repeat_interleave(9)
    x = sample_as_configured(model, num_classes, y, c, betas, g, dev, x_T, method='ddim', eta=0.0,
                             steps=c['sample_steps'] or 50)
    save_grid(x, os.path.join(out, 'interpolation.png'), nrow=9)
    for name, points, ylabel in (('loss.png', curve, 'loss'), ('fid.png', fids, 'FID')):
        if points:
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.plot(*zip(*points), marker='o' if name == 'fid.png' else None)
            ax.set(xlabel='step', ylabel=ylabel, yscale='log')
            fig.tight_layout()
            write_whole(os.path.join(out, name), lambda tmp, fig=fig: fig.savefig(tmp, dpi=80))
            plt.close(fig)


def write_samples(c, dev):
    """--sample-only: n_samples from the checkpoint's EMA weights (labels cycling through the classes) to
    samples.npz (uint8 N x H x W x 3, and labels) and the first 100 to samples_only.png."""
    ckpt = load_checkpoint(os.path.join(c['out_dir'], 'ckpt.pt'), c)
    classes, betas = ckpt['classes'], make_betas(c)
    if not classes and c['cfg_given'] and c['cfg'] != 1:
        raise SystemExit('ddpm_cifar.py: this checkpoint is unconditional (no classes); drop --cfg')
    model = make_model(c, len(classes)).to(dev)
    model.load_state_dict(ckpt['ema'])
    labels, g = balanced_labels(c['n_samples'], len(classes)), torch.Generator(dev).manual_seed(c['seed'])
    x = torch.cat([sample_as_configured(model.eval(), len(classes), y, c, betas, g, dev) for y in labels.split(500)])
    extra = {'labels': labels.numpy()} if classes else {}
    write_whole(os.path.join(c['out_dir'], 'samples.npz'), lambda tmp: np.savez(tmp, images=to_uint8(x), **extra))
    save_grid(x[:100], os.path.join(c['out_dir'], 'samples_only.png'), nrow=10)
    print(f"wrote {len(x)} samples to {c['out_dir']}/samples.npz (images: uint8, N x H x W x 3"
          f"{', labels' if classes else ''}) and samples_only.png")
    return model, len(classes), betas, ckpt['step']


def main(argv=None):
    c = get_config(argv)
    check_config(c)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    dev = pick_device(c['device'], int(os.environ.get('LOCAL_RANK', 0)))
    if c['dtype'] == 'auto':
        c['dtype'] = 'bfloat16' if dev.type == 'cuda' and torch.cuda.is_bf16_supported() else 'float32'
    if c['dtype'] == 'float16' and dev.type != 'cuda':
        raise SystemExit('ddpm_cifar.py: --dtype float16 needs CUDA; use bfloat16 or float32 here')
    torch.backends.cudnn.benchmark = dev.type == 'cuda'  # the fastest convolution algorithms for these shapes
    if c['batch_size'] % world:
        raise SystemExit(f"ddpm_cifar.py: --batch-size {c['batch_size']} does not split across {world} processes")
    if 'RANK' in os.environ:  # started by torchrun: a process group, even of one process; rank 0 runs FID alone
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', timeout=timedelta(hours=2))
    prepare_out_dir(c)  # nothing is written before the checkpoint and the data are checked
    if rank == 0:
        print(f"device {dev} | dtype {c['dtype']} | output {c['out_dir']}")
    try:
        if c['sample_only']:
            extract = make_inception(c, dev) if c['fid'] else None  # before sampling: a missing package fails at once
            stats = reference_stats(c, extract, load_data(c)[0]) if extract else None
            model, num_classes, betas, step = write_samples(c, dev)
        else:
            model, num_classes, betas, step, curve, fids, extract, stats = train(c, dev, c['out_dir'], rank, world)
            if rank == 0:
                figures(c, model, num_classes, betas, dev, c['out_dir'], curve, fids)
        if c['dataset'] == 'shapes' and rank == 0:
            shapes_hit_rates(c, model, num_classes, betas, dev)
        if c['fid'] and rank == 0 and (c['sample_only'] or not c['fid_every']):  # else the last step is scored
            fid, isc, sec = fid_and_is(c, model, num_classes, betas, extract, stats, dev)
            print(f"eval | step {step} | fid {fid:.2f} | is {isc:.2f} | {c['fid']} samples, cfg {c['cfg']}, {sec:.0f}s")
    except KeyboardInterrupt:  # Ctrl-C while sampling or drawing (training saved its checkpoint)
        raise SystemExit(f"ddpm_cifar.py: interrupted after training; {c['out_dir']}/ckpt.pt is saved"
                         ) from None
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
