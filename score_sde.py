"""
Score-based generative modelling through SDEs on MNIST (or CIFAR-10, or an image folder such as FFHQ at 96).

Song et al. 2021 (arXiv:2011.13456). Forward SDEs dx = f(x, t) dt + g(t) dw on t in [0, 1]:
  've': dx = sigma^t dw, perturbation kernel N(x(0), (sigma^(2t) - 1) / (2 log sigma) I), prior N(0, std(1)^2 I)
        (the form of the paper's tutorial, sigma = 25 for MNIST, 50 for CIFAR-10 and folders);
  'vp': dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta linear from beta_min to beta_max (eqs. 11, 32-33), prior N(0, I).
Denoising score matching (eq. 7) with lambda(t) = std(t)^2, t ~ U(eps, 1): |std s(x_t, t) + z|^2, averaged over
pixels (the tutorial sums them: a constant factor). The score network is a U-Net with Gaussian Fourier features of
t, input scaled by 1 / sqrt(mean(t)^2 0.5^2 + std(t)^2) (EDM's c_in, so every t feeds it unit-scale inputs) and output
divided by std(t). Samplers: Euler-Maruyama on the reverse SDE (eq. 6) over N steps from t = 1 to eps, the last
returning the noise-free mean; predictor-corrector (Algorithm 1 with EM as predictor: one Langevin step first, step
size 2 alpha (snr |z| / |s|)^2, alpha = 1 - beta(t) dt for VP, 1 for VE, with the norms averaged over the batch as
in the reference code: a per-sample |s| makes the step grow as x nears the mode, which inflated the std by 12% on
16-d Gaussian data); and the probability-flow ODE (eq. 13) solved by an adaptive Dormand-Prince RK45 written here
(the method of scipy's solve_ivp 'RK45', in torch so it runs on the GPU), printing its function evaluations (NFE).
Likelihood (appendix D.2): log p_0(x) = log p_1(x(1)) + integral of div f~ along the ODE, div by Hutchinson's
estimator with one Rademacher probe per image. Bits/dim on 8-bit images: x = (k + u) / 256 (uniform
dequantisation) mapped onto the data range, -log2 p / D, plus log2(256 / range width): 8 for data in [0, 1] (VE,
as in the seed) and 7 for [-1, 1] (VP). That offset is the change of variables from the data range to the
integers 0..255, where each pixel's bin has width 1; the reference code's 'offset = 7 - inverse_scaler(-1)' is it.

--eval: for each sampler (EM at --steps and at twice that, PC at --steps, the ODE; --eval-samplers) the NFE and the wall time for
--eval-samples samples and, on MNIST, ddpm_mnist.py's judge (a small CNN classifier): share with confidence >= 0.9,
class histogram KL from uniform, Frechet distance of its features to the test set beside real images' (the floor).
Then bits/dim on --likelihood-images test images (folder: training images).

Run (times on a 2-core CPU; the README has the figures):
    python score_sde.py --data-dir ../shared/data --eval true --dtype bfloat16 --epochs 9   # VE on MNIST: 25 + 24 min
    python score_sde.py --sde vp --data-dir ../shared/data --eval true --dtype bfloat16 --epochs 9   # the VP SDE
    python score_sde.py --preset gpu --dataset cifar10 --sde vp                             # a GPU run
    torchrun --nproc_per_node=2 score_sde.py --preset gpu --dataset folder --data-dir ffhq  # DDP; FFHQ at 96x96
    python score_sde.py --sample-only true --sampler ode --n-samples 1000                   # samples.npz and a grid
    python score_sde.py --resume true                                                       # continue exactly
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
from collections import namedtuple
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# ---- config ----
data_dir = './data'           # torchvision's MNIST / CIFAR-10 root, or the image folder; downloaded there when online
dataset = 'mnist'             # 'mnist' | 'cifar10' | 'folder'
image_size = 0                # side in pixels; 0 = 28 (mnist), 32 (cifar10), 96 (folder: centre-cropped and resized)
out_dir = 'out/score_sde'     # ckpt.pt, figures, samples.npz, config.json and a copy of this file
preset = 'cpu'                # 'cpu' | 'gpu': 'cpu' is these constants; 'gpu' swaps in GPU_PRESET for flags not given
sde = 've'                    # 've' | 'vp'
sigma = 0.0                   # VE: dx = sigma^t dw; 0 = 25 for mnist, 50 otherwise
beta_min = 0.1                # VP: beta(0)
beta_max = 20.0               # VP: beta(1)
eps = 1e-5                    # smallest t in training and in the likelihood integral
sample_eps = 1e-3             # the samplers integrate from t = 1 down to this t
patch = 2                     # the image enters as (size / patch)^2 cells of patch^2 pixels (pixel unshuffle); 1 = as is
channels = 32                 # U-Net base width
channel_mults = '1,2'         # width multiplier per resolution, from size / patch down, halving
res_blocks = 2                # residual blocks per resolution on the way down (one more on the way up)
attn_res = '7,8'              # resolutions with self-attention, comma-separated ('' = none; the middle always has it)
dropout = 0.0                 # in the residual blocks
fourier_scale = 16.0          # std of the Gaussian Fourier features' frequencies (t in [0, 1])
epochs = 7                    # passes over the training images
batch_size = 64               # global, split across DDP ranks
lr = 2e-3                     # peak AdamW learning rate, after a linear warm-up, cosine-decayed to 0
warmup = 200                  # warm-up steps
grad_clip = 1.0               # max gradient norm; 0 = off
ema = 0.995                   # decay of the weight average that is sampled from
train_images = 0              # 0 = all; fewer for quick runs
sampler = 'pc'                # 'em' | 'pc' | 'ode': for the grid and --sample-only
steps = 100                   # time steps of em and pc (pc makes a corrector step at each too: 2 NFE per step)
snr = 0.16                    # the Langevin corrector's signal-to-noise ratio
ode_tol = 1e-5                # rtol and atol of the RK45 solver (sampling and likelihood)
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval = False                  # after training (or with --sample-only): every sampler's NFE, time and quality; bits/dim
eval_samples = 1000           # samples per sampler that --eval times and scores
eval_samplers = 'em,em2,pc,ode'  # what --eval runs: em (--steps), em2 (EM at twice --steps), pc, ode; '' = none
likelihood_images = 100       # test images whose bits/dim --eval computes (one ODE solve); 0 = skip
classifier = ''               # MNIST judge's file (ddpm_mnist.py's works); '' = classifier.pt in out_dir (trained if missing)
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
dtype = 'float32'             # 'float32' | 'bfloat16' | 'float16': autocast for training (float16 needs CUDA)
compile = False               # torch.compile the training model
resume = False                # continue from out_dir/ckpt.pt
overwrite = False             # start over in an out_dir that holds a checkpoint (replaced at the first save)
sample_only = False           # load out_dir/ckpt.pt (EMA weights), write samples.npz and samples.png
max_steps = 0                 # stop (saving) after this many steps in total; 0 = all epochs
save_every = 500              # steps between checkpoints (also at the end, on Ctrl-C and on SIGTERM)
log_every = 100               # steps between progress lines; each checks the loss is finite
seed = 0                      # data order, noise, initial weights and Fourier features

GPU_PRESET = dict(patch=1, channels=128, channel_mults='1,2,2', res_blocks=2, attn_res='16,14', dropout=0.1, epochs=200,
                  batch_size=128, lr=2e-4, warmup=5000, ema=0.9999)
ARCH = ('dataset', 'image_size', 'sde', 'sigma', 'beta_min', 'beta_max', 'patch', 'channels', 'channel_mults', 'res_blocks',
        'attn_res', 'fourier_scale')


def get_config(argv=None):
    """Every lowercase constant from the config banner to the next banner becomes --dashed-name
    with the default's type (blank lines and comment paragraphs may sit among them); a dict. --preset gpu
    then sets GPU_PRESET's values for the flags not given; image_size 0 and sigma 0 become the dataset's values."""
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
    c['image_size'] = c['image_size'] or {'mnist': 28, 'cifar10': 32, 'folder': 96}[c['dataset']]
    c['sigma'] = c['sigma'] or (25.0 if c['dataset'] == 'mnist' else 50.0)
    return c


def check_config(c):
    """One line saying what is wrong and what would work, for flags that argparse accepts but the run can't use."""
    mults, side = c['channel_mults'].split(','), c['image_size'] // max(c['patch'], 1)
    native = {'mnist': 28, 'cifar10': 32}.get(c['dataset'])
    problems = [
        *[(not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number, not {v}") for k, v in c.items()
          if isinstance(v, float)],  # nan passes every comparison below
        (not all(m.strip().isdigit() and int(m) > 0 for m in mults), "--channel-mults takes positive integers like '1,2,2'"),
        (native and c['image_size'] != native, f"--image-size: {c['dataset']} images are {native} pixels; only folders resize"),
        (c['patch'] < 1 or c['image_size'] % c['patch'] or side % 2 ** (len(mults) - 1),
         f"--image-size {c['image_size']} / --patch {c['patch']} must halve {len(mults) - 1} times (--channel-mults)"),
        (not re.fullmatch(r'(\d+(,\d+)*)?', c['attn_res'].replace(' ', '')), "--attn-res takes resolutions like '7' or '16,8'"),
        (c['channels'] % 8 != 0 or c['channels'] <= 0, '--channels must be a positive multiple of 8 (GroupNorm uses 8 groups)'),
        (c['sigma'] <= 1, '--sigma must exceed 1 (VE std(t)^2 = (sigma^2t - 1) / (2 log sigma))'),
        (not 0 < c['beta_min'] < c['beta_max'], '--beta-min and --beta-max need 0 < min < max'),
        (not 0 < c['eps'] <= c['sample_eps'] < 1, '--eps and --sample-eps need 0 < eps <= sample_eps < 1'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every'], c['steps']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every, --log-every and --steps must be at least 1'),
        (min(c['train_images'], c['max_steps'], c['likelihood_images'], c['warmup']) < 0,
         '--train-images, --max-steps, --likelihood-images and --warmup are counts, 0 = default/off'),
        (c['eval_samples'] < 20, '--eval-samples must be at least 20'),
        (not set(c['eval_samplers'].replace(' ', '').split(',')) <= {'em', 'em2', 'pc', 'ode', ''},
         "--eval-samplers takes a comma-separated list of em, em2, pc and ode"),
        (not (c['lr'] > 0 and 0 <= c['ema'] < 1 and c['snr'] > 0 and c['ode_tol'] > 0 and 0 <= c['dropout'] < 1
              and c['grad_clip'] >= 0), 'need --lr, --snr, --ode-tol > 0, 0 <= --ema < 1, 0 <= --dropout < 1, --grad-clip >= 0'),
        (c['resume'] + c['sample_only'] + c['overwrite'] > 1, '--resume, --sample-only, --overwrite: pick one'),
    ]
    for bad, why in problems:
        if bad:
            raise SystemExit(f'score_sde.py: {why}')

# ---- sde ----
SDE = namedtuple('SDE', 'kind sigma beta_min beta_max')


def make_sde(c):
    return SDE(c['sde'], c['sigma'], c['beta_min'], c['beta_max'])


def marginal_mean_std(sde, t):
    """p_0t(x(t) | x(0)) = N(mean x(0), std^2 I) for tensor t. VE: std^2 = int_0^t sigma^2s ds = (sigma^2t - 1) /
    (2 log sigma). VP (eq. 33): log mean = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2, std^2 = 1 - mean^2."""
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
    """The std of p_1's stand-in N(0, std^2 I): VE's marginal std at t = 1 (the data's mean is negligible beside
    it), VP's 1."""
    return marginal_mean_std(sde, torch.tensor(1.0, dtype=torch.float64))[1].item() if sde.kind == 've' else 1.0


def reverse_drift(sde, x, t, score, ode=False):
    """The drift of the reverse SDE, f - g^2 score (eq. 6), or of the probability-flow ODE, f - g^2 score / 2 (eq. 13)."""
    f, g = drift_diffusion(sde, x, t)
    return f - g ** 2 * score * (0.5 if ode else 1.0)


def prior_logp(sde, x):
    """log N(x; 0, prior_std^2 I) per sample of x (B, ...)."""
    s, D = prior_std(sde), x[0].numel()
    return -0.5 * D * math.log(2 * math.pi * s * s) - x.flatten(1).square().sum(1) / (2 * s * s)


def dsm_loss(score_fn, sde, x0, t, z):
    """Per-sample denoising score matching with lambda(t) = std^2: mean over pixels of |std s(x_t, t) + z|^2, where
    x_t = mean x0 + std z, so -z / std is the score of p_0t(x_t | x0) (eq. 7)."""
    mean, std = marginal_mean_std(sde, t.view(-1, *[1] * (x0.dim() - 1)))
    return (std * score_fn(mean * x0 + std * z, t) + z).square().flatten(1).mean(1)


# ---- model ----
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
    """-std(t) x score, from the scaled x_t and t (the DDPM U-Net of ddpm_mnist.py, with Gaussian Fourier features
    of t, Tancik et al. 2020, in place of the sinusoidal embedding). Per resolution, res_blocks ResBlocks down
    (attention after each where listed) then a stride-2 conv; the middle is ResBlock, attention, ResBlock; up,
    res_blocks + 1 ResBlocks, each fed the matching skip."""
    def __init__(self, in_ch=1, size=28, channels=32, mults=(1, 2), res_blocks=2, attn_res=(7,), dropout=0.0, patch=2,
                 fourier_scale=16.0):
        super().__init__()
        tdim, res = 4 * channels, size // patch
        self.patch = patch
        self.register_buffer('freqs', torch.randn(channels // 2) * fourier_scale)  # fixed, saved with the weights
        self.temb = nn.Sequential(nn.Linear(channels, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.inp = nn.Conv2d(in_ch * patch ** 2, channels, 3, padding=1)
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
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, in_ch * patch ** 2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x, t):  # x (B, C, S, S), t (B,) in [0, 1] -> (B, C, S, S)
        a = 2 * math.pi * t.float()[:, None] * self.freqs  # (B, channels / 2)
        temb = self.temb(torch.cat([a.sin(), a.cos()], 1))
        h = self.inp(F.pixel_unshuffle(x, self.patch))  # (B, channels, S / patch, S / patch)
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
    """The network contract, for a forker who swaps in another: net(x, t) -> out, with x (B, C, S, S) the noisy image
    already scaled by c_in (score_model does that) and t (B,) continuous times in [eps, 1]; out has x's shape, and
    score_model turns it into the score out / std(t). The loop also uses .parameters(), .state_dict() and
    .train()/.eval(), nothing else."""
    mults = tuple(int(m) for m in c['channel_mults'].split(','))
    attn = tuple(int(r) for r in c['attn_res'].replace(' ', '').split(',') if r)
    in_ch = 1 if c['dataset'] == 'mnist' else 3
    return UNet(in_ch, c['image_size'], c['channels'], mults, c['res_blocks'], attn, c['dropout'], c['patch'], c['fourier_scale'])


def score_model(net, sde):
    """score(x, t) = net(c_in x, t) / std(t) with c_in = 1 / sqrt(mean^2 0.5^2 + std^2), t (B,)."""
    def score_fn(x, t):
        mean, std = marginal_mean_std(sde, t.view(-1, 1, 1, 1))
        return net(x / (0.25 * mean ** 2 + std ** 2).sqrt(), t).float() / std
    return score_fn


# ---- sampling ----
@torch.no_grad()
def em_sampler(score_fn, sde, shape, steps, eps, generator=None, device='cpu', corrector_snr=0.0):
    """Euler-Maruyama on the reverse SDE over the steps intervals of linspace(1, eps, steps + 1): x <- x - (f - g^2 s)
    dt + g sqrt(dt) z, returning the last step's mean. corrector_snr > 0 makes it PC (Algorithm 1): a Langevin step
    x <- x + e s + sqrt(2e) z, e = 2 alpha (snr |z| / |s|)^2, before each predictor step. Returns (x, NFE).
    (The reference code steps from each of linspace(1, eps, N) by (1 - eps) / (N - 1), so its last step ends below
    t = 0; there, 1 - g^2 dt / std^2 multiplies the remaining noise by -9 on VE at N = 100, and speckles the images.)"""
    x = torch.randn(shape, generator=generator, device=device) * prior_std(sde)
    ts = torch.linspace(1, eps, steps + 1, dtype=torch.float64).tolist()
    for t, t_next in zip(ts[:-1], ts[1:]):
        dt, vec_t, tt = t - t_next, torch.full(shape[:1], t, device=device), torch.tensor(t)
        if corrector_snr:
            s, z = score_fn(x, vec_t), torch.randn(shape, generator=generator, device=device)
            alpha = 1.0 if sde.kind == 've' else 1 - (sde.beta_min + t * (sde.beta_max - sde.beta_min)) * dt
            norm = lambda v: v.flatten(1).norm(dim=1).mean()  # over the batch: per sample biases it (docstring)
            e = 2 * alpha * (corrector_snr * norm(z) / norm(s)) ** 2
            x = x + e * s + (2 * e).sqrt() * z
        mean = x - reverse_drift(sde, x, tt, score_fn(x, vec_t)) * dt
        x = mean + drift_diffusion(sde, x, tt)[1] * math.sqrt(dt) * torch.randn(shape, generator=generator, device=device)
    return mean, steps * (2 if corrector_snr else 1)


def rk45(fun, t0, t1, y0, rtol, atol):
    """Dormand-Prince 5(4) with adaptive steps, the method and step control of scipy's solve_ivp('RK45'): error
    = RMS of (5th - 4th order) / (atol + rtol max(|y|, |y_new|)), step factor 0.9 err^(-1/5) within [0.2, 10],
    first-same-as-last. Returns (y(t1), the number of fun calls)."""
    C = (0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1)
    A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9), (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656))
    B = (35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)
    E = (-71 / 57600, 0, 71 / 16695, -71 / 1920, 17253 / 339200, -22 / 525, 1 / 40)  # 4th minus 5th order weights
    rms = lambda v: v.square().mean().sqrt().item()
    t, y, k1, nfe = t0, y0, fun(t0, y0), 1
    d0, d1 = rms(y0 / (atol + rtol * y0.abs())), rms(k1 / (atol + rtol * y0.abs()))
    h = abs(t1 - t0) * 1e-3 if min(d0, d1) < 1e-5 else min(0.01 * d0 / d1, abs(t1 - t0))  # scipy's first guess
    sign = 1 if t1 > t0 else -1
    while sign * (t1 - t) > 0:
        h = min(h, abs(t1 - t))
        ks = [k1]
        for c_i, a_i in zip(C[1:], A[1:]):
            ks.append(fun(t + sign * h * c_i, y + sign * h * sum(a * k for a, k in zip(a_i, ks))))
        y_new = y + sign * h * sum(b * k for b, k in zip(B, ks))
        ks.append(fun(t + sign * h, y_new))
        nfe += 6
        err = rms(sign * h * sum(e * k for e, k in zip(E, ks)) / (atol + rtol * torch.maximum(y.abs(), y_new.abs())))
        if err <= 1:
            t, y, k1 = t + sign * h, y_new, ks[-1]
        h *= min(10.0, max(0.2, 0.9 * max(err, 1e-10) ** -0.2)) if err <= 1 else max(0.2, 0.9 * err ** -0.2)
    return y, nfe


@torch.no_grad()
def ode_sampler(score_fn, sde, shape, eps, tol=1e-5, generator=None, device='cpu'):
    """The probability-flow ODE dx/dt = f - g^2 s / 2 (eq. 13) from x(1) ~ prior to t = eps by RK45, then one
    denoising step to E[x(0) | x(eps)] = (x + std^2 s) / mean (Tweedie; the reference code's noise_removal): the ODE
    stops with std(eps) of noise left, 8 levels of 255 on VE. Returns (x, NFE)."""
    def fun(t, x):
        return reverse_drift(sde, x, torch.tensor(t), score_fn(x, torch.full(shape[:1], t, device=device)), ode=True)
    x, nfe = rk45(fun, 1.0, eps, torch.randn(shape, generator=generator, device=device) * prior_std(sde), tol, tol)
    mean, std = marginal_mean_std(sde, torch.tensor(eps))
    return (x + std ** 2 * score_fn(x, torch.full(shape[:1], eps, device=device))) / mean, nfe + 1


def ode_log_likelihood(score_fn, sde, x, eps, tol=1e-5, generator=None):
    """log p_0(x) per sample (nats) = log p_1(x(1)) + int_eps^1 div f~(x(t), t) dt, integrating x and the divergence
    together from eps to 1 (appendix D.2); div f~ ~ z^T (df~/dx) z with one Rademacher z per sample (Hutchinson),
    z^T J by a vector-Jacobian product. Returns (log p, NFE)."""
    B = len(x)
    z = torch.randint(0, 2, x.shape, generator=generator, device=x.device).float() * 2 - 1

    def fun(t, y):  # y (B, D + 1): the flattened x and the running integral of the divergence
        with torch.enable_grad():
            xt = y[:, :-1].reshape(x.shape).detach().requires_grad_(True)
            drift = reverse_drift(sde, xt, torch.tensor(t), score_fn(xt, torch.full((B,), t, device=x.device)), ode=True)
            div = (torch.autograd.grad((drift * z).sum(), xt)[0] * z).flatten(1).sum(1)
        return torch.cat([drift.detach().flatten(1), div[:, None]], 1)
    y, nfe = rk45(fun, eps, 1.0, torch.cat([x.flatten(1), x.new_zeros(B, 1)], 1), tol, tol)
    return prior_logp(sde, y[:, :-1].reshape(x.shape)) + y[:, -1], nfe


def data_range(c):
    """(low, high) of the training data: [0, 1] for VE as in the seed, [-1, 1] for VP (centred, as DDPM)."""
    return (0.0, 1.0) if c['sde'] == 've' else (-1.0, 1.0)


def bits_per_dim(score_fn, sde, images, c, generator=None):
    """Bits/dim of uint8 images (B, C, S, S): x = (k + u) / 256 on the data range, u ~ U(0, 1) (uniform
    dequantisation), -log2 p(x) / D + log2(256 / width): the density on the range turned into mass per 8-bit bin."""
    lo, hi = data_range(c)
    u = torch.rand(images.shape, generator=generator, device=images.device)
    x = lo + (hi - lo) * (images.float() + u) / 256
    logp, nfe = ode_log_likelihood(score_fn, sde, x, c['eps'], c['ode_tol'], generator)
    return -logp / (x[0].numel() * math.log(2)) + math.log2(256 / (hi - lo)), nfe


def sample_with(score_fn, sde, method, n, c, generator, dev):
    """n images (n, C, S, S) in [0, 255] uint8 on the CPU, in batches of 500, and the NFE of one batch."""
    shape = (1 if c['dataset'] == 'mnist' else 3, c['image_size'], c['image_size'])
    lo, hi = data_range(c)
    out, nfe = [], 0
    for b in range(0, n, 500):
        sh = (min(500, n - b),) + shape
        if method == 'ode':
            x, nfe = ode_sampler(score_fn, sde, sh, c['sample_eps'], c['ode_tol'], generator, dev)
        else:
            x, nfe = em_sampler(score_fn, sde, sh, c['steps'] if method != 'em2' else 2 * c['steps'], c['sample_eps'],
                                generator, dev, c['snr'] if method == 'pc' else 0.0)
        out.append(((x.cpu() - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out), nfe


# ---- data ----
def open_rgb(path):
    """An image file as 8-bit RGB; 16-bit grey (PIL's I;16 modes) scaled by 1/257 first, since convert('RGB')
    clips it (such images came out white)."""
    from PIL import Image
    img = Image.open(path)
    if img.mode.startswith('I;16'):
        img = Image.fromarray((np.asarray(img, np.float64) / 257).round().astype(np.uint8))
    return img.convert('RGB')


def load_images(c, train=True):
    """uint8 images (N, C, S, S) and labels (N,) (-1 for folders): MNIST or CIFAR-10 through torchvision (downloaded
    when missing), or every image under data_dir, centre-cropped and resized to image_size, read into memory once."""
    root = os.path.abspath(c['data_dir'])
    if c['dataset'] == 'folder':
        from PIL import Image, ImageOps
        exts = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(exts))
        if not files:
            raise SystemExit(f'score_sde.py: no images ({", ".join(exts)}) in {root} or its sub-folders; pass --data-dir')
        def read(f):
            try:
                return np.array(ImageOps.fit(open_rgb(f), (c['image_size'],) * 2, Image.BICUBIC))
            except OSError as e:  # PIL's UnidentifiedImageError and truncated files
                raise SystemExit(f'score_sde.py: cannot read {f} as an image ({type(e).__name__}); remove or fix it') from None
        x = np.stack([read(f) for f in files])
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.full((len(x),), -1)
    from torchvision.datasets import CIFAR10, MNIST
    try:
        ds = (MNIST if c['dataset'] == 'mnist' else CIFAR10)(root, train=train, download=True)
    except Exception as e:  # no network, or a damaged file
        where, what = (('MNIST/raw', 'train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and '
                        't10k-labels-idx1-ubyte (or their .gz)') if c['dataset'] == 'mnist' else
                       ('cifar-10-batches-py', 'the extracted cifar-10-python.tar.gz (data_batch_1..5, test_batch, '
                        'batches.meta)'))
        if os.path.isdir(os.path.join(root, where)) and os.listdir(os.path.join(root, where)):  # a file unreadable
            raise SystemExit(f'score_sde.py: {c["dataset"]} under {os.path.join(root, where)} cannot be read '
                             f'({type(e).__name__}: {str(e)[:90]}); a file there is truncated or damaged, or one is '
                             'missing: replace it') from None
        raise SystemExit(f'score_sde.py: no {c["dataset"]} under {os.path.join(root, where)} and the download failed '
                         f'({type(e).__name__}); put {what} there, or pass --data-dir') from None
    if c['dataset'] == 'mnist':
        return ds.data[:, None].contiguous(), ds.targets
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


class Classifier(nn.Module):
    """The MNIST judge of ddpm_mnist.py: two conv-pool layers, a 128-d feature layer (the Frechet features), 10 logits."""
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.feat, self.head = nn.Linear(64 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x):  # uint8-valued (B, 1, 28, 28) scaled to [-1, 1] -> (features (B, 128), logits (B, 10))
        f = F.relu(self.feat(self.conv(x)))
        return f, self.head(f)


@torch.no_grad()
def judge(net, images, dev):
    outs = [net(b.to(dev).float() / 127.5 - 1) for b in images.split(500)]
    return torch.cat([o[0] for o in outs]).double().cpu(), torch.cat([o[1] for o in outs]).float().cpu()


def get_classifier(c, dev, path):
    """The judge at path, or trained as ddpm_mnist.py trains it (5 epochs, Adam 1e-3 cosine-decayed; 99.0%)."""
    net = Classifier().to(dev)
    if os.path.exists(path):
        try:
            net.load_state_dict(torch.load(path, map_location=dev, weights_only=True))
        except Exception as e:  # not a file torch can read, or another network's weights
            raise SystemExit(f'score_sde.py: {path} is not the MNIST judge\'s weights ({type(e).__name__}); pass the '
                             'classifier.pt a run wrote, or --classifier \'\' to train one') from None
        return net.eval()
    x, y = load_images(c)
    g = torch.Generator().manual_seed(c['seed'])
    epochs, steps = 5, math.ceil(len(x) / 128)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / (epochs * steps))))
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            loss = F.cross_entropy(net(x[idx].to(dev).float() / 127.5 - 1)[1], y[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    xt, yt = load_images(c, train=False)
    acc = (judge(net.eval(), xt, dev)[1].argmax(1) == yt).float().mean().item()
    print(f'eval | classifier trained ({epochs} epochs): test accuracy {acc:.2%} | saved to {path}')
    write_whole(path, lambda tmp: torch.save(net.state_dict(), tmp))
    return net


def frechet(a, b):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) of two feature sets (N, D), by eigh (no scipy)."""
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


def quality(net, images, f_test, dev):
    """' | confident ... | KL ... | frechet ...' of uint8 MNIST images, judged by net against the test features."""
    f, logits = judge(net, images, dev)
    p = logits.softmax(1)
    hist = torch.bincount(p.argmax(1), minlength=10).double() / len(p)
    kl = (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item()
    return f' | confident (p >= 0.9) {(p.max(1).values >= 0.9).float().mean():.1%} | KL(classes || uniform) {kl:.4f} | ' \
           f'frechet {frechet(f, f_test):.2f}'


def evaluate(c, model, dev, out):
    """For each sampler: NFE, seconds for eval_samples samples, a grid, and on MNIST the judge's figures (with real
    training images as the reference line); then bits/dim on likelihood_images test images."""
    sde, score_fn, n = make_sde(c), score_model(model, make_sde(c)), c['eval_samples']
    net = get_classifier(c, dev, c['classifier'] or os.path.join(out, 'classifier.pt')) if c['dataset'] == 'mnist' else None
    f_test = judge(net, load_images(c, train=False)[0], dev)[0] if net else None
    if net:
        x_train = load_images(c)[0]
        real = x_train[torch.randperm(len(x_train), generator=torch.Generator().manual_seed(c['seed']))[:n]]
        print(f'eval | {n} training images' + quality(net, real, f_test, dev))
    for method in [m for m in c['eval_samplers'].replace(' ', '').split(',') if m]:
        g, t0 = torch.Generator(dev).manual_seed(c['seed'] + 1), time.time()
        x, nfe = sample_with(score_fn, sde, method, n, c, g, dev)
        name = {'em': f"em {c['steps']} steps", 'em2': f"em {2 * c['steps']} steps", 'pc': f"pc {c['steps']} steps",
                'ode': f"ode rk45 tol {c['ode_tol']:g}"}[method]
        line = f'eval | {name} | NFE {nfe} | {n} samples in {time.time() - t0:.0f}s'
        print(line + (quality(net, x, f_test, dev) if net else ''), flush=True)
        save_grid(x[:100], os.path.join(out, f'samples_{method}.png'))
    if c['likelihood_images']:
        images = load_images(c, train=c['dataset'] == 'folder')[0][:c['likelihood_images']].to(dev)
        t0 = time.time()
        bpd, nfe = bits_per_dim(score_fn, sde, images, c, torch.Generator(dev).manual_seed(c['seed'] + 2))
        print(f"eval | bits/dim on {len(bpd)} {'training' if c['dataset'] == 'folder' else 'test'} images {bpd.mean():.3f} "
              f"+- {bpd.std() / math.sqrt(len(bpd)):.3f} | NFE {nfe} | {time.time() - t0:.0f}s")


# ---- train ----
def pick_device(name, local_rank=0):
    """'auto' is cuda, then mps, then cpu; any other name must parse and be present. Under torchrun each process takes
    the GPU of its LOCAL_RANK, and more processes than GPUs stop here, in every process, with the same line."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"score_sde.py: --device '{name}' is not a torch device; try cpu, cuda or auto") from None
    if not {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(dev.type, lambda: True)():
        raise SystemExit(f'score_sde.py: --device {name} is not available on this machine; try --device auto')
    if dev.type == 'cuda' and dev.index is None:
        gpus, procs = torch.cuda.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if procs > gpus:
            raise SystemExit(f'score_sde.py: torchrun started {procs} processes on a machine with {gpus} GPU(s); use '
                             f'--nproc_per_node={gpus} (one process per GPU), or --device cpu')
        dev = torch.device('cuda', local_rank)
    if dev.type == 'cuda' and dev.index >= torch.cuda.device_count():
        raise SystemExit(f'score_sde.py: --device {name}: this machine has {torch.cuda.device_count()} GPU(s), '
                         f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    return dev


def load_checkpoint(path, c):
    """The checkpoint at path, checked to come from this script with the same data, SDE and architecture."""
    if not os.path.exists(path):
        raise SystemExit(f'score_sde.py: no checkpoint at {path}; train first, or point --out-dir at the run')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'score_sde.py: {path} is not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('script') != 'score_sde.py':
        script = ckpt.get('script') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f'score_sde.py: {path} was not written by score_sde.py (script: {script})')
    differ = [f"{k} {ckpt['config'][k]!r} (flag {c[k]!r})" for k in ARCH if ckpt['config'][k] != c[k]]
    if differ:
        raise SystemExit(f"score_sde.py: {path} has a different model: {', '.join(differ)}; pass the checkpoint's values")
    return ckpt


def save_checkpoint(path, model, ema, opt, scaler, step, epoch, c):
    """Written whole to a temporary file, then renamed over the last one: a kill mid-save keeps that one."""
    write_whole(path, lambda tmp: torch.save({
        'model': model.state_dict(), 'ema': ema.state_dict(), 'optimizer': opt.state_dict(),
        'scaler': scaler.state_dict(), 'step': step, 'epoch': epoch, 'config': c, 'script': 'score_sde.py'}, tmp))


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
        raise SystemExit(f'score_sde.py: could not write {path} ({str(e)[:100]}; {size / 2**20:.0f} MB '
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
        raise SystemExit(f'score_sde.py: {path} holds a run; continue it with --resume true, or start over '
                         'with --overwrite true or another --out-dir')
    try:
        os.makedirs(c['out_dir'], exist_ok=True)
    except OSError as e:
        raise SystemExit(f"score_sde.py: cannot make --out-dir {c['out_dir']} ({e.strerror})") from None


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
    """x on the device if it takes under a quarter of the free GPU memory (CIFAR-10: 150 MB of uint8), else on the host."""
    fits = dev.type != 'cuda' or x.nbytes < torch.cuda.mem_get_info(dev)[0] / 4
    return x.to(dev) if fits else x


def train(c, dev, out, rank, world):
    """Step s draws t and z for the whole global batch on the device from a generator seeded by (seed, s), and rank r
    takes rows r, r + world, ...: DistributedSampler deals epoch e's order (seeded by (seed, e)) out the same way, so
    any number of processes trains the same model as one, and --resume continues exactly without saving RNG state.
    Nothing waits for the device in a step: the loss's finiteness and a stop signal are acted on at each log and save."""
    from torch.utils.data import DistributedSampler
    path = os.path.join(out, 'ckpt.pt')
    ckpt = load_checkpoint(path, c) if c['resume'] else None  # before the data: a wrong checkpoint fails at once
    for k in ('batch_size', 'seed') if ckpt and rank == 0 else ():  # they set the data order and the noise
        if ckpt['config'][k] != c[k]:
            print(f"note: --{k.replace('_', '-')} {c[k]}, where the checkpoint has {ckpt['config'][k]}: the run goes on, "
                  "not as the checkpoint's run would have")
    images = on_device(load_images(c)[0][:c['train_images'] or None], dev)
    if rank == 0:
        write_run_files(c)
    sde, (lo, hi) = make_sde(c), data_range(c)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format  # EMA in the model's layout
    model = make_model(c).to(dev, memory_format=layout)
    ema = make_model(c).to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=c['lr'], weight_decay=0.0, fused=dev.type == 'cuda')
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
    score_fn = score_model(net, sde)
    B, per_rank = c['batch_size'], c['batch_size'] // world
    sampler = DistributedSampler(range(len(images)), num_replicas=world, rank=rank, shuffle=True, seed=c['seed'], drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise SystemExit(f"score_sde.py: {len(images)} training images make no batch of {B}; lower --batch-size")
    total = c['epochs'] * steps_per_epoch  # the lr schedule's length; --max-steps stops early without changing it
    stop = min(total, c['max_steps'] or total)
    lr_at = lambda s: c['lr'] * min(1, (s + 1) / (c['warmup'] + 1)) * 0.5 * (1 + math.cos(math.pi * min(1, s / total)))
    if rank == 0:
        print(f"data: {len(images):,} {c['dataset']} images {tuple(images.shape[1:])} in [{lo:g}, {hi:g}] | {sde.kind} SDE"
              f"{f', sigma {sde.sigma:g}' if sde.kind == 've' else ''} | U-Net {sum(p.numel() for p in model.parameters()):,} "
              f"parameters | {dev}, {c['dtype']}, {world} process(es) | {stop} of {total} steps of batch {B}"
              + (f' | resumed at step {step}' if step else ''))
    first = step  # this run's first step (step moves on while the batches are drawn, and a loader draws ahead)

    def order():  # this rank's rows of the data for steps step .. stop - 1, epoch by epoch
        for epoch in range(first // steps_per_epoch, math.ceil(stop / steps_per_epoch)):
            sampler.set_epoch(epoch)
            rows = torch.tensor(list(sampler))[:steps_per_epoch * per_rank].view(steps_per_epoch, per_rank)
            yield from rows.to(images.device)[max(0, first - epoch * steps_per_epoch):stop - epoch * steps_per_epoch]
    g = torch.Generator(dev)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    losses, curve, t_win, s_win = [], [], time.time(), step
    caught, restore_signals = catch_stop_signals()
    try:
        for idx in order():
            # noise draw: this step's t and z for the global batch; this rank's rows
            g.manual_seed((c['seed'] * 1_000_003 + step) * 1024)  # rank 0's seed before the draws were global
            t = (c['eps'] + (1 - c['eps']) * torch.rand(B, generator=g, device=dev))[rank::world]
            z = torch.randn((B,) + images.shape[1:], generator=g, device=dev)[rank::world].contiguous(memory_format=layout)
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + 1 + rank)  # dropout, apart from g's stream
            x0 = (lo + (hi - lo) * images[idx].to(dev, non_blocking=True).float() / 255).contiguous(memory_format=layout)
            # loss (eq. 7)
            with autocast:
                loss = dsm_loss(score_fn, sde, x0, t, z).mean()
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
                raise SystemExit(f'score_sde.py: {what} in steps {step - len(losses) + 1}-{step}; '
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
                raise SystemExit(f'score_sde.py: interrupted at step {step} ({why}); saved {path}; '
                                 'continue with --resume true')
            t_win = time.time() if log else t_win + time.time() - t_pause
    finally:
        restore_signals()
    return ema.eval(), curve


def save_grid(images, path, nrow=10):
    """uint8 (N, C, S, S) -> one PNG, nrow images per row, 1-pixel gaps."""
    import matplotlib.pyplot as plt
    imgs, S = images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy(), images.shape[-1]  # (N, S, S, 3)
    rows = math.ceil(len(imgs) / nrow)
    grid = np.zeros((rows * (S + 2), nrow * (S + 2), 3), np.uint8)
    for i, im in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[r * (S + 2) + 1:r * (S + 2) + 1 + S, col * (S + 2) + 1:col * (S + 2) + 1 + S] = im
    write_whole(path, lambda tmp: plt.imsave(tmp, grid))


def figures(c, model, dev, out, curve):
    """The grid of the configured sampler and the loss curve."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g = torch.Generator(dev).manual_seed(c['seed'])
    save_grid(sample_with(score_model(model, make_sde(c)), make_sde(c), c['sampler'], c['n_samples'], c, g, dev)[0],
              os.path.join(out, 'samples.png'))
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
        raise SystemExit('score_sde.py: --dtype float16 needs CUDA; use bfloat16 or float32 here')
    torch.backends.cudnn.benchmark = dev.type == 'cuda'  # the fastest convolution algorithms for these shapes
    if c['batch_size'] % world:
        raise SystemExit(f"score_sde.py: --batch-size {c['batch_size']} does not split across {world} processes")
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
            model = make_model(c).to(dev)
            model.load_state_dict(ckpt['ema'])
            g, t0 = torch.Generator(dev).manual_seed(c['seed']), time.time()
            x, nfe = sample_with(score_model(model.eval(), make_sde(c)), make_sde(c), c['sampler'], c['n_samples'], c, g, dev)
            write_whole(os.path.join(c['out_dir'], 'samples.npz'),
                        lambda tmp: np.savez(tmp, images=x.permute(0, 2, 3, 1).numpy()))
            save_grid(x[:100], os.path.join(c['out_dir'], 'samples.png'))
            print(f"wrote {len(x)} samples ({c['sampler']}, NFE {nfe} per batch, {time.time() - t0:.0f}s) to "
                  f"{c['out_dir']}/samples.npz (images: uint8, N x H x W x C) and samples.png")
        else:
            model, curve = train(c, dev, c['out_dir'], rank, world)
            if rank == 0:
                figures(c, model, dev, c['out_dir'], curve)
        if c['eval'] and rank == 0:
            evaluate(c, model.eval(), dev, c['out_dir'])
    except KeyboardInterrupt:  # Ctrl-C while sampling, drawing or evaluating (training saved its checkpoint)
        raise SystemExit(f"score_sde.py: interrupted after training; {c['out_dir']}/ckpt.pt is saved"
                         ) from None
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
