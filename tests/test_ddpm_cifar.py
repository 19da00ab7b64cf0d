"""ddpm_cifar.py: the schedule, posterior, guidance and samplers against independent float64 math, the Frechet
distance against the closed form for Gaussians, the U-Net's shapes, the CIFAR-10 pickle and image-folder loaders on
files written here in their real formats, and tiny CPU runs of main(): checkpoint, exact resume, guided sampling,
interpolation, sample-only, FID with a small feature extractor, DDP equivalence, guidance that steers, bad input.
Monte Carlo checks allow Z standard errors computed from the sample size."""
import math
import os
import pickle
import re
import signal
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from closed_form import (
    check_foreign_and_broken_checkpoints,
    check_nothing_is_lost,
    check_posterior_is_bayes,
    check_q_sample_is_iterated_chain,
    check_resume_after_a_stop_is_exact,
    check_stop_signal_saves,
    check_the_average_keeps_no_graph,
    check_torchrun_matches_one_process,
    check_unknown_flag,
    exact_sampler_moments,
    run_alone,
    small_inception,
)

import ddpm_cifar as d

Z = 5
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_q_sample_equals_iterated_chain(schedule):
    check_q_sample_is_iterated_chain(d, d.make_betas(d.get_config(['--schedule', schedule, '--timesteps', '300'])))


@pytest.mark.parametrize('t', [0, 1, 500, 999])
def test_posterior_is_bayes(t):
    check_posterior_is_bayes(d, d.linear_betas(1000, 1e-4, 0.02), t)


def test_guidance_combination_and_one_batched_pass():
    """s = 0 gives eps_u, s = 1 eps_c, s = 3 eps_u + 3 (eps_c - eps_u); the sampler makes one forward pass of
    2B images per step, the labels then the null class, and steps with the guided eps."""
    ec, eu = torch.randn(2, 5, dtype=torch.float64).unbind()
    for s in (0.0, 1.0, 3.0):
        np.testing.assert_allclose(d.guided_eps(ec, eu, s).numpy(), (eu + s * (ec - eu)).numpy(), rtol=1e-12)
    calls = []

    class Model(torch.nn.Module):  # eps = 0.1 * label: the guided eps is 0.1 * (null + s (y - null)), null = 10
        def forward(self, x, t, y):
            calls.append((len(x), y.tolist()))
            return 0.1 * y.float().view(-1, 1, 1, 1).expand_as(x)
    betas, y = d.linear_betas(10, 1e-4, 0.02), torch.tensor([2, 7])
    x_T = torch.zeros(2, 3, 4, 4)
    x = d.sample(Model(), x_T.shape, betas, y, 10, cfg=3.0, steps=1, x_T=x_T)
    assert calls == [(4, [2, 7, 10, 10])]
    a = torch.cumprod(1 - betas.double(), 0)[-1]
    eps = 0.1 * (10 + 3 * (y.double() - 10))  # one DDIM step to t = 0: x0 = (x_T - sqrt(1 - a) eps) / sqrt(a), clipped
    np.testing.assert_allclose(x[:, 0, 0, 0].numpy(), (-(1 - a).sqrt() * eps / a.sqrt()).clamp(-1, 1).numpy(), atol=1e-6)
    calls.clear()
    d.sample(Model(), x_T.shape, betas, y, 10, cfg=1.0, steps=2, x_T=x_T)
    assert calls == [(2, [2, 7])] * 2  # s = 1 needs no unconditional pass


def test_label_dropout_is_per_sample_at_rate_p():
    """With n = 200,000 draws the null share is p within Z sqrt(p (1 - p) / n); kept labels are unchanged, and
    every batch of 128 mixes dropped and kept labels (a per-batch drop would give all or none)."""
    n, p, g = 200_000, 0.1, torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    out = d.drop_labels(y, 10, p, torch.rand(n, generator=g))
    share = (out == 10).double().mean().item()
    assert abs(share - p) < Z * math.sqrt(p * (1 - p) / n), share
    assert torch.equal(out[out != 10], y[out != 10])
    per_batch = (out[:n // 128 * 128].view(-1, 128) == 10).double().mean(1)
    assert ((per_batch > 0) & (per_batch < 1)).double().mean() > 0.99


def test_unet_default_size_and_shapes_at_32_and_96():
    """The default is the DDPM CIFAR-10 network (35.7M parameters in the paper) plus an 11-row class embedding."""
    c = d.get_config([])
    model = d.make_model(c, 10)
    assert 35.5e6 < sum(p.numel() for p in model.parameters()) < 36.5e6
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32), torch.tensor([0, 999]), torch.tensor([3, 10])).shape == (2, 3, 32, 32)
        c = d.get_config(['--dataset', 'folder', '--image-size', '96', '--channels', '32', '--attn-res', '24'])
        d.check_config(c)
        small = d.make_model(c, 0)
        assert small(torch.randn(2, 3, 96, 96), torch.tensor([5, 50]), torch.tensor([0, 0])).shape == (2, 3, 96, 96)
        assert any(isinstance(m, d.Attention) for m in small.down.modules())  # 96 -> 48 -> 24: attention at 24


MU, STD = 0.2, 0.25


CUDA = pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA'))


@pytest.mark.parametrize('dev', ['cpu', CUDA])
@pytest.mark.parametrize('method, steps', [('ddpm', 0), ('ddim', 20)])
def test_sampler_with_exact_eps_reproduces_gaussian_data(method, steps, dev):
    """Every pixel an independent N(MU, STD^2) whatever the label: 64 images of 3 x 16 x 16 pixels are n = 49,152
    draws, the mean's standard error sqrt(var / n), the variance's var sqrt(2 / n); the target is the discretised
    chain's exact output moments. Clipping x0 to [-1, 1] acts beyond 3.2 STD, below both errors. On CUDA the same
    float32 arithmetic rounds differently (about 1e-6 relative per step), far inside these errors."""
    betas = d.linear_betas(100, 1e-3, 0.2)
    alphas_cumprod = torch.cumprod(1 - betas, 0).float().to(dev)

    class ExactEps(torch.nn.Module):
        def forward(self, x, t, y):
            a = alphas_cumprod[t[0]]
            return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD ** 2 + 1 - a)
    labels = torch.arange(64) % 3
    x = d.sample(ExactEps(), (64, 3, 16, 16), betas, labels, 3, 3.0, steps, method, 'beta_tilde',
                 generator=torch.Generator(dev).manual_seed(1), device=dev).cpu()
    m, v = exact_sampler_moments(betas.double(), steps, method, MU, STD)
    n = x.numel()
    assert abs(x.mean().item() - m) < Z * math.sqrt(v / n), (x.mean(), m)
    assert abs(x.var().item() - v) < Z * v * math.sqrt(2 / n), (x.var(), v)
    # the chain itself has the data's mean, and a variance bias of first order in the step size (-38% for DDIM at 20
    # steps here, -23% at 40, -20% for DDPM at T = 100, -3% at T = 1000): it shrinks as the steps double
    if method == 'ddim':
        chains = [(betas, steps), (betas, 2 * steps)]
    else:  # T doubled with halved betas: the same forward process in finer steps
        chains = [(betas, 0), (d.linear_betas(200, 5e-4, 0.1), 0)]
    bias = [exact_sampler_moments(b.double(), k, method, MU, STD)[1] / STD ** 2 - 1 for b, k in chains]
    assert abs(m - MU) < 1e-3 and bias[0] < 0 and 0.4 < bias[1] / bias[0] < 0.7, (m, bias)


def test_slerp_keeps_the_norm_and_ends():
    """For orthogonal z0, z1 of equal norm r, slerp stays on the circle of radius r; the ends are z0 and z1."""
    z0, z1 = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    z0[0, 0], z1[0, 1] = 2.0, 2.0
    for a in (0.0, 0.3, 0.5, 1.0):
        z = d.slerp(z0, z1, a)
        assert math.isclose(z.norm().item(), 2.0, rel_tol=1e-12)
        np.testing.assert_allclose(z[0, :2].numpy(), [2 * math.cos(a * math.pi / 2), 2 * math.sin(a * math.pi / 2)], atol=1e-12)


def test_fid_and_is_by_torch_fidelity_match_their_formulas(tmp_path, monkeypatch):
    """fid_is hands torch-fidelity uint8 images (grey ones repeated to 3 channels) and reads its results: with
    a stand-in feature network both equal independent float64 formulas on the stand-in's features: FID
    |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^(1/2) C2 C1^(1/2))^(1/2)), IS exp(E KL(p(y|x) || p(y))) over 10 splits
    in order (samples_shuffle=False)."""
    small_inception(monkeypatch, tmp_path)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 1, 8, 8), generator=g, dtype=torch.uint8)
    reference = torch.utils.data.TensorDataset(torch.randint(40, 200, (80, 1, 8, 8), generator=g, dtype=torch.uint8),
                                               torch.zeros(80, dtype=torch.long))
    c = d.get_config(['--out-dir', str(tmp_path), '--dataset', 'folder', '--data-dir', str(tmp_path)])
    fid, isc = d.fid_is(c, images, reference, torch.device('cpu'))

    def feats(x):  # the stand-in's features of 3-channel copies: every channel the same
        x = x.double().expand(-1, 3, -1, -1)
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1) / 255
    f1, f2 = feats(images), feats(reference.tensors[0])
    mu1, mu2, c1, c2 = f1.mean(0), f2.mean(0), torch.cov(f1.T), torch.cov(f2.T)
    w, v = torch.linalg.eigh(c1)
    root = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root @ c2 @ root).clamp(min=0).sqrt().sum()
    assert fid == pytest.approx(((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * cross).item(), rel=1e-4)
    scores = []
    for part in (5 * f1[:, :3]).chunk(10):
        p = part.softmax(1)
        scores.append((p * (p.log() - p.mean(0).log())).sum(1).mean().exp().item())
    assert isc == pytest.approx(np.mean(scores), rel=1e-6)


# ---- data in the real on-disk formats ----
def write_cifar(root, n=64, classes=2):
    """cifar-10-batches-py as the official archive lays it out (pickled dicts of 'data' (N, 3072) uint8 rows in
    R, G, B plane order and 'labels'), five training batches, a test batch and batches.meta. Class k is a square
    bright in channel k on a dark background, labels 0..classes-1 in turn."""
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        labels = np.arange(n) % classes
        x = rng.integers(0, 40, (n, 3, 32, 32), dtype=np.uint8)
        for i, k in enumerate(labels):
            r, c = rng.integers(4, 18, 2)
            x[i, k, r:r + 10, c:c + 10] = 230
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({'batch_label': name, 'labels': labels.tolist(), 'data': x.reshape(n, 3072),
                         'filenames': [f'{name}_{i}.png' for i in range(n)]}, f)
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({'label_names': names, 'num_cases_per_batch': n, 'num_vis': 3072}, f)
    return root


@pytest.fixture
def skip_md5(monkeypatch):
    """Generated files cannot match the official md5 sums: the check becomes 'the file exists' for this test only."""
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda path, md5=None: os.path.isfile(path))


@pytest.fixture(scope='module')
def cifar(tmp_path_factory):
    return write_cifar(str(tmp_path_factory.mktemp('cifar')))


def test_cifar_pickles_load_as_written(cifar, skip_md5):
    ds, classes = d.load_data(d.get_config(['--data-dir', cifar]))
    assert len(ds) == 5 * 64 and classes[:2] == ['airplane', 'automobile']
    with open(os.path.join(cifar, 'cifar-10-batches-py', 'data_batch_2'), 'rb') as f:
        batch = pickle.load(f)
    x, y = ds[64 + 5]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == batch['labels'][5]
    assert torch.equal(x, torch.from_numpy(batch['data'][5].reshape(3, 32, 32)))


def test_cifar_md5_check_is_intact_and_offline_message(cifar, tmp_path, monkeypatch):
    """Without the test's patch the generated files fail torchvision's md5 check (read as damaged files), it
    tries to download, and with no network the script says where it looked and what it found, in one line."""
    def offline(*a, **k):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(torchvision.datasets.cifar, 'download_and_extract_archive', offline)
    for root in (cifar, str(tmp_path / 'nothing')):
        with pytest.raises(SystemExit) as e:
            d.load_data(d.get_config(['--data-dir', root]))
        msg = str(e.value)
        assert f'cifar10 under {root} is missing or damaged' in msg and 'URLError' in msg and '\n' not in msg, msg


def write_folder(root, classes=('cat', 'dog'), n=6):
    from PIL import Image
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            im = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)  # various sizes, wider than tall
            Image.fromarray(im).save(os.path.join(root, name, f'{i}.png' if i % 2 else f'{i}.jpg'))
    return root


def test_image_folder_with_and_without_classes(tmp_path):
    """--folder-classes true: ImageFolder's layout, a class a sub-folder. Without it the images at any depth
    (FFHQ's numbered sub-folders, or none) are one unconditional set; resized and centre-cropped."""
    root = write_folder(str(tmp_path / 'c'))
    folder = ['--dataset', 'folder', '--data-dir', root, '--image-size', '16']
    ds, classes = d.load_data(d.get_config(folder + ['--folder-classes', 'true']))
    assert classes == ['cat', 'dog'] and len(ds) == 12 and sorted({ds[i][1] for i in range(12)}) == [0, 1]
    assert ds[7][0].shape == (3, 16, 16) and ds[7][0].dtype == torch.uint8
    ds, classes = d.load_data(d.get_config(folder))
    assert classes == [] and len(ds) == 12 and {ds[i][1] for i in range(12)} == {0}
    flat = tmp_path / 'c' / 'cat'
    ds, classes = d.load_data(d.get_config(['--dataset', 'folder', '--data-dir', str(flat), '--image-size', '8']))
    assert classes == [] and len(ds) == 6 and ds[0][0].shape == (3, 8, 8)
    for extra in ([], ['--folder-classes', 'true']):  # no class sub-folders is no data for a conditional model
        with pytest.raises(SystemExit) as e:
            d.load_data(d.get_config(['--dataset', 'folder', '--data-dir', str(tmp_path / 'none')] + extra))
        assert 'no images' in str(e.value) and '\n' not in str(e.value)
    with pytest.raises(SystemExit) as e:
        d.load_data(d.get_config(['--dataset', 'folder', '--data-dir', str(flat), '--folder-classes', 'true']))
    assert 'class sub-folders' in str(e.value)


def test_shapes_are_labelled_by_their_brightest_channel():
    ds, classes = d.make_shapes(300, 16, 0)
    x, y = ds.tensors
    assert classes == ['red', 'green', 'blue'] and torch.equal(x.float().sum((2, 3)).argmax(1), y)
    assert torch.bincount(y).tolist() == [100, 100, 100] and (x > 0).float().mean() > 0.02


# ---- tiny runs of main() ----
TINY = ['--preset', 'tiny', '--channel-mults', '1,2,2', '--batch-size', '16', '--timesteps', '50', '--sample-steps', '5',
        '--log-every', '2', '--n-samples', '6', '--device', 'cpu']


def test_the_average_keeps_no_graph(tmp_path):
    check_the_average_keeps_no_graph(d, TINY + ['--dataset', 'shapes', '--image-size', '16', '--max-steps', '3',
                                               '--out-dir', str(tmp_path)])


def test_train_resume_guide_interpolate_sample_only_fid(cifar, skip_md5, tmp_path, capsys, monkeypatch):
    """Steps 0-8 then 8-12 via --resume equal steps 0-12 in one run (same weights, EMA and optimizer state);
    FID and IS through torch-fidelity, with a small stand-in for its Inception network."""
    small_inception(monkeypatch, tmp_path)
    base = TINY + ['--data-dir', cifar, '--epochs', '1', '--train-images', '192', '--cfg', '2']
    d.main(base + ['--out-dir', str(tmp_path / 'a'), '--fid', '20', '--fid-every', '1'])
    out = capsys.readouterr().out
    assert '10 classes' in out and 'step 12/12' in out
    assert re.search(r'eval \| epoch 1\.00 \| step 12 \| fid \d+\.\d+ \| is \d+\.\d+', out), out
    for f in ('ckpt.pt', 'samples.png', 'interpolation.png', 'loss.png', 'fid.png', 'config.json', 'ddpm_cifar.py'):
        assert (tmp_path / 'a' / f).exists(), f
    cached = {f.name for f in (tmp_path / 'torch_home' / 'fidelity_cache').iterdir()}  # the reference's, once
    assert [f for f in cached if f.startswith('cifar10_') and f.endswith('_32_192-inception-v3-compat-stat-fid-2048.pt')], cached
    d.main(base + ['--out-dir', str(tmp_path / 'b'), '--max-steps', '8'])
    capsys.readouterr()
    d.main(['--out-dir', str(tmp_path / 'b'), '--device', 'cpu', '--resume', 'true'])  # the rest: the checkpoint's
    out = capsys.readouterr().out
    assert f"continuing {tmp_path / 'b' / 'ckpt.pt'} (step 8); changed flags: None\n" in out and 'step 12/12' in out
    wa, wb = (torch.load(tmp_path / p / 'ckpt.pt', weights_only=True) for p in 'ab')
    assert wa['step'] == wb['step'] == 12 and wa['classes'] == wb['classes'] and wa['fid'][0][0] == 12
    for part in ('model', 'ema'):
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)
    d.main(base + ['--out-dir', str(tmp_path / 'a'), '--sample-only', 'true', '--n-samples', '7', '--fid', '20'])
    out = capsys.readouterr().out
    f = np.load(tmp_path / 'a' / 'samples.npz')
    assert f['images'].shape == (7, 32, 32, 3) and f['images'].dtype == np.uint8 and f['labels'].tolist() == list(range(7))
    assert re.search(r'eval \| step 12 \| fid \d+\.\d+ \| is \d+\.\d+ \| 20 samples, cfg 2.0', out), out


def test_nothing_is_lost(tmp_path, monkeypatch, capsys):
    run = TINY + ['--dataset', 'shapes', '--image-size', '16', '--train-images', '64', '--max-steps', '4',
                  '--out-dir', str(tmp_path)]
    check_nothing_is_lost(d.main, run, ['--channels', '64'], monkeypatch, capsys)


def test_a_corrupt_image_met_by_one_torchrun_process_ends_the_run(tmp_path):
    """Two processes under torchrun, and a truncated png in rank 1's rows of step 1 (by the order batches() states),
    never in rank 0's: rank 1 stops on PIL's error and torchrun ends rank 0, whose loader workers ignore SIGTERM and
    are shut down in batches()' finally (they used to hold the job until the 2-hour timeout). The checkpoint of
    step 1 is kept; with the file replaced, --resume finishes the run."""
    from torch.utils.data import DistributedSampler
    root = write_folder(str(tmp_path / 'd'), n=16)
    ds, _ = d.load_data(d.get_config(['--dataset', 'folder', '--data-dir', root, '--image-size', '16']))
    sampler = DistributedSampler(range(len(ds)), 2, 1, shuffle=True, seed=0, drop_last=True)
    victim = ds.samples[list(sampler)[8]][0]  # batch 16 is 8 rows a process a step: rank 1's first row of step 1
    data = open(victim, 'rb').read()
    open(victim, 'wb').write(data[:len(data) // 2])  # the header still reads
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master-port=29533',
                os.path.join(HERE, 'ddpm_cifar.py'), *TINY, '--dataset', 'folder', '--data-dir', root, '--image-size', '16',
                '--out-dir', str(tmp_path / 'o'), '--workers', '1', '--epochs', '3', '--save-every', '1']
    stopped = run_alone(torchrun, timeout=120)
    assert stopped.returncode != 0 and 'truncated' in stopped.stderr, stopped.stderr[-2000:]
    assert torch.load(tmp_path / 'o' / 'ckpt.pt', weights_only=True)['step'] == 1
    open(victim, 'wb').write(data)
    resumed = run_alone([*torchrun, '--resume', 'true'], timeout=120)
    assert resumed.returncode == 0 and 'step 6/6' in resumed.stdout, resumed.stderr[-2000:]


class ConvNet(torch.nn.Module):
    """Another network under the contract make_model states: (x_t, t, y) -> eps, and nothing else."""
    def __init__(self, num_classes):
        super().__init__()
        self.label, self.time = torch.nn.Embedding(num_classes + 1, 8), torch.nn.Linear(1, 8)
        self.inp, self.out = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t, y):
        h = self.inp(x) + (self.label(y) + self.time(t.float()[:, None] / 1000))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def test_another_network_trains_resumes_samples_and_draws(tmp_path, capsys, monkeypatch):
    """A 3-layer conv net swapped in for the U-Net: training, figures, the shapes check, --resume and --sample-only
    run end to end on it."""
    monkeypatch.setattr(d, 'make_model', lambda c, num_classes: ConvNet(num_classes))
    run = TINY + ['--dataset', 'shapes', '--image-size', '16', '--train-images', '64', '--out-dir', str(tmp_path)]
    d.main(run + ['--max-steps', '4'])
    d.main(run + ['--max-steps', '6', '--resume', 'true'])
    d.main(run + ['--sample-only', 'true', '--n-samples', '5'])
    out = capsys.readouterr().out
    assert 'step 4/4' in out and 'continuing' in out and 'step 6/6' in out and 'shapes: the requested class' in out
    assert set(torch.load(tmp_path / 'ckpt.pt', weights_only=True)['model']) == set(ConvNet(3).state_dict())
    for f in ('samples.png', 'interpolation.png', 'loss.png', 'samples.npz'):
        assert (tmp_path / f).exists(), f


def test_unconditional_folder_run_refuses_cfg(tmp_path, capsys):
    flat = tmp_path / 'flat'
    write_folder(str(tmp_path / 'tmp'), classes=('x',), n=16)
    os.rename(tmp_path / 'tmp' / 'x', flat)
    run = TINY + ['--dataset', 'folder', '--data-dir', str(flat), '--image-size', '16', '--out-dir', str(tmp_path / 'o'),
                  '--max-steps', '2']
    d.main(run)  # the default --cfg is not applied to an unconditional model
    assert 'no classes' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        d.main(run + ['--cfg', '3', '--overwrite', 'true'])
    assert 'unconditional; drop --cfg' in str(e.value)
    with pytest.raises(SystemExit) as e:
        d.main(run + ['--sample-only', 'true', '--cfg', '3'])
    assert 'unconditional (no classes); drop --cfg' in str(e.value)


def test_bfloat16_autocast_on_cpu(tmp_path, capsys):
    d.main(TINY + ['--dataset', 'shapes', '--image-size', '16', '--train-images', '64', '--max-steps', '2', '--dtype', 'bfloat16',
                   '--out-dir', str(tmp_path)])
    out = capsys.readouterr().out
    assert 'cpu, bfloat16' in out and torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 2


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_to_the_process_group_saves_and_resumes_exactly(tmp_path, sig):
    argv = TINY + ['--dataset', 'shapes', '--image-size', '16', '--epochs', '500', '--save-every', '100000',
                   '--train-images', '256', '--out-dir', str(tmp_path / 'stopped')]
    check_stop_signal_saves(os.path.join(HERE, 'ddpm_cifar.py'), argv, tmp_path / 'stopped' / 'ckpt.pt', 4, sig)
    check_resume_after_a_stop_is_exact(d.main, argv, tmp_path / 'stopped', ('model', 'ema'))


def test_ctrl_c_saves_with_loader_workers_and_compile(tmp_path):
    """An image folder decoded by 2 DataLoader workers, the model under torch.compile: Ctrl-C reaches the workers and
    inductor's compile processes too, and the run still saves at the next step boundary. (A one-level U-Net at 8
    pixels: compiling it on 2 CPU cores takes about a minute.)"""
    argv = TINY + ['--dataset', 'folder', '--data-dir', write_folder(str(tmp_path / 'imgs'), n=16), '--image-size', '8',
                   '--channel-mults', '1', '--res-blocks', '1', '--epochs', '500', '--save-every', '100000',
                   '--workers', '2', '--compile', 'true']
    check_stop_signal_saves(os.path.join(HERE, 'ddpm_cifar.py'), argv + ['--out-dir', str(tmp_path / 'o')],
                            tmp_path / 'o' / 'ckpt.pt', 4, signal.SIGINT)


def test_torchrun_two_processes_train_the_same_model_as_one(tmp_path):
    run = [*TINY, '--dataset', 'shapes', '--image-size', '16', '--train-images', '96', '--max-steps', '6', '--log-every', '1',
           '--dropout', '0', '--n-samples', '3']
    check_torchrun_matches_one_process(os.path.join(HERE, 'ddpm_cifar.py'), run, tmp_path, 29531, 6)


def test_more_torchrun_processes_than_gpus_or_a_missing_gpu_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a: True)
    monkeypatch.setenv('LOCAL_RANK', '1')  # torchrun's second process on a 1-GPU machine
    for device in ('auto', 'cuda:5'):
        with pytest.raises(SystemExit) as e:
            d.setup(d.get_config(['--device', device, '--out-dir', str(tmp_path)]))
        msg = str(e.value)
        assert f"no cuda:{'1' if device == 'auto' else '5'}: 1 GPU(s) here" in msg and '\n' not in msg, msg


def test_guidance_steers_towards_the_requested_class(tmp_path, capsys):
    """The README's CPU command (620 steps on the 3 generated colour classes), then 90 samples per setting, 30
    asking for each class. Unguided (s = 0) the requested class comes out by chance, 1/3 (standard error
    sqrt(2/9 / 90) = 0.05); guided at s = 3 nearly always. The class of a sample is its brightest channel. (148
    steps gave 77% guided once the tiny preset's betas reached abar_T = 3e-5; 620 give 100%.)"""
    d.main(['--preset', 'tiny', '--dataset', 'shapes', '--image-size', '16', '--out-dir', str(tmp_path), '--device', 'cpu',
            '--n-samples', '3'])
    line = re.search(r'in 90 samples \| cfg 0: (\d+)% \| cfg 3: (\d+)%', capsys.readouterr().out)
    unguided, guided = int(line[1]) / 100, int(line[2]) / 100
    assert abs(unguided - 1 / 3) < Z * math.sqrt(2 / 9 / 90) and guided > 0.9, (unguided, guided)


@pytest.mark.parametrize('extra, says', [
    (['--image-size', '36', '--dataset', 'folder'], 'so k * 8'),
    (['--image-size', '64'], 'CIFAR-10 is 32x32'),
    (['--p-uncond', '0'], '--cfg needs the null class: --p-uncond > 0'),
    (['--sampler', 'ddpm', '--sample-steps', '20'], '--sampler ddim'),
    (['--resume', 'true', '--overwrite', 'true'], 'pick one'),
    (['--fid-every', '5'], '--fid N'),
    (['--dtype', 'float16'], 'needs CUDA'),
    (['--resume', 'true'], 'no readable checkpoint'),
])
def test_bad_flags_exit_with_one_line(tmp_path, extra, says):
    with pytest.raises(SystemExit) as e:
        d.main(['--out-dir', str(tmp_path / 'run'), '--device', 'cpu'] + extra)
    assert says in str(e.value) and '\n' not in str(e.value)


def test_fid_without_torch_fidelity_fails_before_training(cifar, skip_md5, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_fidelity', None)  # as if not installed: find_spec gives None
    with pytest.raises(SystemExit) as e:
        d.main(TINY + ['--data-dir', cifar, '--out-dir', str(tmp_path), '--fid', '10'])
    assert 'pip install torch-fidelity' in str(e.value) and not (tmp_path / 'ckpt.pt').exists()


def test_wrong_checkpoints_and_nan_keep_the_last_good_one(cifar, skip_md5, tmp_path):
    run = TINY + ['--data-dir', cifar, '--out-dir', str(tmp_path), '--train-images', '64', '--epochs', '1']
    d.main(run)
    with pytest.raises(SystemExit) as e:
        d.main(run + ['--resume', 'true', '--channels', '64'])
    assert 'channels 32 (flag 64)' in str(e.value)
    with pytest.raises(SystemExit) as e:
        d.main(run + ['--resume', 'true', '--epochs', '3', '--lr', '1e30', '--warmup', '0', '--grad-clip', '0'])
    assert 'loss is' in str(e.value) and 'holds step 4' in str(e.value)
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 4  # the first run's, untouched
    check_foreign_and_broken_checkpoints(d.main, run + ['--sample-only', 'true'], 'ddpm_cifar.py')


def test_unknown_flag_is_one_usage_error(capsys):
    check_unknown_flag(d.get_config, capsys)
