"""
The GAN baseline the diffusion scripts are compared against: DCGAN, WGAN-GP and hinge losses on MNIST, CIFAR-10 or an
image folder, and on 2D Gaussian mixtures where mode collapse can be counted.

Losses on discriminator logits D(x), with r = D(real), f = D(G(z)):
  'bce'     Goodfellow et al. 2014 (eq. 1): D minimises -log sigmoid(r) - log(1 - sigmoid(f)); G the non-saturating
            -log sigmoid(f) (section 3), or with --saturating true the min-max form's log(1 - sigmoid(f)), whose gradient
            vanishes when D rejects the fakes confidently (the early-training case).
  'wgan-gp' Gulrajani et al. 2017 (Algorithm 1): the critic minimises f - r + lambda (|grad_x D(x_hat)| - 1)^2, with
            x_hat = u real + (1 - u) fake, u ~ U(0, 1) per sample, the norm per sample; G minimises -f. n_critic = 5
            critic steps per G step, no batch norm in the critic, Adam betas (0.5, 0.9).
  'hinge'   Lim & Ye 2017 / Miyato et al. 2018: D minimises relu(1 - r) + relu(1 + f); G minimises -f.
Networks: DCGAN (Radford et al. 2016): G maps z ~ N(0, I) through a 4x4 transposed convolution and stride-2 transposed
convolutions (batch norm, ReLU) to tanh images; D mirrors it with stride-2 convolutions and LeakyReLU 0.2 (batch norm
except on the first layer and for wgan-gp). --spectral-norm wraps every D layer (Miyato et al. 2018; no batch norm
then). MNIST is padded from 28 to 32 pixels (and cropped back for its judge and samples.npz).
--augment: DiffAugment (Zhao et al. 2020), the same random translation (1/8 of the side, zero fill), colour (brightness,
saturation, contrast) and cutout (a square of half the side) applied to real and fake images wherever D sees them, so
G is trained through it: the small-data mode (--train-images 1000).
Toy mode, --dataset ring8 | grid25: 8 Gaussians (std 0.02) on a circle of radius 2, or 25 (std 0.05) on the grid
{-4, -2, 0, 2, 4}^2, MLP networks. Eval counts the modes covered by 2,500 samples (a mode is covered when at least 20%
of its uniform share of the samples lies within 3 std of it: 20 of 100 on grid25, as in PacGAN, Lin et al. 2018) and
the share of samples within 3 std of any mode. Toy settings (TOY_PRESET, for flags not given): MLPs of 3 ReLU layers
of 128, z of 2 dimensions, batch 256, Adam 1e-3, EMA 0.999 of G, and lambda = 1: the paper's 10 covered 0 of 25 modes
in the same 23,400 steps, and its authors' toy code uses 0.1 ('smaller lambda seems to help for toy tasks'), which
covered 25, 24 and 20 modes on seeds 0-2 against 25, 25, 25 at 1.
Eval every --fid-every epochs: modes (toy); on MNIST, ddpm_mnist.py's judge (a small CNN classifier): the share of
samples with confidence >= 0.9, the KL of its class histogram from uniform and the Frechet distance of its features to
the test set's, beside real images' (the floor); with --fid N the Inception FID of N samples to the training set via
torch-fidelity (optional: pip install torch-fidelity). The curve is saved as fid.png.

Run (times on a 2-core CPU; the README has the figures):
    python gan_baseline.py --dataset grid25 --loss wgan-gp                  # 25/25 modes (3 seeds), 71-85% near one, 2.6 min
    python gan_baseline.py --dataset grid25 --loss bce                      # the plain GAN on the same mixture
    python gan_baseline.py --data-dir ../shared/data --dtype bfloat16 --epochs 9   # DCGAN digits: 17 min training
    python gan_baseline.py --dataset cifar10 --loss hinge --spectral-norm true --epochs 100 --fid 10000 --fid-every 10
    torchrun --nproc_per_node=2 gan_baseline.py --dataset folder --data-dir ffhq --image-size 64    # DDP
    python gan_baseline.py --dataset cifar10 --train-images 1000 --augment translation,color,cutout  # small data
    python gan_baseline.py --sample-only true --n-samples 1000              # samples.npz and a grid from out_dir
    python gan_baseline.py --resume true                                    # continue exactly
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
data_dir = './data'           # torchvision's MNIST / CIFAR-10 root, or the image folder; downloaded there when online
dataset = 'mnist'             # 'mnist' | 'cifar10' | 'folder' | 'ring8' | 'grid25'
image_size = 0                # side in pixels, 4 * 2^k; 0 = 32 (mnist padded, cifar10), 64 (folder)
out_dir = 'out/gan'           # ckpt.pt, figures, samples.npz, config.json and a copy of this file
loss = 'bce'                  # 'bce' | 'wgan-gp' | 'hinge'
saturating = False            # bce: G minimises log(1 - D(G(z))) (the min-max form) instead of -log D(G(z))
gp_lambda = 10.0              # wgan-gp: weight of the gradient penalty (toy mode: 1)
n_critic = 0                  # D steps per G step; 0 = 5 for wgan-gp, 1 otherwise
spectral_norm = False         # spectral normalisation of every D layer (and no batch norm in D)
augment = ''                  # DiffAugment policy: comma-separated translation, color, cutout; '' = off
z_dim = 100                   # latent dimensions (toy mode: 2)
channels = 64                 # G and D width at the finest resolution (DCGAN's ngf = ndf), doubling per halving
hidden = 128                  # toy mode: width of the MLPs' 3 hidden layers
toy_points = 100_000          # toy mode: training points drawn once from the mixture
epochs = 20                   # passes over the training data (D batches); toy mode: 60
batch_size = 64               # global, split across DDP ranks; toy mode: 256
lr = 2e-4                     # Adam learning rate of G and D, constant; toy mode: 1e-3
beta1 = 0.5                   # Adam beta1
beta2 = 0.0                   # Adam beta2; 0 = 0.9 for wgan-gp, 0.999 otherwise
ema = 0.0                     # decay of G's weight average, sampled from when on; 0 = off (sample G); toy: 0.999
train_images = 0              # 0 = all; fewer for the small-data mode
n_samples = 100               # samples in the grid (and in samples.npz with --sample-only)
eval_samples = 1000           # samples the evals score (toy: 2,500 if not given)
fid_every = 1                 # epochs between evals during training (modes / judge / FID); 0 = only at the end
fid = 0                       # samples scored by Inception FID at each eval (needs torch-fidelity); 0 = off
fid_weights = ''              # torch-fidelity's Inception weights (.pth) for offline use; '' = download once
classifier = ''               # MNIST judge's file (ddpm_mnist.py's works); '' = classifier.pt in out_dir (trained if missing)
device = 'auto'               # a torch device ('cpu', 'cuda:1'), or 'auto': cuda, then mps, then cpu
dtype = 'float32'             # 'float32' | 'bfloat16' | 'float16': autocast for training (float16 needs CUDA)
compile = False               # torch.compile G and D for training
resume = False                # continue from out_dir/ckpt.pt
overwrite = False             # start over in an out_dir that holds a checkpoint (replaced at the first save)
sample_only = False           # load out_dir/ckpt.pt, write samples.npz and samples.png
max_steps = 0                 # stop (saving) after this many D steps in total; 0 = all epochs
save_every = 1000             # steps between checkpoints (also at the end, on Ctrl-C and on SIGTERM)
log_every = 200               # steps between progress lines; each checks the losses are finite
seed = 0                      # data order, latents, initial weights

TOY_PRESET = dict(z_dim=2, hidden=128, batch_size=256, lr=1e-3, gp_lambda=1.0, ema=0.999, epochs=60, eval_samples=2500,
                  n_samples=2500, fid_every=10, log_every=2000, save_every=5000)
ARCH = ('dataset', 'image_size', 'loss', 'spectral_norm', 'z_dim', 'channels', 'hidden')
TOYS = ('ring8', 'grid25')


def get_config(argv=None):
    """Every lowercase constant from the config banner to the next banner becomes --dashed-name
    with the default's type (blank lines and comment paragraphs may sit among them); a dict. A toy dataset sets
    TOY_PRESET's values for the flags not given; the 0 sentinels become their values."""
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
    if c['dataset'] in TOYS:
        c.update({k: v for k, v in TOY_PRESET.items() if k not in given})
    c['image_size'] = c['image_size'] or {'folder': 64}.get(c['dataset'], 32 if c['dataset'] not in TOYS else 2)
    c['n_critic'] = c['n_critic'] or (5 if c['loss'] == 'wgan-gp' else 1)
    c['beta2'] = c['beta2'] or (0.9 if c['loss'] == 'wgan-gp' else 0.999)
    return c


def check_config(c):
    """One line saying what is wrong and what would work, for flags that argparse accepts but the run can't use."""
    s, toy = c['image_size'], c['dataset'] in TOYS
    problems = [
        *[(not math.isfinite(v), f"--{k.replace('_', '-')} must be a finite number, not {v}") for k, v in c.items()
          if isinstance(v, float)],  # nan passes every comparison below
        (c['dataset'] in ('mnist', 'cifar10') and s != 32, f"--image-size: {c['dataset']} runs at 32 pixels; folders resize"),
        (not toy and (s < 16 or s & (s - 1)), f'--image-size {s}: the DCGAN networks need 4 * 2^k pixels, at least 16'),
        (toy and c['image_size'] != 2, '--image-size means nothing for the 2D toy datasets'),
        (not set(c['augment'].replace(' ', '').split(',')) <= {'translation', 'color', 'cutout', ''},
         '--augment takes a comma-separated list of translation, color and cutout'),
        (toy and c['augment'], '--augment is for images, not the 2D toy datasets'),
        (c['saturating'] and c['loss'] != 'bce', '--saturating is a form of the bce generator loss; use --loss bce'),
        (min(c['epochs'], c['batch_size'], c['n_samples'], c['save_every'], c['log_every'], c['z_dim'], c['channels'],
             c['hidden'], c['n_critic'], c['toy_points']) < 1,
         '--epochs, --batch-size, --n-samples, --save-every, --log-every, --z-dim, --channels, --hidden, --n-critic and '
         '--toy-points must be at least 1'),
        (min(c['train_images'], c['max_steps'], c['fid_every'], c['fid']) < 0,
         '--train-images, --max-steps, --fid-every and --fid are counts, 0 = all/off'),
        (c['eval_samples'] < 20 or 0 < c['fid'] < 2, '--eval-samples must be at least 20 and --fid at least 2'),
        (c['fid'] and toy, '--fid scores images; the toy datasets count modes instead'),
        (not (c['lr'] > 0 and c['gp_lambda'] >= 0 and 0 <= c['ema'] < 1 and 0 <= c['beta1'] < 1 and 0 < c['beta2'] < 1),
         'need --lr > 0, --gp-lambda >= 0, 0 <= --ema < 1, 0 <= --beta1 < 1, 0 < --beta2 < 1'),
        (c['resume'] + c['sample_only'] + c['overwrite'] > 1, '--resume, --sample-only, --overwrite: pick one'),
    ]
    for bad, why in problems:
        if bad:
            raise SystemExit(f'gan_baseline.py: {why}')


# ---- loss ----
def d_loss_fn(kind, r, f):
    """The discriminator's (critic's) loss on logits of real (r) and fake (f) batches, without the gradient penalty."""
    if kind == 'bce':  # -log sigmoid(r) - log(1 - sigmoid(f)) (eq. 1), as softplus for stability
        return F.softplus(-r).mean() + F.softplus(f).mean()
    if kind == 'wgan-gp':  # -(E D(real) - E D(fake)): minus the Kantorovich-Rubinstein estimate of W1
        return f.mean() - r.mean()
    return F.relu(1 - r).mean() + F.relu(1 + f).mean()  # hinge


def g_loss_fn(kind, f, saturating=False):
    """The generator's loss on the logits of its samples."""
    if kind == 'bce':  # non-saturating -log sigmoid(f); saturating log(1 - sigmoid(f)) = -softplus(f)
        return -F.softplus(f).mean() if saturating else F.softplus(-f).mean()
    return -f.mean()  # wgan-gp and hinge


def gradient_penalty(D, real, fake, u, scale=1.0):
    """E (|grad_x D(x_hat)|_2 - 1)^2 per sample at x_hat = u real + (1 - u) fake (WGAN-GP eq. 3, without lambda).
    scale: the GradScaler's loss scale under float16, divided back out of the gradient (PyTorch's AMP recipe)."""
    up = lambda t: t.float() if t.element_size() < 4 else t  # half-precision outputs of autocast to float32
    x_hat = (u * real + (1 - u) * fake).requires_grad_(True)
    grad, = torch.autograd.grad(up(D(x_hat)).sum() * scale, x_hat, create_graph=True)
    return ((up(grad) / scale).flatten(1).norm(dim=1) - 1).square().mean()


def diff_augment(x, policy, generator=None):
    """DiffAugment (Zhao et al. 2020) of images in [-1, 1] (B, C, S, S), differentiable in x: per sample a
    brightness shift U(-0.5, 0.5), saturation scale U(0, 2), contrast scale U(0.5, 1.5) ('color'); an integer shift
    of up to S/8 pixels with zero fill ('translation'); a zeroed square of side S/2 centred anywhere ('cutout')."""
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
        inside = ((ij - centre).abs() < S // 4)  # (B, 2, S): rows and columns within half the square's side
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
    """(modes covered, share of samples within 3 std of a mode) of points x (N, 2): each sample counts for its
    nearest centre if it lies within 3 std of it; a mode is covered when it has at least min_share of its uniform
    share N / K of those samples."""
    d = torch.cdist(x.double(), centres.double())  # (N, K)
    dist_min, nearest = d.min(1)
    good = dist_min < 3 * std
    counts = torch.bincount(nearest[good], minlength=len(centres))
    return int((counts >= min_share * len(x) / len(centres)).sum()), good.double().mean().item()


class Generator(nn.Module):
    """z (B, z_dim) -> images (B, C, S, S) in [-1, 1], or points (B, 2) for the toy datasets."""
    def __init__(self, z_dim, out_ch, size, channels, hidden):
        super().__init__()
        if size == 2:  # toy: 3 hidden ReLU layers
            self.net = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
            return
        n = int(math.log2(size // 4))  # stride-2 layers from 4x4 up to size
        ch = [channels * 2 ** (n - 1 - i) for i in range(n)]  # e.g. 256, 128, 64 for size 32
        layers = [nn.Unflatten(1, (z_dim, 1, 1)), nn.ConvTranspose2d(z_dim, ch[0], 4, 1, 0, bias=False),
                  nn.BatchNorm2d(ch[0]), nn.ReLU()]  # (B, ch0, 4, 4)
        for a, b in zip(ch, ch[1:]):
            layers += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(ch[-1], out_ch, 4, 2, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


class Discriminator(nn.Module):
    """Images (B, C, S, S) or points (B, 2) -> logits (B,). Batch norm only for bce/hinge without spectral norm."""
    def __init__(self, in_ch, size, channels, hidden, batch_norm, spectral):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)
        if size == 2:
            self.net = nn.Sequential(sn(nn.Linear(2, hidden)), nn.ReLU(), sn(nn.Linear(hidden, hidden)), nn.ReLU(),
                                     sn(nn.Linear(hidden, hidden)), nn.ReLU(), sn(nn.Linear(hidden, 1)))
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
    """(G, D) for the config, DCGAN's N(0, 0.02) weight init (batch norm weights N(1, 0.02)) for the image networks.
    The contract, for a forker who swaps in others: G(z) -> x, z (B, z_dim) ~ N(0, I), x (B, C, S, S) in [-1, 1] (or
    points (B, 2)); D(x) -> logits (B,). The loop also uses .parameters(), .buffers() (G's, copied into its EMA),
    .state_dict(), .requires_grad_() (D is frozen in G's step) and .train()/.eval(), nothing else."""
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
    """Spherical interpolation per sample (Shoemake 1985): the angle between z0 and z1 is swept at rate a, so the norm
    stays near sqrt(z_dim), where G was trained, while the linear mix's midpoint has norm about sqrt(z_dim / 2)."""
    cos = (z0 * z1).sum(1, keepdim=True) / (z0.norm(dim=1, keepdim=True) * z1.norm(dim=1, keepdim=True))
    theta = cos.clamp(-1, 1).acos()
    return (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)


@torch.no_grad()
def sample(G, n, z_dim, generator=None, device='cpu'):
    """n outputs of G (float32, on the CPU) from z ~ N(0, I), in batches of 500."""
    z = torch.randn(n, z_dim, generator=generator, device=device)
    return torch.cat([G(b).float().cpu() for b in z.split(500)])


def to_uint8(x, dataset):
    """[-1, 1] (N, C, S, S) -> uint8 (N, C, S, S); MNIST cropped from 32 back to 28 pixels."""
    x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x[..., 2:30, 2:30] if dataset == 'mnist' else x


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
    """uint8 images (N, C, S, S) and labels: MNIST (28 pixels, padded to 32 at use) or CIFAR-10 through torchvision
    (downloaded when missing), or every image under data_dir, centre-cropped and resized, read into memory once."""
    root = os.path.abspath(c['data_dir'])
    if c['dataset'] == 'folder':
        from PIL import Image, ImageOps
        exts = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.lower().endswith(exts))
        if not files:
            raise SystemExit(f'gan_baseline.py: no images ({", ".join(exts)}) in {root} or its sub-folders; pass --data-dir')
        def read(f):
            try:
                return np.array(ImageOps.fit(open_rgb(f), (c['image_size'],) * 2, Image.BICUBIC))
            except OSError as e:  # PIL's UnidentifiedImageError and truncated files
                raise SystemExit(f'gan_baseline.py: cannot read {f} as an image ({type(e).__name__}); remove or fix it') from None
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
            raise SystemExit(f'gan_baseline.py: {c["dataset"]} under {os.path.join(root, where)} cannot be read '
                             f'({type(e).__name__}: {str(e)[:90]}); a file there is truncated or damaged, or one is '
                             'missing: replace it') from None
        raise SystemExit(f'gan_baseline.py: no {c["dataset"]} under {os.path.join(root, where)} and the download failed '
                         f'({type(e).__name__}); put {what} there, or pass --data-dir') from None
    if c['dataset'] == 'mnist':
        return ds.data[:, None].contiguous(), ds.targets
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


def load_data(c):
    """The training set as one tensor: float32 points (N, 2) for the toy mixtures, else uint8 images."""
    if c['dataset'] in TOYS:
        centres, std = toy_modes(c['dataset'])
        g = torch.Generator().manual_seed(c['seed'])
        k = torch.randint(len(centres), (c['toy_points'],), generator=g)
        return (centres[k] + std * torch.randn(c['toy_points'], 2, generator=g, dtype=torch.float64)).float()
    return load_images(c)[0][:c['train_images'] or None]


def to_model_input(batch, c):
    """A batch of the training tensor as G's outputs look: points as they are, images in [-1, 1], MNIST padded to 32."""
    if c['dataset'] in TOYS:
        return batch
    x = batch.float() / 127.5 - 1
    return F.pad(x, (2, 2, 2, 2), value=-1.0) if c['dataset'] == 'mnist' else x


# ---- evaluation ----
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
            raise SystemExit(f'gan_baseline.py: {path} is not the MNIST judge\'s weights ({type(e).__name__}); pass the '
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


def frechet_distance(mu_a, ca, mu_b, cb):
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2)) (Heusel et al. 2017), by eigh (no scipy), float64."""
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + ca.trace() + cb.trace() - 2 * cross).item()


def frechet(a, b):
    """The Frechet distance of two feature sets (N, D)."""
    return frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def judge_quality(net, images, f_test, dev):
    """{'confident', 'kl', 'frechet'} of uint8 MNIST images (N, 1, 28, 28), judged by net against the test features."""
    f, logits = judge(net, images, dev)
    p = logits.softmax(1)
    hist = torch.bincount(p.argmax(1), minlength=10).double() / len(p)
    return {'confident': (p.max(1).values >= 0.9).double().mean().item(),
            'kl': (hist * (hist.clamp(min=1e-12) * 10).log()).sum().item(), 'frechet': frechet(f, f_test)}


def make_inception(c, dev):
    """uint8 (B, 3, H, W) -> pool features (B, 2048) of the TF-Inception used by FID, via torch-fidelity; its absence
    or an unreachable weights file stops the run here, before any training."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'],
                                          feature_extractor_weights_path=c['fid_weights'] or None).to(dev)
    except Exception as e:
        raise SystemExit(f'gan_baseline.py: --fid needs torch-fidelity and its Inception weights ({type(e).__name__}: '
                         f'{str(e)[:120]}); pip install torch-fidelity, and offline pass --fid-weights '
                         'weights-inception-2015-12-05-6726825d.pth; or run without --fid') from None
    return lambda x: net(x.expand(-1, 3, -1, -1).to(dev))[0]


class Evaluator:
    """What an eval measures, set up once: the toy mixture's modes; the MNIST judge with the test set's features (and
    real training images' figures, the floor); the Inception features of the training set for --fid."""
    def __init__(self, c, dev, out, images, extract):
        self.c, self.dev, self.extract, self.net = c, dev, extract, None
        self.floor = {}
        real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(c['seed']))[:c['eval_samples']]]
        if c['dataset'] in TOYS:
            self.centres, self.std = toy_modes(c['dataset'])
            self.floor = dict(zip(('modes', 'near'), mode_coverage(real, self.centres, self.std)))
        elif c['dataset'] == 'mnist':
            self.net = get_classifier(c, dev, c['classifier'] or os.path.join(out, 'classifier.pt'))
            self.f_test = judge(self.net, load_images(c, train=False)[0], dev)[0]
            self.floor = judge_quality(self.net, real, self.f_test, dev)
        if extract:
            f = torch.cat([extract(b).double().cpu() for b in images.split(250)])
            self.mu, self.cov = f.mean(0), torch.cov(f.T)

    def __call__(self, G):
        """The figures of eval_samples samples of G (and of fid samples for the FID)."""
        c = self.c
        g = torch.Generator(self.dev).manual_seed(c['seed'] + 1)
        x = sample(G, max(c['eval_samples'], c['fid']), c['z_dim'], g, self.dev)
        if c['dataset'] in TOYS:
            return dict(zip(('modes', 'near'), mode_coverage(x[:c['eval_samples']], self.centres, self.std)))
        images, out = to_uint8(x, c['dataset']), {}
        if self.net:
            out = judge_quality(self.net, images[:c['eval_samples']], self.f_test, self.dev)
        if self.extract:
            f = torch.cat([self.extract(b).double().cpu() for b in to_uint8(x[:c['fid']], c['dataset']).split(250)])
            out['fid'] = frechet_distance(f.mean(0), torch.cov(f.T), self.mu, self.cov)
        return out

    def line(self, m):
        if 'modes' in m:
            return f"modes {m['modes']}/{len(self.centres)} | within 3 std {m['near']:.1%}"
        parts = []
        if 'confident' in m:
            parts.append(f"confident (p >= 0.9) {m['confident']:.1%} | KL(classes || uniform) {m['kl']:.4f} | frechet "
                         f"{m['frechet']:.2f}" + (f" ({m['frechet'] / self.floor['frechet']:.1f}x floor)" if self.floor else ''))
        if 'fid' in m:
            parts.append(f"fid {m['fid']:.2f} ({self.c['fid']} samples)")
        return ' | '.join(parts)


# ---- train ----
def pick_device(name, local_rank=0):
    """'auto' is cuda, then mps, then cpu; any other name must parse and be present. Under torchrun each process takes
    the GPU of its LOCAL_RANK, and more processes than GPUs stop here, in every process, with the same line."""
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"gan_baseline.py: --device '{name}' is not a torch device; try cpu, cuda or auto") from None
    if not {'cuda': torch.cuda.is_available, 'mps': torch.backends.mps.is_available}.get(dev.type, lambda: True)():
        raise SystemExit(f'gan_baseline.py: --device {name} is not available on this machine; try --device auto')
    if dev.type == 'cuda' and dev.index is None:
        gpus, procs = torch.cuda.device_count(), int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        if procs > gpus:
            raise SystemExit(f'gan_baseline.py: torchrun started {procs} processes on a machine with {gpus} GPU(s); use '
                             f'--nproc_per_node={gpus} (one process per GPU), or --device cpu')
        dev = torch.device('cuda', local_rank)
    if dev.type == 'cuda' and dev.index >= torch.cuda.device_count():
        raise SystemExit(f'gan_baseline.py: --device {name}: this machine has {torch.cuda.device_count()} GPU(s), '
                         f'cuda:0 to cuda:{torch.cuda.device_count() - 1}')
    return dev


def load_checkpoint(path, c):
    """The checkpoint at path, checked to come from this script with the same data, loss and networks."""
    if not os.path.exists(path):
        raise SystemExit(f'gan_baseline.py: no checkpoint at {path}; train first, or point --out-dir at the run')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise SystemExit(f'gan_baseline.py: {path} is not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or ckpt.get('script') != 'gan_baseline.py':
        script = ckpt.get('script') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f'gan_baseline.py: {path} was not written by gan_baseline.py (script: {script})')
    unused = 'channels' if c['dataset'] in TOYS else 'hidden'  # the MLPs' width, or the convolutions'
    differ = [f"{k} {ckpt['config'][k]!r} (flag {c[k]!r})" for k in ARCH if k != unused and ckpt['config'][k] != c[k]]
    if differ:
        raise SystemExit(f"gan_baseline.py: {path} has a different model: {', '.join(differ)}; pass the checkpoint's values")
    return ckpt


def save_checkpoint(path, state, step, c, evals):
    """state: G, D, ema, opt_g, opt_d, scaler_g, scaler_d. Written whole to a temporary file, then renamed over the last
    one: a kill mid-save keeps that one."""
    write_whole(path, lambda tmp: torch.save({**{k: v.state_dict() for k, v in state.items()}, 'step': step,
                                              'config': c, 'evals': evals, 'script': 'gan_baseline.py'}, tmp))


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
        raise SystemExit(f'gan_baseline.py: could not write {path} ({str(e)[:100]}; {size / 2**20:.0f} MB '
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
        raise SystemExit(f'gan_baseline.py: {path} holds a run; continue it with --resume true, or start over '
                         'with --overwrite true or another --out-dir')
    try:
        os.makedirs(c['out_dir'], exist_ok=True)
    except OSError as e:
        raise SystemExit(f"gan_baseline.py: cannot make --out-dir {c['out_dir']} ({e.strerror})") from None


def write_run_files(c):
    """config.json and a copy of this script, once the run is accepted (the checkpoint and data checked)."""
    def dump(tmp):
        with open(tmp, 'w') as f:
            json.dump(c, f, indent=2)
    write_whole(os.path.join(c['out_dir'], 'config.json'), dump)
    copy = os.path.join(c['out_dir'], os.path.basename(__file__))
    write_whole(copy, lambda tmp: shutil.copy(__file__, tmp))


def all_reduce_grads(model, world):
    """Average the gradients over the ranks: data parallelism without DDP's wrapper, which neither double backward
    (the gradient penalty) nor a D that is only run forward in G's step (its gradients off) would suit."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world > 1 and grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for g, part in zip(grads, flat.div_(world).split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


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


def train(c, dev, out, rank, world, extract):
    """Step s is one D (critic) update on a batch, and a G update after every n_critic-th. The latents, u and
    augmentations of step s are drawn on the device from the RNG seeded by (seed, s, rank), the data order of epoch e
    comes from DistributedSampler's (seed, e): --resume needs no RNG state to continue the run exactly. (Batch norm's
    statistics are per rank, so unlike the diffusion scripts the world size changes the model anyway.) Nothing waits
    for the device in a step: the losses' finiteness and a stop signal are acted on at each log and save."""
    from torch.utils.data import DistributedSampler
    path = os.path.join(out, 'ckpt.pt')
    ckpt = load_checkpoint(path, c) if c['resume'] else None  # before the data: a wrong checkpoint fails at once
    for k in ('batch_size', 'seed') if ckpt and rank == 0 else ():  # they set the data order and the noise
        if ckpt['config'][k] != c[k]:
            print(f"note: --{k.replace('_', '-')} {c[k]}, where the checkpoint has {ckpt['config'][k]}: the run goes on, "
                  "not as the checkpoint's run would have")
    data = load_data(c)
    if rank == 0:
        write_run_files(c)
    torch.manual_seed(c['seed'])
    layout = torch.channels_last if dev.type == 'cuda' and c['dataset'] not in TOYS else torch.contiguous_format
    G, D = (m.to(dev, memory_format=layout) for m in make_models(c))
    ema = make_models(c)[0].to(dev, memory_format=layout).requires_grad_(False)
    ema.load_state_dict(G.state_dict())
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=c['lr'], betas=(c['beta1'], c['beta2']), fused=dev.type == 'cuda')
    opt_g, opt_d = adam(G), adam(D)
    scaled = c['dtype'] == 'float16'
    scaler_g, scaler_d = (torch.amp.GradScaler(dev.type, enabled=scaled) for _ in range(2))
    state = dict(G=G, D=D, ema=ema, opt_g=opt_g, opt_d=opt_d, scaler_g=scaler_g, scaler_d=scaler_d)
    step, evals = 0, []
    if ckpt:
        for group in ckpt['opt_g']['param_groups'] + ckpt['opt_d']['param_groups']:
            group['fused'] = dev.type == 'cuda'  # whatever device wrote it
        for k, obj in state.items():
            obj.load_state_dict(ckpt[k])
        step, evals = ckpt['step'], ckpt['evals']
    net_g, net_d = (torch.compile(G), torch.compile(D)) if c['compile'] else (G, D)
    autocast = torch.autocast(dev.type, dtype=getattr(torch, c['dtype'])) if c['dtype'] != 'float32' else nullcontext()
    policy = c['augment'].replace(' ', '').split(',')
    aug = (lambda x: diff_augment(x, policy)) if c['augment'] else (lambda x: x)
    per_rank = c['batch_size'] // world
    sampler = DistributedSampler(range(len(data)), num_replicas=world, rank=rank, shuffle=True, seed=c['seed'], drop_last=True)
    steps_per_epoch = len(sampler) // per_rank
    if steps_per_epoch == 0:
        raise SystemExit(f"gan_baseline.py: {len(data)} training examples make no batch of {c['batch_size']}; lower --batch-size")
    total = c['epochs'] * steps_per_epoch
    stop = min(total, c['max_steps'] or total)
    evaluator = Evaluator(c, dev, out, data, extract) if rank == 0 else None
    data = on_device(data, dev)
    if rank == 0:
        n_g, n_d = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        print(f"data: {len(data):,} {c['dataset']} {'points' if c['dataset'] in TOYS else 'images'} "
              f"{tuple(data.shape[1:])} | {c['loss']}{' (saturating)' if c['saturating'] else ''}, {c['n_critic']} D "
              f"step(s) per G step | G {n_g:,} and D {n_d:,} parameters | {dev}, {c['dtype']}, {world} process(es) | "
              f"{stop} of {total} D steps of batch {c['batch_size']}" + (f' | resumed at step {step}' if step else ''))
        if evaluator.floor:
            print(f"eval | {c['eval_samples']} training {'points' if c['dataset'] in TOYS else 'images'} (the floor) | "
                  + evaluator.line(evaluator.floor), flush=True)
    first = step  # this run's first step (step moves on while the batches are drawn, and a loader draws ahead)

    def order():  # this rank's rows of the data for steps step .. stop - 1, epoch by epoch
        for epoch in range(first // steps_per_epoch, math.ceil(stop / steps_per_epoch)):
            sampler.set_epoch(epoch)
            rows = torch.tensor(list(sampler))[:steps_per_epoch * per_rank].view(steps_per_epoch, per_rank)
            yield from rows.to(data.device)[max(0, first - epoch * steps_per_epoch):stop - epoch * steps_per_epoch]

    def update(loss, model, opt, scaler):
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        all_reduce_grads(model, world)
        scaler.step(opt)
        scaler.update()
    d_params = list(D.parameters())
    g_params, ema_params, g_buffers, ema_buffers = (list(f()) for f in (G.parameters, ema.parameters, G.buffers,
                                                                         ema.buffers))
    logs, t_win, s_win = [], time.time(), step
    caught, restore_signals = catch_stop_signals()
    try:
        for idx in order():
            # noise draw: this step's z, u and augmentations
            torch.manual_seed((c['seed'] * 1_000_003 + step) * 1024 + rank)
            real = to_model_input(data[idx].to(dev, non_blocking=True), c).contiguous(memory_format=layout)
            z = torch.randn(len(real), c['z_dim'], device=dev)
            # D (critic) step; the penalty through the uncompiled D (compiled graphs have no double backward), its
            # gradient unscaled by the scaler's scale, kept on the device
            with autocast:
                with torch.no_grad():
                    fake = net_g(z).float()
                d_loss = d_loss_fn(c['loss'], net_d(aug(real)).float(), net_d(aug(fake)).float())
                gp = torch.zeros((), device=dev)
                if c['loss'] == 'wgan-gp':
                    u = torch.rand(len(real), *[1] * (real.dim() - 1), device=dev)
                    gp = gradient_penalty(D, real, fake, u, scaler_d.scale(torch.ones((), device=dev)))
            update(d_loss + c['gp_lambda'] * gp, D, opt_d, scaler_d)
            # G step, through a frozen D, after every n_critic-th D step; then the EMA of G
            g_step = (step + 1) % c['n_critic'] == 0
            g_loss = torch.zeros((), device=dev)
            if g_step:
                D.requires_grad_(False)
                with autocast:
                    g_loss = g_loss_fn(c['loss'], net_d(aug(net_g(torch.randn_like(z)))).float(), c['saturating'])
                update(g_loss, G, opt_g, scaler_g)
                D.requires_grad_(True)
                n = (step + 1) // c['n_critic']  # warm-up: the average covers at most the G steps taken so far
                torch._foreach_lerp_(ema_params, g_params, 1 - min(c['ema'], (1 + n) / (10 + n)))
                if g_buffers:  # batch norm's running statistics
                    torch._foreach_copy_(ema_buffers, g_buffers)
            step += 1
            # log, eval, save: the only places that wait for the device. Under float16 a non-finite loss is a step the
            # GradScaler skipped (weights untouched, its scale halved): counted, left out of the means
            losses = torch.stack([d_loss.detach(), g_loss.detach(), gp.detach()])
            kept = losses.isfinite().all() if scaled else torch.ones((), dtype=torch.bool, device=dev)
            logs.append(torch.cat([losses.where(kept, 0), torch.stack([kept & g_step, kept]).float()]))
            log, save = step % c['log_every'] == 0 or step == stop, step % c['save_every'] == 0 or step == stop
            every = c['fid_every'] * steps_per_epoch
            evaluate = (every and step % every == 0) or step == stop
            if not (log or save or evaluate or (caught and world == 1)):
                continue
            # the losses finite, and at a save the weights' norm (so no checkpoint holds inf, nan or overflowing
            # weights); the ranks agree on both and on stopping
            zero = torch.zeros((), device=dev)
            norm = torch.stack(torch._foreach_norm(g_params + d_params)).sum() if save or caught else zero
            sums = torch.cat([torch.stack(logs).sum(0), torch.stack([norm, zero + bool(caught)])])
            if world > 1:
                dist.all_reduce(sums)
            d_sum, g_sum, gp_sum, g_steps, n, norm, stopping = sums.tolist()
            skipped = len(logs) * world - n
            if not math.isfinite(d_sum + g_sum + gp_sum + norm) or (skipped and scaler_d.get_scale() < 2 ** -8):
                what = (f"the weights' norm is {norm}" if not math.isfinite(norm) else
                        "float16 overflows in every step (the GradScaler's scale fell under 2^-8)"
                        if n and math.isfinite(d_sum + g_sum + gp_sum) else
                        f"a loss is {d_sum + g_sum + gp_sum if n else 'nan'}")
                raise SystemExit(f'gan_baseline.py: {what} in steps {step - len(logs) + 1}-{step}; '
                                 f'{last_checkpoint(path)}; try a lower --lr or --dtype float32')
            if log:
                ms = (time.time() - t_win) / (step - s_win) * 1e3  # this window's, saves and evals left out
                if rank == 0:
                    gp_part = f' | gp {gp_sum / n:.4f}' if c['loss'] == 'wgan-gp' and n else ''
                    skip_part = f' | {skipped:.0f} step(s) skipped by the float16 GradScaler' if skipped else ''
                    print(f"step {step}/{stop} | d {d_sum / n if n else math.nan:.4f} | g "
                          f"{g_sum / g_steps if g_steps else math.nan:.4f}{gp_part}{skip_part} | {ms:.1f} ms/step | "
                          f"{c['batch_size'] / ms * 1e3:,.0f} img/s | "
                          f"eta {ms * (stop - step) / 6e4:.1f}m", flush=True)
                logs, s_win = [], step
            t_pause = time.time()
            if rank == 0 and evaluate and (c['dataset'] in TOYS + ('mnist',) or c['fid']):  # else nothing to measure
                m = evaluator(ema.eval() if c['ema'] else G.eval())
                G.train()
                evals.append([step, step / steps_per_epoch, m])
                print(f'eval | step {step} | epoch {step / steps_per_epoch:.2f} | ' + evaluator.line(m)
                      + f' | {time.time() - t_pause:.0f}s', flush=True)
            if rank == 0 and (save or stopping > 0):
                save_checkpoint(path, state, step, c, evals)
            if stopping > 0:
                why = signal.Signals(caught[0]).name if caught else 'a signal to another rank'
                raise SystemExit(f'gan_baseline.py: interrupted at step {step} ({why}); saved {path}; '
                                 'continue with --resume true')
            t_win = time.time() if log else t_win + time.time() - t_pause
    finally:
        restore_signals()
    return (ema if c['ema'] else G).eval(), evals


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


def figures(c, G, dev, out, evals):
    """Samples (a grid, or a scatter over the mixture's modes), 5 latent interpolations of 10 points (each pair twice:
    linear, then spherical), and the eval curve (fid.png)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    g = torch.Generator(dev).manual_seed(c['seed'])
    x = sample(G, c['n_samples'], c['z_dim'], g, dev)
    if c['dataset'] in TOYS:
        centres, _ = toy_modes(c['dataset'])
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(*x.T, s=2, alpha=0.3, label=f"{len(x)} samples")
        ax.scatter(*centres.T, s=20, c='r', marker='x', label='modes')
        ax.set(aspect='equal', title=f"{c['dataset']}, {c['loss']}")
        fig.tight_layout()
        write_whole(os.path.join(out, 'samples.png'), lambda tmp: fig.savefig(tmp, dpi=100))
        plt.close(fig)
    else:
        save_grid(to_uint8(x[:100], c['dataset']), os.path.join(out, 'samples.png'))
        z0, z1 = (torch.randn(5, c['z_dim'], generator=g, device=dev) for _ in range(2))
        a = torch.linspace(0, 1, 10, device=dev)[None, :, None]  # (1, 10, 1)
        lin = (1 - a) * z0[:, None] + a * z1[:, None]  # (5, 10, z_dim)
        sph = slerp(z0[:, None].expand_as(lin).flatten(0, 1), z1[:, None].expand_as(lin).flatten(0, 1), a.expand(5, -1, -1)
                    .flatten(0, 1)).view_as(lin)
        z = torch.stack([lin, sph], 1).flatten(0, 2)  # rows: pair 1 linear, pair 1 slerp, pair 2 linear, ...
        with torch.no_grad():
            save_grid(to_uint8(G(z).float().cpu(), c['dataset']), os.path.join(out, 'interpolation.png'))
    keys = [k for k in ('modes', 'near', 'fid', 'frechet', 'confident') if evals and k in evals[-1][2]]
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
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    dev = pick_device(c['device'], int(os.environ.get('LOCAL_RANK', 0)))
    if c['dtype'] == 'float16' and dev.type != 'cuda':
        raise SystemExit('gan_baseline.py: --dtype float16 needs CUDA; use bfloat16 or float32 here')
    torch.backends.cudnn.benchmark = dev.type == 'cuda'  # the fastest convolution algorithms for these shapes
    if c['batch_size'] % world:
        raise SystemExit(f"gan_baseline.py: --batch-size {c['batch_size']} does not split across {world} processes")
    if 'RANK' in os.environ:  # started by torchrun: a process group, even of one process
        if dev.type == 'cuda':
            torch.cuda.set_device(dev)
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    prepare_out_dir(c)  # nothing is written before the checkpoint and the data are checked
    if rank == 0:
        print(f"device {dev} | dtype {c['dtype']} | output {c['out_dir']}")
    extract = make_inception(c, dev) if c['fid'] and rank == 0 else None  # a missing package fails before training
    try:
        if c['sample_only']:
            ckpt = load_checkpoint(os.path.join(c['out_dir'], 'ckpt.pt'), c)
            G = make_models(c)[0].to(dev)
            G.load_state_dict(ckpt['ema'] if c['ema'] else ckpt['G'])
            x = sample(G.eval(), c['n_samples'], c['z_dim'], torch.Generator(dev).manual_seed(c['seed']), dev)
            path = os.path.join(c['out_dir'], 'samples.npz')
            if c['dataset'] in TOYS:
                write_whole(path, lambda tmp: np.savez(tmp, points=x.numpy()))
            else:
                write_whole(path, lambda tmp: np.savez(tmp, images=to_uint8(x, c['dataset']).permute(0, 2, 3, 1).numpy()))
            figures(c, G, dev, c['out_dir'], [])
            what = 'points: float32, N x 2' if c['dataset'] in TOYS else 'images: uint8, N x H x W x C'
            print(f'wrote {len(x)} samples to {path} ({what}) and samples.png')
            if rank == 0 and (c['dataset'] in TOYS + ('mnist',) or c['fid']):
                ev = Evaluator(c, dev, c['out_dir'], load_data(c), extract)
                print(f"eval | step {ckpt['step']} | " + ev.line(ev(G)))
        else:
            G, evals = train(c, dev, c['out_dir'], rank, world, extract)
            if rank == 0:
                figures(c, G, dev, c['out_dir'], evals)
    except KeyboardInterrupt:  # Ctrl-C while sampling, drawing or evaluating (training saved its checkpoint)
        raise SystemExit(f"gan_baseline.py: interrupted after training; {c['out_dir']}/ckpt.pt is saved"
                         ) from None
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
