"""
DDPM on MNIST: a small U-Net that trains to clean, balanced digits on a CPU, resumes exactly and measures itself.

DDPM (Ho et al. 2020, arXiv:2006.11239): the simple loss |eps - eps_theta(x_t, t)|^2 (eq. 14), or v
(Salimans & Ho 2022) with --pred v; the cosine schedule (Nichol & Dhariwal 2021, arXiv:2102.09672,
eq. 17, betas clipped at 0.999) or the linear one; ancestral sampling (Algorithm 2, sigma_t^2 = beta_t
or beta_tilde_t) and DDIM (Song et al. 2020, arXiv:2010.02502, eq. 12) on a respaced subset of the
steps. Timestep index t = 0..T-1 stands for the papers' 1..T; abar_t in formulas is alphas_cumprod[t].
Images are 28x28 in [-1, 1], neither padded nor resized. The cpu preset folds each 2x2 block of pixels
into 4 channels (pixel unshuffle, exactly invertible), so its U-Net runs at 14 and 7 (attention at 7)
for a quarter of the cost of full resolution; the gpu preset (--patch 1) runs at 28, 14 and 7.

--eval measures without Inception weights: a small CNN classifier is trained once (cached beside the
checkpoint) and classifies N samples: the class histogram and its KL divergence from uniform, the
mean confidence, the share with confidence >= 0.9, and the Frechet distance between generated and
test-set features of its penultimate layer, beside the same distance for N real training images
(the floor). Then the negative ELBO in bits/dim on test images: L_T + sum_t L_{t-1} + L_0 (eq. 5),
L_0 the discretised Gaussian over 256 bins (eq. 13), every t summed, one noise draw per t.

Run (the cpu preset is the constants below; times on a 2-core CPU):
    python ddpm_mnist.py --data-dir ../shared/data --eval true   # cpu preset, float32: 26 min training on 2 cores
    python ddpm_mnist.py --data-dir ../shared/data --eval true --dtype bfloat16 --epochs 9   # 26 min too on a CPU with
                                                                 # AVX512-BF16; its figures are in the README
    python ddpm_mnist.py --preset gpu                            # a wider U-Net, 2 blocks per level, 100 epochs
    torchrun --nproc_per_node=2 ddpm_mnist.py --preset gpu       # DDP; --batch-size is global
    python ddpm_mnist.py --sample-only true --n-samples 1000     # samples.npz and a grid from out/ddpm_mnist/ckpt.pt
    python ddpm_mnist.py --sample-only true --eval true --sampler ddpm --sample-steps 0   # 1000-step ancestral
    python ddpm_mnist.py --resume true                           # continue exactly where ckpt.pt left off
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
data_dir = './data'           # torchvision's MNIST root (MNIST/raw/...); downloaded there when online
out_dir = 'out/ddpm_mnist'    # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'cpu'                # 'cpu' | 'gpu': 'cpu' is these constants; 'gpu' swaps in GPU_PRESET for flags not given
patch = 2                     # the image enters as (28 / patch)^2 cells of patch^2 pixels (pixel unshuffle); 1 = as is
channels = 32                 # U-Net base width
channel_mults = '1,2'         # width multiplier per resolution, from 28 / patch down, halving
res_blocks = 2                # residual blocks per resolution on the way down (one more on the way up)
attn_res = '7'                # resolutions with self-attention, comma-separated ('' = none; the middle always has it)
dropout = 0.0                 # in the residual blocks
schedule = 'cosine'           # 'cosine' | 'linear'
timesteps = 1000              # T
beta_start = 1e-4             # beta_1 of 'linear'
beta_end = 0.02               # beta_T of 'linear'
pred = 'eps'                  # 'eps' | 'v': what the network predicts
min_snr = 5.0                 # gamma of min-SNR loss weighting (Hang et al. 2023): min(SNR_t, gamma) / SNR_t (eps); 0 = off
epochs = 7                    # passes over the training images
batch_size = 64               # global, split across DDP ranks
lr = 2e-3                     # peak AdamW learning rate, after a linear warm-up, cosine-decayed to 0
warmup = 200                  # warm-up steps
weight_decay = 0.0            # AdamW's
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.995                   # decay of the weight average that is sampled from
train_images = 0              # 0 = all 60,000; fewer for quick runs
sampler = 'ddim'              # 'ddim' | 'ddpm'
sample_steps = 50             # reverse steps; 0 = T (DDPM runs all T)
eta = 0.0                     # DDIM noise: 0 = deterministic, 1 = DDPM-like
sigma = 'beta_tilde'          # 'beta_tilde' | 'beta': variance of the DDPM step and of the ELBO's p(x_{t-1} | x_t)
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval = False                  # after training (or with --sample-only): classifier figures, Frechet distance, bits/dim
eval_samples = 1000           # samples (and real images for the floor) that --eval scores
elbo_images = 100             # test images whose negative ELBO is computed (T network calls each); 0 = skip
classifier = ''               # the evaluation classifier's file; '' = classifier.pt in out_dir (trained if missing)
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
dtype = 'float32'             # 'float32' | 'bfloat16' | 'float16': autocast for training (float16 needs CUDA)
compile = False               # torch.compile the training model
resume = False                # continue from out_dir/ckpt.pt
overwrite = False             # start over in an out_dir that holds a checkpoint (replaced at the first save)
sample_only = False           # load out_dir/ckpt.pt (EMA weights), write samples.npz and samples.png
max_steps = 0                 # stop (saving) after this many steps in total; 0 = all epochs
save_every = 500              # steps between checkpoints (also at the end, on Ctrl-C and on SIGTERM)
log_every = 100               # steps between progress lines; each checks the loss is finite
seed = 0                      # data order, noise and initial weights

GPU_PRESET = dict(patch=1, channels=64, channel_mults='1,2,2', res_blocks=2, dropout=0.1, epochs=100, batch_size=128, lr=2e-4,
                  warmup=1000, ema=0.9995)
ARCH = ('patch', 'channels', 'channel_mults', 'res_blocks', 'attn_res', 'schedule', 'timesteps', 'beta_start', 'beta_end', 'pred')


def get_config(argv=None):
    """Every lowercase constant from the config banner to the next banner becomes --dashed-name
    with the default's type (blank lines and comment paragraphs may sit among them); a dict.
    --preset gpu then sets GPU_PRESET's values for the flags not given on the command line."""
    def parse_bool(s):
        if s.lower() in ('true', '1', 'false', '0'):
            return s.lower() in ('true', '1')
        raise argparse.ArgumentTypeError(f"expected true/false/1/0, got '{s}'")
    block = open(__file__).read().split('# ---- config ----\n')[1].split('\n# ----')[0]  # to the next banner
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    for name, comment in re.findall(r'^([a-z_][a-z0-9_]*) *=.*?(?:# *(.*))?$', block, re.M):  # lowercase constants
        default = globals()[name]
        listed = re.match(r"'[^']*'(?: *\| *'[^']*')+", comment)  # a leading 'a' | 'b' list gives the choices
        choices = re.findall(r"'([^']*)'", listed[0]) if listed else None
        ap.add_argument('--' + name.replace('_', '-'), default=default, choices=choices,
                        type=parse_bool if isinstance(default, bool) else type(default),
                        help=f'{comment} [{default!r}]'.replace('%', '%%'))
    c = vars(ap.parse_args(argv))
    given = {a[2:].split('=')[0].replace('-', '_') for a in (argv if argv is not None else sys.argv[1:]) if a.startswith('--')}
    if c['preset'] == 'gpu':
        c.update({k: v for k, v in GPU_PRESET.items() if k not in given})
    return c


def check_config(c):
    """One line saying what is wrong and what would work, for flags that argparse accepts but the run can't use."""
    mults = c['channel_mults'].split(',')
    problems = [
        *[(not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number, not {v}") for k, v in c.items()
          if isinstance(v, float)],  # nan passes every comparison below
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults), "--channel-mults takes positive integers like '1,2,2'"),
        (c['patch'] not in (1, 2, 4, 7), '--patch must divide 28: 1, 2, 4 or 7'),
        (28 // max(c['patch'], 1) % 2 ** (len(mults) - 1) != 0, f"--channel-mults: {len(mults)} resolutions would halve "
                                                                f"{28 // max(c['patch'], 1)} pixels {len(mults) - 1} times"),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')), "--attn-res takes resolutions like '7' or '14,7'"),
        (c['channels'] % 8 != 0 or c['channels'] <= 0, '--channels must be a positive multiple of 8 (GroupNorm uses 8 groups)'),
        (c['timesteps'] < 2, '--timesteps must be at least 2'),
        (not 0 < c['beta_start'] < c['beta_end'] < 1, '--beta-start and --beta-end need 0 < start < end < 1'),
        (c['sampler'] == 'ddpm' and c['sample_steps'] not in (0, c['timesteps']),
         '--sample-steps needs --sampler ddim (DDPM runs all T steps); use --sample-steps 0 with ddpm'),
        (not 0 <= c['sample_steps'] <= c['timesteps'], f"--sample-steps must be 0..{c['timesteps']} (the timesteps)"),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every and --log-every must be at least 1'),
        (min(c['train_images'], c['max_steps'], c['elbo_images'], c['warmup']) < 0,
         '--train-images, --max-steps, --elbo-images and --warmup are counts, 0 = default/off'),
        (c['eval_samples'] < 20, '--eval-samples must be at least 20 (a histogram of 10 classes)'),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and 0 <= c['eta'] <= 1 and 0 <= c['dropout'] < 1 and c['grad_clip'] >= 0),
         'need --lr > 0, 0 <= --ema < 1, 0 <= --eta <= 1, 0 <= --dropout < 1, --grad-clip >= 0'),
        (c['resume'] + c['sample_only'] + c['overwrite'] > 1, '--resume, --sample-only, --overwrite: pick one'),
    ]
    for bad, why in problems:
        if bad:
            raise SystemExit(f'ddpm_mnist.py: {why}')

# ---- schedule ----
def linear_betas(T, beta_start, beta_end):
    """Ho et al. sec. 4: beta_1 .. beta_T evenly spaced (float64, index t = 0..T-1)."""
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_alphas_cumprod(T, s=0.008):
    """abar(t) = f(t) / f(0), f(t) = cos((t/T + s) / (1 + s) * pi/2)^2, at t = 0..T (Nichol & Dhariwal eq. 17)."""
    f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return f / f[0]


def cosine_betas(T, s=0.008, max_beta=0.999):
    """beta_t = 1 - abar(t+1) / abar(t), clipped at max_beta (abar(T) = 0 would make beta_T = 1)."""
    alphas_cumprod = cosine_alphas_cumprod(T, s)
    return (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(max=max_beta)


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


def x0_eps_from_output(xt, out, alphas_cumprod_t, pred):
    """The network's output as (x0, eps), with a = sqrt(abar_t), b = sqrt(1 - abar_t): from eps, x0 = (x_t - b eps) / a
    (eq. 4 inverted); from v = a eps - b x0, x0 = a x_t - b v and eps = b x_t + a v."""
    a, b = alphas_cumprod_t.sqrt(), (1 - alphas_cumprod_t).sqrt()
    return ((xt - b * out) / a, out) if pred == 'eps' else (a * xt - b * out, b * xt + a * out)


# ---- model ----
def timestep_embedding(t, dim):
    """(B,) -> (B, dim) sin and cos of t at geometric frequencies 1 .. 1e-4 (Vaswani et al. 2017)."""
    freqs = torch.exp(-math.log(10_000) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs
    return torch.cat([a.sin(), a.cos()], 1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; plus the time embedding; GroupNorm, SiLU, dropout, 3x3 conv (zero-initialised,
    so each block starts as the identity); a 1x1 conv on the skip path when the width changes."""
    def __init__(self, cin, cout, tdim, dropout):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2, self.drop, self.conv2 = nn.GroupNorm(8, cout), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(self.drop(F.silu(self.norm2(h))))


class Attention(nn.Module):
    """Multi-head self-attention over the H x W positions, residual, output projection zero-initialised."""
    def __init__(self, ch, heads=4):
        super().__init__()
        self.heads, self.norm, self.qkv, self.proj = heads, nn.GroupNorm(8, ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (B, heads, HW, C / heads)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class UNet(nn.Module):
    """eps_theta(x_t, t) (or v): a DDPM U-Net (Ho et al. appendix B, as in improved-diffusion). Per resolution,
    res_blocks ResBlocks on the way down (attention after each where listed) then a stride-2 conv; the middle
    is ResBlock, attention, ResBlock; on the way up res_blocks + 1 ResBlocks, each fed the matching skip."""
    def __init__(self, channels=32, mults=(1, 2), res_blocks=1, attn_res=(7,), dropout=0.0, patch=2):
        super().__init__()
        tdim, res = 4 * channels, 28 // patch
        self.channels, self.patch = channels, patch
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(patch ** 2, channels, 3, padding=1)
        self.down, skips, ch = nn.ModuleList(), [channels], channels
        for i, m in enumerate(mults):
            for _ in range(res_blocks):
                attn = [Attention(channels * m)] if res in attn_res else []
                self.down.append(nn.ModuleList([ResBlock(ch, channels * m, tdim, dropout)] + attn))
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
                attn = [Attention(channels * m)] if res in attn_res else []
                self.up.append(nn.ModuleList([ResBlock(ch + skips.pop(), channels * m, tdim, dropout)] + attn))
                ch = channels * m
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode='nearest')]))  # the next block's conv follows
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, patch ** 2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):  # x (B, 1, 28, 28), t (B,) -> (B, 1, 28, 28)
        temb = self.temb(timestep_embedding(t, self.channels))
        h = self.inp(F.pixel_unshuffle(x, self.patch))  # (B, C, 28 / patch, 28 / patch)
        hs = [h]
        for layers in self.down:
            h = run(layers, h, temb)
            hs.append(h)
        h = run(self.mid, h, temb)
        for layers in self.up:
            h = run(layers, torch.cat([h, hs.pop()], 1) if isinstance(layers[0], ResBlock) else h, temb)
        return F.pixel_shuffle(self.out(h), self.patch)


def run(layers, h, temb):
    for layer in layers:
        h = layer(h, temb) if isinstance(layer, (ResBlock, Attention)) else layer(h)
    return h


def make_model(c):
    """The network contract, for a forker who swaps in another: model(x_t, t) -> out, with x_t (B, 1, 28, 28) in
    [-1, 1]-data units and t (B,) integer steps 0..T-1; out has x_t's shape and is the predicted eps (--pred eps) or v
    (--pred v), as the loss and the samplers read it. The loop also uses .parameters(), .state_dict() and
    .train()/.eval(), nothing else."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    return UNet(c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['patch'])


# ---- loss ----
def loss_weight(alphas_cumprod_t, pred, min_snr):
    """Per-example weight of the squared error. In x0 terms the eps error is SNR_t |x0 - x0_hat|^2 and the v error
    (SNR_t + 1) |x0 - x0_hat|^2 (SNR_t = abar_t / (1 - abar_t)); min-SNR weighting makes either min(SNR_t, gamma)
    |x0 - x0_hat|^2 (Hang et al. 2023, arXiv:2303.09556), which stops the many easy low-noise steps from dominating."""
    if not min_snr:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=min_snr) / (snr + (pred == 'v'))


def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) per element, in nats."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x, mean, std):
    """log P(x) for x on the 256 levels of [-1, 1]: the mass of N(mean, std^2) over the level's bin of width
    2/255, the outermost bins reaching to -inf and +inf (Ho et al. eq. 13), so the 256 masses sum to 1."""
    upper = torch.where(x > 0.999, torch.full_like(x, math.inf), (x + 1 / 255 - mean) / std)
    lower = torch.where(x < -0.999, torch.full_like(x, -math.inf), (x - 1 / 255 - mean) / std)
    # log(Phi(u) - Phi(l)), computed on the side of the mean where it doesn't cancel: Phi(u) - Phi(l) = Phi(-l) - Phi(-u)
    flip = (lower + upper) > 0
    hi, lo = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_u, log_l = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_u + torch.log1p(-torch.exp(log_l - log_u).clamp(max=1 - 1e-12))


@torch.no_grad()
def nll_bits_per_dim(model, x0, betas, pred='eps', sigma='beta_tilde', generator=None):
    """Negative ELBO per image (B,) in bits/dim (eq. 5): KL(q(x_T | x0) || N(0, I)) + sum over t >= 2 of
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) + -log p(x0 | x1) (eq. 13), one x_t drawn per t. p's variance
    is beta_t or beta_tilde_t; at t = 1, where beta_tilde is 0, the decoder uses beta_tilde_2 (as improved-diffusion)."""
    betas = betas.to(x0.device, torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0 = x0.double()
    a_T = alphas_cumprod[-1]
    total = normal_kl(a_T.sqrt() * x0, 1 - a_T, torch.zeros(()), torch.ones(())).sum((1, 2, 3))
    for t in range(len(betas) - 1, -1, -1):
        xt = q_sample(x0, alphas_cumprod[t], torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype))
        out = model(xt.float(), torch.full((len(x0),), t, device=x0.device)).double()
        x0_hat = x0_eps_from_output(xt, out, alphas_cumprod[t], pred)[0].clamp(-1, 1)
        mean_p, var_tilde = q_posterior_mean_var(x0_hat, xt, t, betas, alphas_cumprod)
        var_p = betas[t] if sigma == 'beta' else var_tilde if t > 0 else q_posterior_mean_var(x0, xt, 1, betas, alphas_cumprod)[1]
        if t > 0:
            mean_q, var_q = q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod)
            total += normal_kl(mean_q, var_q, mean_p, var_p).sum((1, 2, 3))
        else:
            total -= discretized_gaussian_log_likelihood(x0, mean_p, var_p.sqrt()).sum((1, 2, 3))
    return total / (x0[0].numel() * math.log(2))


# ---- sampling ----
@torch.no_grad()
def sample(model, shape, betas, steps=0, method='ddim', sigma='beta_tilde', eta=0.0, pred='eps', generator=None, device='cpu',
           keep=()):
    """Reverse process from x_T ~ N(0, I). 'ddpm': Algorithm 2 over all T steps, x_{t-1} = the posterior mean
    (eq. 7) at the predicted x0 (clipped to [-1, 1]) plus sigma_t z. 'ddim': eq. 12 of Song et al. on `steps`
    evenly spaced timesteps (0 = all T), noise eta * eq. 16. Returns x_0 in [-1, 1] and {t: x0-prediction at
    step t} for t in keep (t = T: the starting noise)."""
    alphas_cumprod = torch.cumprod(1 - betas.double(), 0).float().to(device)
    T = len(betas)
    x = torch.randn(shape, generator=generator, device=device)
    snaps = {T: x.cpu()} if T in keep else {}
    ts = list(range(T - 1, -1, -1)) if method == 'ddpm' else torch.linspace(T - 1, 0, steps or T).round().long().tolist()
    for i, t in enumerate(ts):
        a = alphas_cumprod[t]
        x0, eps = x0_eps_from_output(x, model(x, torch.full(shape[:1], t, device=device, dtype=torch.long)).float(), a, pred)
        x0 = x0.clamp(-1, 1)
        if method == 'ddpm':
            mean, var = q_posterior_mean_var(x0, x, t, betas.float().to(device), alphas_cumprod)
            var = betas[t].float() if sigma == 'beta' and t > 0 else var
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, device=device) if t > 0 else mean
        else:
            a_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=device)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # the eps that agrees with the clipped x0
            s = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # eq. 16
            z = torch.randn(shape, generator=generator, device=device)
            x = a_prev.sqrt() * x0 + (1 - a_prev - s ** 2).sqrt() * eps + s * z
        if t in keep:
            snaps[t] = x0.cpu()
    return x.clamp(-1, 1), snaps


def sample_as_configured(model, n, c, betas, generator, dev):
    """n images (n, 1, 28, 28) on the CPU with the config's sampler, steps, sigma, eta and prediction."""
    x, _ = sample(model, (n, 1, 28, 28), betas, c['sample_steps'], c['sampler'], c['sigma'], c['eta'], c['pred'], generator, dev)
    return x.cpu()


def to_uint8(x):
    """[-1, 1] -> 0..255, (N, 1, H, W) -> (N, H, W)."""
    return ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


# ---- data ----
def load_mnist(root, train=True):
    """(N, 1, 28, 28) float in [-1, 1] and (N,) labels, from torchvision's MNIST under root (downloaded if missing)."""
    from torchvision.datasets import MNIST
    try:
        ds = MNIST(root, train=train, download=True)
    except Exception as e:  # no network, or a broken file
        raw = os.path.join(os.path.abspath(root), 'MNIST', 'raw')
        if os.path.isdir(raw) and os.listdir(raw):  # files there, one of them unreadable (or one missing, offline)
            raise SystemExit(f'ddpm_mnist.py: MNIST under {raw} cannot be read ({type(e).__name__}: {str(e)[:90]}); '
                             'a file there is truncated or damaged, or one is missing: replace it') from None
        raise SystemExit(f"ddpm_mnist.py: no MNIST under {raw} and the download failed "
                         f"({type(e).__name__}); put train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                         f"and t10k-labels-idx1-ubyte there (or their .gz), or pass --data-dir") from None
    return ds.data[:, None].float() / 127.5 - 1, ds.targets


class Classifier(nn.Module):
    """The evaluation's judge: two conv-pool layers, a 128-d feature layer (the Frechet features) and 10 logits."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.feat, self.head = nn.Linear(64 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x):  # -> (features (B, 128), logits (B, 10))
        f = F.relu(self.feat(self.conv(x)))
        return f, self.head(f)


def get_classifier(c, dev, path):
    net = Classifier().to(dev)
    if os.path.exists(path):
        try:
            net.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        except Exception as e:  # not a file torch can read, or another network's weights
            raise SystemExit(f'ddpm_mnist.py: {path} is not the MNIST judge\'s weights ({type(e).__name__}); pass the '
                             'classifier.pt a run wrote, or --classifier \'\' to train one') from None
        return net.eval()
    x, y = load_mnist(c['data_dir'])
    g = torch.Generator().manual_seed(c['seed'])
    epochs, steps = 5, math.ceil(len(x) / 128)  # 99.0% test accuracy; 2 epochs at a fixed lr gave 98.4%
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / (epochs * steps))))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(net(x[idx].to(dev))[1], y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    xt, yt = load_mnist(c['data_dir'], train=False)
    acc = (judge(net.eval(), xt, dev)[1].argmax(1) == yt).float().mean().item()
    print(f'eval | classifier trained ({epochs} epochs): test accuracy {acc:.2%} | saved to {path}')
    write_whole(path, lambda tmp: torch.save(net.state_dict(), tmp))
    return net


@torch.no_grad()
def judge(net, x, dev):
    outs = [net(b.to(dev)) for b in x.split(500)]
    return torch.cat([o[0] for o in outs]).double().cpu(), torch.cat([o[1] for o in outs]).float().cpu()


def frechet(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (N, D); the trace of the root
    is that of (C_a^(1/2) C_b C_a^(1/2))^(1/2), a symmetric matrix, so eigh suffices (no scipy)."""
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


def class_figures(logits):
    """(share with confidence >= 0.9, mean confidence, KL(class histogram || uniform), histogram) of (N, 10) logits."""
    p = logits.softmax(1)
    conf, hist = p.max(1).values, torch.bincount(p.argmax(1), minlength=10).double() / len(p)
    return (conf >= 0.9).float().mean().item(), conf.mean().item(), (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item(), hist


def evaluate(c, model, betas, dev, out):
    """Prints, for eval_samples generated digits and as many real training digits (the reference): the share
    classified with confidence >= 0.9, the mean confidence, the class histogram and its KL from uniform; then the
    Frechet distance of each set to the test set (the real one is the floor), and bits/dim on elbo_images test images."""
    net = get_classifier(c, dev, c['classifier'] or os.path.join(out, 'classifier.pt'))
    g = torch.Generator(dev).manual_seed(c['seed'] + 1)
    n, t0 = c['eval_samples'], time.time()
    gen = torch.cat([sample_as_configured(model, min(500, n - i), c, betas, g, dev) for i in range(0, n, 500)])  # 500 at a time
    seconds = time.time() - t0
    gen = torch.from_numpy(to_uint8(gen))[:, None].float() / 127.5 - 1  # scored as saved: on the 256 levels
    x_test, _ = load_mnist(c['data_dir'], train=False)
    x_train, _ = load_mnist(c['data_dir'])
    pick = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(c['seed']))[:n]
    f_test, f_gen, f_real = judge(net, x_test, dev)[0], judge(net, gen, dev), judge(net, x_train[pick], dev)
    what = f"{c['sampler']} {c['sample_steps'] or c['timesteps']} steps"
    for name, (_, logits) in [(f'{n} samples ({what}, {seconds:.0f}s)', f_gen), (f'{n} training images', f_real)]:
        confident, mean_conf, kl, hist = class_figures(logits)
        print(f"eval | {name} | confident (p >= 0.9) {confident:.1%} | mean confidence {mean_conf:.3f} | "
              f"KL(classes || uniform) {kl:.4f} | classes {' '.join(f'{h:.3f}' for h in hist)}")
    fd, floor = frechet(f_gen[0], f_test), frechet(f_real[0], f_test)
    print(f'eval | frechet distance to the test set {fd:.2f} | floor ({n} training images) {floor:.2f} | {fd / floor:.2f}x floor')
    if c['elbo_images']:
        t0 = time.time()
        bpd = nll_bits_per_dim(model, x_test[:c['elbo_images']].to(dev), betas, c['pred'], c['sigma'], g).cpu()
        print(f"eval | negative ELBO on {len(bpd)} test images {bpd.mean():.3f} +- {bpd.std() / math.sqrt(len(bpd)):.3f} "
              f"bits/dim | {time.time() - t0:.0f}s")


# ---- train ----
def pick_device(name, local_rank=0):
    """'auto' is cuda, then mps, then cpu; any other name must parse and be present. Under torchrun each process takes
    the GPU of its LOCAL_RANK, and more processes than GPUs stop here, in every process, with the same line."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"ddpm_mnist.py: --device '{name}' is not a torch device; try cpu, cuda or auto") from None
    if not {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(dev.type, lambda: True)():
        raise SystemExit(f'ddpm_mnist.py: --device {name} is not available on this machine; try --device auto')
    if dev.type == 'cuda' and dev.index is None:
        gpus, procs = torch.cuda.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if procs > gpus:
            raise SystemExit(f'ddpm_mnist.py: torchrun started {procs} processes on a machine with {gpus} GPU(s); use '
                             f'--nproc_per_node={gpus} (one process per GPU), or --device cpu')
        dev = torch.device('cuda', local_rank)
    if dev.type == 'cuda' and dev.index >= torch.cuda.device_count():
        raise SystemExit(f'ddpm_mnist.py: --device {name}: this machine has {torch.cuda.device_count()} GPU(s), '
                         f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    return dev


def load_checkpoint(path, c):
    """The checkpoint at path, checked to come from this script with the same architecture and schedule."""
    if not os.path.exists(path):
        raise SystemExit(f'ddpm_mnist.py: no checkpoint at {path}; train first, or point --out-dir at the run')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'ddpm_mnist.py: {path} is not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('script') != 'ddpm_mnist.py':
        script = ckpt.get('script') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f'ddpm_mnist.py: {path} was not written by ddpm_mnist.py (script: {script})')
    differ = [f"{k} {ckpt['config'][k]!r} (flag {c[k]!r})" for k in ARCH if ckpt['config'][k] != c[k]]
    if differ:
        raise SystemExit(f"ddpm_mnist.py: {path} has a different model: {', '.join(differ)}; pass the checkpoint's values")
    return ckpt


def save_checkpoint(path, model, ema, opt, scaler, step, epoch, c):
    """Written whole to a temporary file, then renamed over the last one: a kill mid-save keeps that one."""
    write_whole(path, lambda tmp: torch.save({
        'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': opt.state_dict(),
        'scaler': scaler.state_dict(), 'step': step, 'epoch': epoch, 'config': c, 'script': 'ddpm_mnist.py'}, tmp))


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
        raise SystemExit(f'ddpm_mnist.py: could not write {path} ({str(e)[:100]}; {size / 2**20:.0f} MB '
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
        raise SystemExit(f'ddpm_mnist.py: {path} holds a run; continue it with --resume true, or start over '
                         'with --overwrite true or another --out-dir')
    try:
        os.makedirs(c['out_dir'], exist_ok=True)
    except OSError as e:
        raise SystemExit(f"ddpm_mnist.py: cannot make --out-dir {c['out_dir']} ({e.strerror})") from None


def write_run_files(c):
    """config.json and a copy of this script, once the run is accepted (the checkpoint and data checked)."""
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(c, f, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), dump)
    copy = os.path.join(c['out_dir'], os.path.basename(__file__))
    write_whole(copy, lambda tmp: shutil.copy(__file__, tmp))


def catch_stop_signals():
    """SIGINT (Ctrl-C, sent to the whole process group) and SIGTERM (a scheduler's notice before its kill) only note
    themselves: the loop saves and stops at the next step boundary, wherever the signal landed (native code, compiled
    code). Returns the list of caught signals and a function that puts the old handlers back."""
    caught, sigs = [], (signal.SIGINT, signal.SIGTERM)
    old = [signal.signal(s, lambda num, frame: caught.append(num)) for s in sigs]
    return caught, lambda: [signal.signal(s, h) for s, h in zip(sigs, old)]


def on_device(x, dev):
    """x on the device if it takes under a quarter of the free GPU memory (MNIST: 188 MB as float32), else on the host."""
    fits = dev.type != 'cuda' or x.nbytes < torch.cuda.mem_get_info(dev)[0] / 4
    return x.to(dev) if fits else x


def train(c, dev, out, rank, world):
    """Step s draws t and noise for the whole global batch on the device from a generator seeded by (seed, s), and
    rank r takes rows r, r + world, ...: DistributedSampler deals epoch e's order (seeded by (seed, e)) out the same
    way, so any number of processes trains the same model as one, and --resume continues exactly without saving RNG
    state. Nothing waits for the device in a step: the loss's finiteness and a stop signal are acted on at each log
    and save."""
    from torch.utils.data import DistributedSampler
    path = os.path.join(out, 'ckpt.pt')
    ckpt = load_checkpoint(path, c) if c['resume'] else None  # before the data: a wrong checkpoint fails at once
    for k in ('batch_size', 'seed') if ckpt and rank == 0 else ():  # they set the data order and the noise
        if ckpt['config'][k] != c[k]:
            print(f"note: --{k.replace('_', '-')} {c[k]}, where the checkpoint has {ckpt['config'][k]}: the run goes on, "
                  "not as the checkpoint's run would have")
    x_all, _ = load_mnist(c['data_dir'])
    x_all = on_device(x_all[:c['train_images'] or None], dev)
    if rank == 0:
        write_run_files(c)
    betas = make_betas(c)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(dev)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA in the model's layout
    model = make_model(c).to(dev, memory_format=layout)
    ema = make_model(c).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=c['lr'], weight_decay=c['weight_decay'], fused=dev.type == 'cuda')
    scaler = torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
    step = 0
    if ckpt:
        for group in ckpt['optimizer']['param_groups']:
            group['fused'] = dev.type == 'cuda'  # whatever device wrote it
        for obj, key in ((model, 'model'), (ema, 'ema'), (opt, 'optimizer'), (scaler, 'scaler')):
            obj.load_state_dict(ckpt[key])
        step = ckpt['step']
    net = torch.compile(model) if c['compile'] else model
    if dist.is_initialized():
        net = nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == 'cuda' else None)
    autocast = torch.autocast(dev.type, dtype=getattr(torch, c['dtype'])) if c['dtype'] != 'float32' else nullcontext()
    B, per_rank = c['batch_size'], c['batch_size'] // world
    sampler = DistributedSampler(range(len(x_all)), num_replicas=world, rank=rank, shuffle=True, seed=c['seed'], drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise SystemExit(f"ddpm_mnist.py: {len(x_all)} training images make no batch of {B}; lower --batch-size")
    total = c['epochs'] * steps_per_epoch  # the lr schedule's length; --max-steps stops early without changing it
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5 * (1 + math.cos(math.pi * min(1, s / total)))
    if rank == 0:
        print(f"data: {len(x_all):,} MNIST images | {c['schedule']} schedule, T {len(betas)} | predicts {c['pred']} | U-Net "
              f"{sum(p.numel() for p in model.parameters()):,} parameters | {dev}, {c['dtype']}, {world} process(es) | "
              f"{stop} of {total} steps of batch {B}" + (f' | resumed at step {step}' if step else ''))
    first = step  # this run's first step (step moves on while the batches are drawn, and a loader draws ahead)

    def order():  # this rank's rows of the data for steps step .. stop - 1, epoch by epoch
        for epoch in range(first // steps_per_epoch, math.ceil(stop / steps_per_epoch)):
            sampler.set_epoch(epoch)
            rows = torch.tensor(list(sampler))[:steps_per_epoch * per_rank].view(steps_per_epoch, per_rank)
            yield from rows.to(x_all.device)[max(0, first - epoch * steps_per_epoch):stop - epoch * steps_per_epoch]
    g = torch.Generator(dev)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    losses, curve, t_win, s_win = [], [], time.time(), step
    caught, restore_signals = catch_stop_signals()
    try:
        for idx in order():
            # noise draw: this step's t and noise for the global batch; this rank's rows
            g.manual_seed((c['seed'] * 1_000_003 + step) * 1024)  # rank 0's seed before the draws were global
            t = torch.randint(0, len(betas), (B,), generator=g, device=dev)[rank::world]
            noise = torch.randn((B, 1, 28, 28), generator=g, device=dev)[rank::world]
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + 1 + rank)  # dropout, apart from g's stream
            x0 = x_all[idx].to(dev, non_blocking=True)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            target = noise if c['pred'] == 'eps' else a.sqrt() * noise - (1 - a).sqrt() * x0
            xt = q_sample(x0, a, noise).contiguous(memory_format=layout)
            # loss (eq. 14, weighted)
            with autocast:
                loss = (loss_weight(a, c['pred'], c['min_snr']) * (net(xt, t).float() - target).square()).mean()
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
            # log, save: the only places that wait for the device
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
                raise SystemExit(f'ddpm_mnist.py: {what} in steps {step - len(losses) + 1}-{step}; '
                                 f'{last_checkpoint(path)}; try a lower --lr or --dtype float32')
            if log:
                curve.append((step, mean))
                ms = (time.time() - t_win) / (step - s_win) * 1e3  # this window's, saves left out
                if rank == 0:
                    print(f"step {step}/{stop} | loss {mean:.4f} | lr {lr_at(step - 1):.1e} | {ms:.1f} ms/step | "
                          f"{B / ms * 1e3:,.0f} img/s | eta {ms * (stop - step) / 6e4:.1f}m", flush=True)
                losses, s_win = [], step
            t_pause = time.time()
            if rank == 0 and (save or stopping > 0):
                save_checkpoint(path, model, ema, opt, scaler, step, step // steps_per_epoch, c)
            if stopping > 0:
                why = signal.Signals(caught[0]).name if caught else 'a signal to another rank'
                raise SystemExit(f'ddpm_mnist.py: interrupted at step {step} ({why}); saved {path}; '
                                 'continue with --resume true')
            t_win = time.time() if log else t_win + time.time() - t_pause
    finally:
        restore_signals()
    return ema, betas, curve


def save_grid(x, path, nrow=10):
    """(N, 1, 28, 28) in [-1, 1] -> one PNG, nrow images per row."""
    import matplotlib.pyplot as plt
    imgs = to_uint8(x)
    rows = math.ceil(len(imgs) / nrow)
    grid = np.zeros((rows * 30, nrow * 30), np.uint8)
    for i, im in enumerate(imgs):
        grid[i // nrow * 30 + 1:i // nrow * 30 + 29, i % nrow * 30 + 1:i % nrow * 30 + 29] = im
    write_whole(path, lambda tmp: plt.imsave(tmp, grid, cmap='gray', vmin=0, vmax=255))


def figures(c, model, betas, dev, out, curve):
    """The sample grid, the reverse process of 8 samples (its x0-predictions from x_T to x_0), the loss curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g = torch.Generator(dev).manual_seed(c['seed'])
    T = len(betas)
    save_grid(sample_as_configured(model, c['n_samples'], c, betas, g, dev), os.path.join(out, 'samples.png'))
    ts = sorted({T} | {int(T * f) for f in (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)} | {0}, reverse=True)
    x, snaps = sample(model, (8, 1, 28, 28), betas, 0, 'ddpm', c['sigma'], 0, c['pred'], g, dev, keep=set(ts))
    strip = torch.stack([snaps[t] for t in ts], 1).flatten(0, 1)  # (8 * len(ts), 1, 28, 28): a row per sample
    save_grid(strip, os.path.join(out, 'reverse.png'), nrow=len(ts))
    if curve:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(*zip(*curve))
        ax.set(xlabel='step', ylabel='loss', yscale='log', title=f"mean of {c['log_every']} steps")
        fig.tight_layout()
        write_whole(os.path.join(out, 'loss.png'), lambda tmp: fig.savefig(tmp, dpi=80))
        plt.close(fig)


def main(argv=None):
    c = get_config(argv)
    check_config(c)
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    dev = pick_device(c['device'], int(os.environ.get('LOCAL_RANK', 0)))
    if c['dtype'] == 'float16' and dev.type != 'cuda':
        raise SystemExit('ddpm_mnist.py: --dtype float16 needs CUDA; use bfloat16 or float32 here')
    torch.backends.cudnn.benchmark = dev.type == 'cuda'  # the fastest convolution algorithms for these shapes
    if c['batch_size'] % world:
        raise SystemExit(f"ddpm_mnist.py: --batch-size {c['batch_size']} does not split across {world} processes")
    if 'RANK' in os.environ:  # started by torchrun: a process group, even of one process
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    prepare_out_dir(c)  # nothing is written before the checkpoint and the data are checked
    if rank == 0:
        print(f"device {dev} | dtype {c['dtype']} | output {c['out_dir']}")
    try:
        if c['sample_only']:
            ckpt = load_checkpoint(os.path.join(c['out_dir'], 'ckpt.pt'), c)
            model, betas, curve = make_model(c).to(dev), make_betas(c), []
            model.load_state_dict(ckpt['ema'])
            x = sample_as_configured(model.eval(), c['n_samples'], c, betas, torch.Generator(dev).manual_seed(c['seed']), dev)
            write_whole(os.path.join(c['out_dir'], 'samples.npz'), lambda tmp: np.savez(tmp, images=to_uint8(x)))
            save_grid(x[:100], os.path.join(c['out_dir'], 'samples.png'))
            print(f"wrote {len(x)} samples to {c['out_dir']}/samples.npz (images: uint8, N x 28 x 28) and samples.png")
        else:
            model, betas, curve = train(c, dev, c['out_dir'], rank, world)
            if rank == 0:
                figures(c, model.eval(), betas, dev, c['out_dir'], curve)
        if c['eval'] and rank == 0:
            evaluate(c, model.eval(), betas, dev, c['out_dir'])
    except KeyboardInterrupt:  # Ctrl-C while sampling, drawing or evaluating (training saved its checkpoint)
        raise SystemExit(f"ddpm_mnist.py: interrupted after training; {c['out_dir']}/ckpt.pt is saved"
                         ) from None
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
