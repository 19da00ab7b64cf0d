"""
The GAN baseline the diffusion scripts are compared against: DCGAN, WGAN-GP and hinge losses on
MNIST, CIFAR-10 or an image folder, and on 2D Gaussian mixtures where mode collapse can be counted.

Losses on discriminator logits D(x), with r = D(real), f = D(G(z)):
  'bce'     Goodfellow et al. 2014 (eq. 1): D minimises -log sigmoid(r) - log(1 - sigmoid(f)); G the
            non-saturating -log sigmoid(f), or with --saturating true the min-max form
            log(1 - sigmoid(f)), whose gradient vanishes where D rejects the fakes confidently.
  'wgan-gp' Gulrajani et al. 2017 (Algorithm 1): the critic minimises f - r + lambda
            (|grad D(x_hat)| - 1)^2, x_hat = u real + (1 - u) fake, u ~ U(0, 1) per sample; G
            minimises -f; 5 critic steps per G step, no batch norm in the critic, Adam (0.5, 0.9).
  'hinge'   Lim & Ye 2017, Miyato et al. 2018: D minimises relu(1 - r) + relu(1 + f); G -f.
Networks: DCGAN (Radford et al. 2016): G maps z ~ N(0, I) through transposed convolutions (batch
norm, ReLU) to tanh images; D mirrors it (stride-2 convolutions, LeakyReLU 0.2, batch norm but on
the first layer and for wgan-gp); --spectral-norm wraps every D layer (Miyato et al.; no batch
norm). MNIST is padded from 28 to 32 pixels (cropped back for the judge and samples.npz).
--augment: DiffAugment (Zhao et al. 2020), the same random translation, colour and cutout on real
and fake images wherever D sees them. Toy mode, --dataset ring8 | grid25: 8 Gaussians (std 0.02) on
a circle of radius 2, or 25 (std 0.05) on {-4, -2, 0, 2, 4}^2, MLPs; a mode is covered when at
least 20% of its uniform share of 2,500 samples lies within 3 std of it (PacGAN, Lin et al. 2018).
PRESETS['toy'] takes lambda = 1: the paper's 10 covered 0 of 25 modes in as many steps, and its
authors' toy code uses 0.1, which covered 25, 24, 20 on seeds 0-2, against 25, 25, 25 at 1.
Evals every --fid-every epochs: modes (toy); on MNIST the judge below; with --fid N, FID and IS.

Run (times on a 2-core CPU; the README has the figures):
    python gan_baseline.py --dataset grid25 --loss wgan-gp         # 25/25 modes, 2.6 min
    python gan_baseline.py --dataset grid25 --loss bce             # the plain GAN
    python gan_baseline.py                                         # DCGAN digits (MNIST)
    python gan_baseline.py --dataset cifar10 --loss hinge --spectral-norm true --fid 10000
    torchrun --nproc_per_node=2 gan_baseline.py --dataset folder --data-dir ffhq --image-size 64
    python gan_baseline.py --dataset cifar10 --train-images 1000 --augment translation,color,cutout
    python gan_baseline.py --sample-only true --n-samples 1000     # samples.npz and a grid
    python gan_baseline.py --resume true                           # continue exactly
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
data_dir = './data'           # torchvision's MNIST / CIFAR-10 root, or the image folder
dataset = 'mnist'             # 'mnist' | 'cifar10' | 'folder' | 'ring8' | 'grid25'
image_size = 0                # side in pixels, 4 * 2^k; 0 = 32 (mnist padded, cifar10), 64 (folder)
out_dir = 'out/gan'           # ckpt.pt, figures, samples.npz, config.json and a copy of this file
loss = 'bce'                  # 'bce' | 'wgan-gp' | 'hinge'
saturating = False            # bce: G minimises log(1 - D(G(z))), the min-max form
gp_lambda = 10.0              # wgan-gp: weight of the gradient penalty (toy mode: 1)
n_critic = 0                  # D steps per G step; 0 = 5 for wgan-gp, 1 otherwise
spectral_norm = False         # spectral normalisation of every D layer (and no batch norm in D)
augment = ''                  # DiffAugment: comma-separated translation, color, cutout; '' = off
z_dim = 100                   # latent dimensions (toy mode: 2)
channels = 64                 # G and D width at the finest resolution (DCGAN's ngf = ndf)
hidden = 128                  # toy mode: width of the MLPs' 3 hidden layers
toy_points = 100_000          # toy mode: training points drawn once from the mixture
epochs = 20                   # passes over the training data (D batches); toy mode: 60
batch_size = 64               # global, split across DDP ranks; toy mode: 256
lr = 2e-4                     # Adam learning rate of G and D, constant; toy mode: 1e-3
beta1 = 0.5                   # Adam beta1
beta2 = 0.0                   # Adam beta2; 0 = 0.9 for wgan-gp, 0.999 otherwise
ema = 0.0                     # decay of G's weight average, sampled from; 0 = off; toy: 0.999
train_images = 0              # 0 = all; fewer for the small-data mode
workers = 4                   # DataLoader processes decoding a folder; 0 = in the main process
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval_samples = 1000           # samples the evals score (toy: 2,500)
fid_every = 1                 # epochs between evals during training; 0 = only at the end
fid = 0                       # samples scored by FID and IS at each eval (torch-fidelity); 0 = off
fid_weights = ''              # torch-fidelity's Inception weights, offline; '' = download once
classifier = ''               # the judge's weights; '' = out_dir/classifier.pt, trained if missing
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, mps, cpu
dtype = 'auto'                # 'auto' | 'float32' | 'bfloat16' | 'float16': auto: bf16 if native
compile = False               # torch.compile G and D for training
resume = False                # continue the run in out_dir: its config, changed by the flags given
overwrite = False             # start over in an out_dir that holds a checkpoint
sample_only = False           # load out_dir/ckpt.pt, write samples.npz and a grid
max_steps = 0                 # stop after this many D steps; 0 = all epochs
save_every = 1000             # steps between checkpoints
log_every = 200               # steps between progress lines
seed = 0                      # data order, latents, initial weights

PRESETS = {'toy': dict(z_dim=2, hidden=128, batch_size=256, lr=1e-3, gp_lambda=1.0, ema=0.999,
                       epochs=60, eval_samples=2500, n_samples=2500, fid_every=10, log_every=2000,
                       save_every=5000)}
ARCH = ('dataset', 'image_size', 'loss', 'spectral_norm', 'z_dim', 'channels', 'hidden')
TOYS = ('ring8', 'grid25')

def finish_config(c, given):
    if c['dataset'] in TOYS:
        c.update({k: v for k, v in PRESETS['toy'].items() if k not in given})
    c['image_size'] = c['image_size'] or (2 if c['dataset'] in TOYS else
                                          64 if c['dataset'] == 'folder' else 32)
    c['n_critic'] = c['n_critic'] or (5 if c['loss'] == 'wgan-gp' else 1)
    c['beta2'] = c['beta2'] or (0.9 if c['loss'] == 'wgan-gp' else 0.999)
    return c

def check_config(c):
    """One line saying what is wrong and what would work, for flags a run cannot use."""
    s, toy = c['image_size'], c['dataset'] in TOYS
    refuse(c, [
        (c['dataset'] in ('mnist', 'cifar10') and s != 32, f"--image-size: {c['dataset']} runs "
         'at 32 pixels'),
        (not toy and (s < 16 or s & (s - 1)), f'--image-size {s}: DCGAN needs 4 * 2^k pixels'),
        (toy and s != 2, '--image-size means nothing for the 2D toy datasets'),
        (set(c['augment'].replace(' ', '').split(',')) - {'translation', 'color', 'cutout', ''},
         '--augment takes a comma-separated list of translation, color and cutout'),
        (toy and c['augment'], '--augment is for images, not the 2D toy datasets'),
        (c['saturating'] and c['loss'] != 'bce', '--saturating is a form of bce: use --loss bce'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every'],
             c['z_dim'], c['channels'], c['hidden'], c['n_critic'], c['toy_points']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every, --log-every, --z-dim, --channels, '
         '--hidden, --n-critic and --toy-points must be at least 1'),
        (min(c['train_images'], c['max_steps'], c['fid_every'], c['fid'], c['workers']) < 0,
         '--train-images, --max-steps, --fid-every, --fid and --workers are counts'),
        (c['eval_samples'] < 20 or c['fid'] == 1, 'need --eval-samples >= 20 and --fid >= 2'),
        (c['fid'] and toy, '--fid scores images; the toy datasets count modes instead'),
        (not (c['lr'] > 0 and c['gp_lambda'] >= 0 and 0 <= c['ema'] < 1 and 0 <= c['beta1'] < 1
              and 0 < c['beta2'] < 1), 'need --lr > 0, --gp-lambda >= 0, 0 <= --ema < 1, '
         '0 <= --beta1 < 1, 0 < --beta2 < 1')])


# ---- loss ----
def d_loss_fn(kind, r, f):
    """The discriminator's (critic's) loss on the logits of real (r) and fake (f) batches."""
    if kind == 'bce':  # -log sigmoid(r) - log(1 - sigmoid(f)) (eq. 1), as softplus for stability
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if kind == 'wgan-gp':  # -(E D(real) - E D(fake)): minus the Kantorovich-Rubinstein W1
        return f.mean() - r.mean()
    return F.relu(1 - r).mean() + F.relu(1 + f).mean()  # hinge

def g_loss_fn(kind, f, saturating=False):
    """The generator's loss on the logits of its samples."""
    if kind == 'bce':  # non-saturating -log sigmoid(f); saturating log(1 - sigmoid(f))
        return -F.softplus(f).mean() if saturating else F.softplus(-f).mean()
    return -f.mean()  # wgan-gp and hinge

def gradient_penalty(D, real, fake, u, scale=1.0):
    """E (|grad_x D(x_hat)|_2 - 1)^2 per sample at x_hat = u real + (1 - u) fake (WGAN-GP eq. 3,
    no lambda). scale: float16's loss scale, divided back out of the gradient (PyTorch's AMP)."""
    up = lambda t: t.float() if t.element_size() < 4 else t  # autocast's half precision to float32
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(up(D(x_hat)).sum() * scale, x_hat, create_graph=True)
    return ((up(grad) / scale).flatten(1).norm(dim=1) - 1).square().mean()

def diff_augment(x, policy, generator=None):
    """DiffAugment (Zhao et al. 2020) of images in [-1, 1] (B, C, S, S), differentiable in x: per
    sample a brightness shift U(-0.5, 0.5), saturation scale U(0, 2), contrast scale U(0.5, 1.5)
    ('color'); an integer shift of up to S/8 pixels with zero fill ('translation'); a zeroed square
    of side S/2 centred anywhere ('cutout')."""
    B, C, S, _ = x.shape
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device, dtype=x.dtype)
    if 'color' in policy:
        x = x + rand(B, 1, 1, 1) - 0.5
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * 2 * rand(B, 1, 1, 1) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (rand(B, 1, 1, 1) + 0.5) + mean
    if 'translation' in policy:
        r = S // 8
        shift = (rand(B, 2) * (2 * r + 1)).floor() - r  # integers in [-r, r]
        theta = torch.zeros(B, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        theta[:, :, 2] = 2 * shift / S  # affine_grid's coordinates span 2 over S pixels
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode='nearest', padding_mode='zeros', align_corners=False)
    if 'cutout' in policy:
        centre = (rand(B, 2, 1) * S).floor()  # (B, 2, 1) row and column
        ij = torch.arange(S, device=x.device, dtype=x.dtype)
        inside = ((ij - centre).abs() < S // 4)  # (B, 2, S): rows and columns in the square
        x = x * ~(inside[:, 0, :, None] & inside[:, 1, None, :])[:, None]
    return x


# ---- model ----
def toy_modes(name):
    """The mixture's centres (K, 2) and its components' std."""
    if name == 'ring8':
        a = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
        return torch.stack([2 * a.cos(), 2 * a.sin()], 1), 0.02
    g = torch.arange(-4.0, 5.0, 2.0, dtype=torch.float64)
    return torch.cartesian_prod(g, g), 0.05

def mode_coverage(x, centres, std, min_share=0.2):
    """(modes covered, share of samples within 3 std of a mode) of points x (N, 2): a sample counts
    for its nearest centre if within 3 std; a mode is covered with min_share of its share N / K."""
    dist_min, nearest = torch.cdist(x.double(), centres.double()).min(1)
    good = dist_min < 3 * std
    counts = torch.bincount(nearest[good], minlength=len(centres))
    return int((counts >= min_share * len(x) / len(centres)).sum()), good.double().mean().item()

def mlp(n_in, hidden, n_out, wrap=lambda m: m):
    """The toy networks: 3 hidden ReLU layers."""
    return nn.Sequential(wrap(nn.Linear(n_in, hidden)), nn.ReLU(), wrap(nn.Linear(hidden, hidden)),
                         nn.ReLU(), wrap(nn.Linear(hidden, hidden)), nn.ReLU(),
                         wrap(nn.Linear(hidden, n_out)))

class Generator(nn.Module):
    """z (B, z_dim) -> images (B, C, S, S) in [-1, 1], or points (B, 2) for the toy datasets."""
    def __init__(self, z_dim, out_ch, size, channels, hidden):
        super().__init__()
        if size == 2:
            self.net = mlp(z_dim, hidden, 2)
            return
        n = int(math.log2(size // 4))  # stride-2 layers from 4x4 up to size
        ch = [channels * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 256, 128, 64 for size 32
        layers = [nn.Unflatten(1, (z_dim, 1, 1)), nn.ConvTranspose2d(z_dim, ch[0], 4, 1, 0,
                                                                      bias=False),
                  nn.BatchNorm2d(ch[0]), nn.ReLU()]  # (B, ch0, 4, 4)
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(ch[-1], out_ch, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)

class Discriminator(nn.Module):
    """Images (B, C, S, S) or points (B, 2) -> logits (B,). Batch norm only for bce and hinge
    without spectral norm."""
    def __init__(self, in_ch, size, channels, hidden, batch_norm, spectral):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        if size == 2:
            self.net = mlp(2, hidden, 1, sn)
            return
        n = int(math.log2(size // 4))
        ch = [channels * 2 ** i for i in range(n)]  # e.g. 64, 128, 256 for size 32
        layers = [sn(nn.Conv2d(in_ch, ch[0], 4, 2, 1)), nn.LeakyReLU(0.2)]
        for a, b in zip(ch, ch[1:]):
            layers += [sn(nn.Conv2d(a, b, 4, 2, 1, bias=not batch_norm))]
            layers += [nn.BatchNorm2d(b)] if batch_norm else []
            layers += [nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, sn(nn.Conv2d(ch[-1], 1, 4, 1, 0)))  # (B, 1, 1, 1)

    def forward(self, x):
        return self.net(x).flatten()

def make_models(c):
    """(G, D), DCGAN's N(0, 0.02) weights (batch norm's N(1, 0.02)) for the image networks. The
    contract, for a forker who swaps in others: G(z) -> x, z (B, z_dim) ~ N(0, I), x (B, C, S, S) in
    [-1, 1] (or points (B, 2)); D(x) -> logits (B,). The loop also uses .parameters(), .buffers()
    (G's, copied into its EMA), .state_dict(), .requires_grad_() and .train()/.eval()."""
    out_ch = 1 if c['dataset'] == 'mnist' else 3
    G = Generator(c['z_dim'], out_ch, c['image_size'], c['channels'], c['hidden'])
    D = Discriminator(out_ch, c['image_size'], c['channels'], c['hidden'],
                      c['loss'] != 'wgan-gp' and not c['spectral_norm'], c['spectral_norm'])
    if c['dataset'] not in TOYS:
        for m in list(G.modules()) + list(D.modules()):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)
    return G, D


# ---- sampling ----
def slerp(z0, z1, a):
    """Spherical interpolation per sample (Shoemake 1985): the norm stays near sqrt(z_dim), where G
    was trained, while the linear mix's midpoint has norm about sqrt(z_dim / 2)."""
    norms = z0.norm(dim=1, keepdim=True) * z1.norm(dim=1, keepdim=True)
    cos = (z0 * z1).sum(1, keepdim=True) / norms
    theta = cos.clamp(-1, 1).acos()
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

@torch.no_grad()
def sample(G, n, z_dim, generator=None, device='cpu'):
    """n outputs of G (float32, on the CPU) from z ~ N(0, I), 500 at a time."""
    z = torch.randn(n, z_dim, generator=generator, device=device)
    return torch.cat([G(b).float().cpu() for b in z.split(500)])

def images_of(x, c):
    """G's images in [-1, 1] -> uint8 (N, C, S, S), MNIST cropped from 32 back to 28 pixels."""
    x = to_uint8(x)
    return x[..., 2:30, 2:30] if c['dataset'] == 'mnist' else x


# ---- data ----
def load_data(c):
    """The training set: float32 points (N, 2) of a toy mixture, or (uint8 (C, S, S), label)."""
    if c['dataset'] not in TOYS:
        return load_dataset(c, c['dataset'], n=c['train_images'])[0]
    centres, std = toy_modes(c['dataset'])
    g, n = torch.Generator().manual_seed(c['seed']), c['toy_points']
    k = torch.randint(len(centres), (n,), generator=g)
    x = centres[k] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x.float(), torch.zeros(n))

def to_model_input(batch, c):
    """A training batch as G's outputs look: points as they are, images in [-1, 1], MNIST padded
    to 32."""
    if c['dataset'] in TOYS:
        return batch
    x = batch.float() / 127.5 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0) if c['dataset'] == 'mnist' else x


# ---- evaluation ----
class Evaluator:
    """What an eval measures, set up once: the toy mixture's modes, the MNIST judge (with real
    images as the floor), FID and IS against the training set with --fid N."""
    def __init__(self, c, dev, ds):
        self.c, self.dev, self.ds, self.judge = c, dev, ds, None
        if c['dataset'] in TOYS:
            self.centres, self.std = toy_modes(c['dataset'])
            g = torch.Generator().manual_seed(c['seed'])
            real = ds.tensors[0][torch.randperm(len(ds), generator=g)[:c['eval_samples']]]
            floor = dict(zip(('modes', 'near'), mode_coverage(real, self.centres, self.std)))
            print(f"eval | {c['eval_samples']} training points (the floor) | " + self.line(floor))
        elif c['dataset'] == 'mnist':
            self.judge = Judge(c, dev, c['eval_samples'])

    def __call__(self, G):
        """The figures of eval_samples samples of G (and of fid samples for FID and IS)."""
        c, n = self.c, self.c['eval_samples']
        g = torch.Generator(self.dev).manual_seed(c['seed'] + 1)
        x = sample(G, max(n, c['fid']), c['z_dim'], g, self.dev)
        if c['dataset'] in TOYS:
            return dict(zip(('modes', 'near'), mode_coverage(x[:n], self.centres, self.std)))
        m = self.judge(images_of(x[:n], c)) if self.judge else {}
        if c['fid']:
            m['fid'], m['is'] = fid_is(c, images_of(x[:c['fid']], c), self.ds, self.dev)
        return m

    def line(self, m):
        if 'modes' in m:
            return f"modes {m['modes']}/{len(self.centres)} | within 3 std {m['near']:.1%}"
        fid = f" | fid {m['fid']:.2f} | is {m['is']:.2f} ({self.c['fid']} samples)" if 'fid' in m \
            else ''
        return ((self.judge.line(m) if self.judge else '') + fid)[3:]


# ---- train ----
def all_reduce_grads(model, world):
    """Average the gradients over the processes: data parallelism without DDP's wrapper, which
    suits neither double backward (the penalty) nor a D run only forward in G's step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

def train(c, dev, rank, world):
    """Step s is one D (critic) update on a batch, and a G update after every n_critic-th. The
    latents, u and augmentations of step s come from the RNG seeded by (seed, s, rank), the data
    order of epoch e from DistributedSampler's (seed, e): --resume continues exactly without RNG
    state. (Batch norm's statistics are per process: the world size changes the model.)"""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds = load_data(c)
    per_epoch, toy = epoch_steps(ds, c, world), c['dataset'] in TOYS
    if rank == 0:
        write_run_files(c)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' and not toy else torch.contiguous_format
    G, D = (m.to(dev, memory_format=layout) for m in make_models(c))
    ema = make_models(c)[0].to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(G.state_dict())
    adam = lambda m: torch.optim.Adam(m.parameters(), c['lr'], betas=(c['beta1'], c['beta2']),
                                      fused=dev.type == 'cuda')
    opt_g, opt_d = adam(G), adam(D)
    scaler_g, scaler_d = (torch.amp.GradScaler(dev.type, enabled=c['dtype'] == 'float16')
                          for _ in 'gd')
    state = dict(G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d)
    step, evals = (ckpt['step'], ckpt['evals']) if ckpt else (0, [])
    if ckpt:
        load_state(ckpt, dev, **state)
    net_g, net_d = (torch.compile(G), torch.compile(D)) if c['compile'] else (G, D)
    policy = c['augment'].replace(' ', '').split(',')
    aug = (lambda x: diff_augment(x, policy)) if c['augment'] else (lambda x: x)
    total = c['epochs'] * per_epoch
    stop = min(total, c['max_steps'] or total)
    evaluator = Evaluator(c, dev, ds) if rank == 0 else None
    if rank == 0:
        n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        print(f"data: {len(ds):,} {c['dataset']} {'points' if toy else 'images'} "
              f"{tuple(ds[0][0].shape)} | {c['loss']}{' (saturating)' * c['saturating']}, "
              f"{c['n_critic']} D step(s) per G step | G {n_g:,} and D {n_d:,} parameters | {dev}, "
              f"{c['dtype']}, {world} process(es) | {stop} of {total} D steps of batch "
              f"{c['batch_size']}" + (f' | resumed at step {step}' if step else ''))

    def update(loss, model, opt, scaler):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        all_reduce_grads(model, world)
        scaler.step(opt)
        scaler.update()

    def evaluate(step):  # modes, the judge, FID: when there is something to measure
        if toy or c['dataset'] == 'mnist' or c['fid']:
            t0, m = time.time(), evaluator(ema.eval() if c['ema'] else G.eval())
            G.train()
            evals.append([step, step / per_epoch, m])
            print(f'eval | step {step} | epoch {step / per_epoch:.2f} | ' + evaluator.line(m)
                  + f' | {time.time() - t0:.0f}s', flush=True)
    save = lambda step: save_checkpoint(c, step, **state, evals=evals)
    d_params, g_params, g_buffers = list(D.parameters()), list(G.parameters()), list(G.buffers())
    ema_params, ema_buffers = list(ema.parameters()), list(ema.buffers())
    scalers, every = [scaler_d, scaler_g], c['fid_every'] * per_epoch
    boundary = Boundary(c, step, stop, every, opt_d, scalers, rank, world)
    with boundary, closing(batches(ds, c, dev, rank, world, step, stop, per_epoch)) as data:
        for x, _ in data:
            # noise draw: this step's z, u and augmentations
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + rank)
            real = to_model_input(x.to(dev, non_blocking=True), c).contiguous(memory_format=layout)
            z = torch.randn(len(real), c['z_dim'], device=dev)
            # D (critic) step; the penalty through the uncompiled D (compiled graphs have no double
            # backward), its gradient unscaled by the scaler's scale, kept on the device
            with autocast(c, dev):
                with torch.no_grad():
                    fake = net_g(z).float()
                d_loss = d_loss_fn(c['loss'], net_d(aug(real)).float(), net_d(aug(fake)).float())
                gp = torch.zeros((), device=dev)
                if c['loss'] == 'wgan-gp':
                    u = torch.rand(len(real), *[1] * (real.dim() - 1), device=dev)
                    scale = scaler_d.scale(torch.ones((), device=dev))
                    gp = gradient_penalty(D, real, fake, u, scale)
            update(d_loss + c['gp_lambda'] * gp, D, opt_d, scaler_d)
            # G step, through a frozen D, after every n_critic-th D step; then the EMA of G
            g_loss = None
            if (step + 1) % c['n_critic'] == 0:
                D.requires_grad_(False)
                with autocast(c, dev):
                    f = net_d(aug(net_g(torch.randn_like(z)))).float()
                    g_loss = g_loss_fn(c['loss'], f, c['saturating'])
                update(g_loss, G, opt_g, scaler_g)
                D.requires_grad_(True)
                n = (step + 1) // c['n_critic']  # warm-up: the average covers the G steps so far
                with torch.no_grad():  # else the average keeps a graph of every step
                    w = 1 - min(c['ema'], (1 + n) / (10 + n))
                    torch._foreach_lerp_(ema_params, g_params, w)
                if g_buffers:  # batch norm's running statistics
                    torch._foreach_copy_(ema_buffers, g_buffers)
            step += 1
            # boundary: log, eval, save and stop where due (g: the mean over the G steps)
            boundary.add(d=d_loss, g=g_loss, **({'gp': gp} if c['loss'] == 'wgan-gp' else {}))
            boundary(step, g_params + d_params, save, evaluate)
    return (ema if c['ema'] else G).eval(), evals

def figures(c, G, dev, evals):
    """Samples (a grid, or a scatter over the mixture's modes), 5 latent interpolations of 10
    points (each pair twice: linear, then spherical), and the eval curves (fid.png)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g, out = torch.Generator(dev).manual_seed(c['seed']), c['out_dir']
    x = sample(G, c['n_samples'], c['z_dim'], g, dev)
    if c['dataset'] in TOYS:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(*x.T, s=2, alpha=0.3, label=f'{len(x)} samples')
        ax.scatter(*toy_modes(c['dataset'])[0].T, s=20, c='r', marker='x', label='modes')
        ax.set(aspect='equal', title=f"{c['dataset']}, {c['loss']}", xlabel='x', ylabel='y')
        fig.tight_layout()
        write_whole(os.path.join(out, 'samples.png'), lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    else:
        save_grid(images_of(x[:100], c), os.path.join(out, 'samples.png'))
        z0, z1 = (torch.randn(5, c['z_dim'], generator=g, device=dev) for _ in range(2))
        a = torch.linspace(0, 1, 10, device=dev)[None, :, None]  # (1, 10, 1)
        lin = (1 - a) * z0[:, None] + a * z1[:, None]  # (5, 10, z_dim)
        ends = (z[:, None].expand_as(lin).flatten(0, 1) for z in (z0, z1))
        sph = slerp(*ends, a.expand(5, -1, -1).flatten(0, 1)).view_as(lin)
        z = torch.stack([lin, sph], 1).flatten(0, 2)  # rows: pair 1 linear, pair 1 slerp, ...
        with torch.no_grad():
            save_grid(images_of(G(z).float().cpu(), c), os.path.join(out, 'interpolation.png'))
    keys = [k for k in ('modes', 'near', 'fid', 'frechet', 'confident') if k in evals[-1][2]] \
        if evals else []
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            ax.plot([e[1] for e in evals], [e[2][k] for e in evals], marker='o')
            ax.set(xlabel='epoch', ylabel={'near': 'share within 3 std', 'frechet': 'judge frechet',
                                           'confident': 'confident share', 'fid': 'FID'}.get(k, k))
        fig.tight_layout()
        write_whole(os.path.join(out, 'fid.png'), lambda tmp: fig.savefig(tmp, dpi=80))
        plt.close(fig)

def main(argv=None):
    c = get_config(argv)
    check_config(c)
    dev, rank, world = setup(c)
    with after_training(c):
        if c['sample_only']:
            ckpt = load_checkpoint(c)
            G = make_models(c)[0].to(dev)
            G.load_state_dict(ckpt['ema'] if c['ema'] else ckpt['G'])
            g = torch.Generator(dev).manual_seed(c['seed'])
            x = sample(G.eval(), c['n_samples'], c['z_dim'], g, dev)
            if c['dataset'] in TOYS:
                path = os.path.join(c['out_dir'], 'samples.npz')
                write_whole(path, lambda tmp: np.savez(tmp, points=x.numpy()))
                print(f'wrote {len(x)} samples to {path} (points: float32, N x 2)')
            else:
                write_samples(c, images_of(x, c))
            figures(c, G, dev, [])
            if c['dataset'] in TOYS + ('mnist',) or c['fid']:
                ev = Evaluator(c, dev, load_data(c))
                print(f"eval | step {ckpt['step']} | " + ev.line(ev(G)))
        else:
            G, evals = train(c, dev, rank, world)
            if rank == 0:
                figures(c, G, dev, evals)


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
