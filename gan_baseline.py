"""
The GAN baseline the diffusion scripts are compared against: DCGAN, WGAN-GP and hinge losses on
MNIST, CIFAR-10 or an image folder, and on 2D Gaussian mixtures where mode collapse can be counted.

Losses on D's logits r = D(real), f = D(G(z)): 'bce' (Goodfellow et al. 2014, eq. 1; G's
non-saturating -log sigmoid(f), or --saturating true), 'wgan-gp' (Gulrajani et al. 2017, Algorithm
1: f - r + lambda (|grad D(x_hat)| - 1)^2, 5 critic steps a G step, Adam (0.5, 0.9)), 'hinge' (Lim &
Ye 2017). DCGAN networks (Radford et al. 2016), --spectral-norm (Miyato et al. 2018), --augment:
DiffAugment (Zhao et al. 2020). Toy mode (ring8, grid25): a mode is covered when 20% of its share
of 2,500 samples lies within 3 std (PacGAN). Evals: modes, the MNIST judge (below), FID and IS.

    python gan_baseline.py --dataset grid25 --loss wgan-gp --out-dir out/grid25   # 25/25 modes
    python gan_baseline.py                                         # DCGAN digits (MNIST)
    torchrun --nproc_per_node=2 gan_baseline.py --dataset cifar10 --loss hinge --fid 10000
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

def check_config(c):  # flags a run cannot use, each refused with one line
    s, toy = c['image_size'], c['dataset'] in TOYS
    refuse([(c['dataset'] in ('mnist', 'cifar10') and s != 32, f"--image-size: {c['dataset']} "
             'runs at 32 pixels'),
            (not toy and (s < 16 or s & (s - 1)), f'--image-size {s}: DCGAN needs 4 * 2^k pixels'),
            (set(c['augment'].replace(' ', '').split(',')) - {'translation', 'color', 'cutout', ''},
             '--augment takes a list of translation, color and cutout'),
            (c['saturating'] and c['loss'] != 'bce', '--saturating is a form of bce: --loss bce'),
            (toy and (c['fid'] or c['augment']), '--fid and --augment are for images, not points')])

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
    """E (|grad D(x_hat)|_2 - 1)^2 at x_hat = u real + (1 - u) fake (eq. 3, no lambda); scale:
    float16's loss scale, divided back out of the gradient."""
    up = lambda t: t.float() if t.element_size() < 4 else t  # autocast's half precision to float32
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(up(D(x_hat)).sum() * scale, x_hat, create_graph=True)
    return ((up(grad) / scale).flatten(1).norm(dim=1) - 1).square().mean()

def diff_augment(x, policy, generator=None):
    """DiffAugment, differentiable, per sample: brightness + U(-0.5, 0.5), saturation x U(0, 2),
    contrast x U(0.5, 1.5) ('color'); a shift of up to S/8 pixels ('translation'); a zeroed square
    of side S/2 ('cutout')."""
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
def toy_modes(name):  # the mixture's centres (K, 2) and its components' std
    if name == 'ring8':
        a = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
        return torch.stack([2 * a.cos(), 2 * a.sin()], 1), 0.02
    g = torch.arange(-4.0, 5.0, 2.0, dtype=torch.float64)
    return torch.cartesian_prod(g, g), 0.05

def mode_coverage(x, centres, std, min_share=0.2):
    """(modes covered, share within 3 std of a mode) of points x: a mode is covered when min_share
    of its share N / K lies within 3 std of it (a sample counts for its nearest centre)."""
    dist_min, nearest = torch.cdist(x.double(), centres.double()).min(1)
    good = dist_min < 3 * std
    counts = torch.bincount(nearest[good], minlength=len(centres))
    return int((counts >= min_share * len(x) / len(centres)).sum()), good.double().mean().item()

def mlp(n_in, hidden, n_out, wrap=lambda m: m):  # the toy networks: 3 hidden ReLU layers
    return nn.Sequential(wrap(nn.Linear(n_in, hidden)), nn.ReLU(), wrap(nn.Linear(hidden, hidden)),
                         nn.ReLU(), wrap(nn.Linear(hidden, hidden)), nn.ReLU(),
                         wrap(nn.Linear(hidden, n_out)))

class Generator(nn.Module):  # z (B, z_dim) -> images (B, C, S, S) in [-1, 1], or points (B, 2)
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
    """Images or points -> logits (B,); batch norm only for bce and hinge without spectral norm."""
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
    """EDIT ME: any G(z (B, z_dim)) -> x in [-1, 1] and D(x) -> logits (B,) with .parameters(),
    .buffers(), .state_dict(), .requires_grad_(), .train() and .eval(). DCGAN's N(0, 0.02) init."""
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
    """Spherical interpolation (Shoemake 1985): the norm stays near sqrt(z_dim), where G trained."""
    norms = z0.norm(dim=1, keepdim=True) * z1.norm(dim=1, keepdim=True)
    cos = (z0 * z1).sum(1, keepdim=True) / norms
    theta = cos.clamp(-1, 1).acos()
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)

@torch.no_grad()
def sample(G, n, z_dim, generator=None, device='cpu'):  # n outputs of G, float32, on the CPU
    z = torch.randn(n, z_dim, generator=generator, device=device)
    return torch.cat([G(b).float().cpu() for b in z.split(500)])

def images_of(x, c):  # G's images -> uint8 (N, C, S, S), MNIST cropped back to 28 pixels
    x = to_uint8(x)
    return x[..., 2:30, 2:30] if c['dataset'] == 'mnist' else x

# ---- data ----
def load_data(c):  # the training set: points (N, 2) of a toy mixture, or (uint8 image, label)
    if c['dataset'] not in TOYS:
        return load_dataset(c, c['dataset'], n=c['train_images'])[0]
    centres, std = toy_modes(c['dataset'])
    g, n = torch.Generator().manual_seed(c['seed']), c['toy_points']
    k = torch.randint(len(centres), (n,), generator=g)
    x = centres[k] + std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x.float(), torch.zeros(n))

def to_model_input(batch, c):  # a batch as G's outputs: images in [-1, 1], MNIST padded to 32
    if c['dataset'] in TOYS:
        return batch
    x = batch.float() / 127.5 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0) if c['dataset'] == 'mnist' else x

# ---- evaluation ----
class Evaluator:
    """What an eval measures: the toy mixture's modes, the MNIST judge, FID and IS (--fid N)."""
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

    def __call__(self, G):  # the figures of eval_samples samples of G (fid samples for FID)
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
        return (m.get('line', '') + fid)[3:]

# ---- train ----
def all_reduce_grads(model, world):
    """The gradients averaged over the processes: DDP's wrapper suits neither the penalty's double
    backward nor a D run only forward in G's step."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

def train(c, dev, rank, world):
    """Step s: a D (critic) update, and a G update after every n_critic-th; its latents, u and
    augmentations seeded by (seed, s, rank), so --resume continues exactly. (Batch norm's
    statistics are per process: the world size changes the model.)"""
    ckpt = load_checkpoint(c) if c['resume'] else None  # before the data: a wrong one fails fast
    ds = load_data(c)
    per_epoch, toy = epoch_steps(ds, c, world), c['dataset'] in TOYS
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
        load_state(ckpt, **state)
    net_g, net_d = (torch.compile(G), torch.compile(D)) if c['compile'] else (G, D)
    policy = c['augment'].replace(' ', '').split(',')
    aug = (lambda x: diff_augment(x, policy)) if c['augment'] else (lambda x: x)
    stop = min(total := c['epochs'] * per_epoch, c['max_steps'] or total)
    evaluator = Evaluator(c, dev, ds) if rank == 0 else None
    if rank == 0:
        n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        print(f"data: {len(ds):,} {c['dataset']} {'points' if toy else 'images'} "
              f"{tuple(ds[0][0].shape)} | {c['loss']}{' (saturating)' * c['saturating']}, "
              f"{c['n_critic']} D step(s) per G step | G {n_g:,} and D {n_d:,} parameters | {dev}, "
              f"{c['dtype']}, {world} process(es) | {stop} of {total} D steps of batch "
              f"{c['batch_size']}")

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
    boundary = Boundary(c, step, stop, c['fid_every'] * per_epoch, opt_d, rank, world)
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
    """Samples (a grid, or a scatter over the modes), 5 interpolations of 10 points (each pair
    linear, then spherical), and the eval curves (fid.png)."""
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
