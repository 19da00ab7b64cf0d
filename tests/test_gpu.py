"""What only a GPU can check; every test here skips without CUDA. Each image script trains a few steps on CUDA in
bfloat16, in float16 with its GradScaler, and under torch.compile, in channels_last, then samples from its checkpoint
(--sample-only); torchrun --nproc_per_node=1 runs each in an NCCL process group; more torchrun processes than GPUs
stop with the scripts' one line; Ctrl-C saves a compiled bfloat16 run. The samplers' closed-form checks run on CUDA
from their own test files (parametrised by device). tests/gpu_check.sh runs this file with the rest of the GPU checks."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from closed_form import check_stop_signal_saves, write_mnist

import ddpm_cifar
import ddpm_mnist
import gan_baseline
import score_sde

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {m.__name__: m for m in (ddpm_cifar, ddpm_mnist, score_sde, gan_baseline)}
RUNS = {  # tiny models; MNIST-format synthetic digits (ddpm_cifar: its generated shapes)
    'ddpm_cifar': ['--preset', 'tiny', '--dataset', 'shapes', '--image-size', '16', '--train-images', '256',
                   '--sample-steps', '5', '--n-samples', '4'],
    'ddpm_mnist': ['--channels', '16', '--timesteps', '20', '--sample-steps', '5', '--n-samples', '4'],
    'score_sde': ['--channels', '16', '--steps', '5', '--n-samples', '4', '--sampler', 'em'],
    'gan_baseline': ['--channels', '8', '--n-samples', '4', '--eval-samples', '20', '--fid-every', '0', '--loss', 'wgan-gp'],
}
COMMON = ['--batch-size', '32', '--max-steps', '6', '--log-every', '3', '--device', 'cuda']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_mnist(str(tmp_path_factory.mktemp('mnist')))


@pytest.mark.parametrize('dtype, compile', [('bfloat16', 'false'), ('float16', 'false'), ('bfloat16', 'true')])
@pytest.mark.parametrize('name', list(RUNS))
def test_trains_and_samples_on_cuda(name, dtype, compile, data, tmp_path, capsys):
    argv = RUNS[name] + COMMON + ['--data-dir', data, '--out-dir', str(tmp_path), '--dtype', dtype, '--compile', compile]
    MODULES[name].main(argv)
    out = capsys.readouterr().out
    assert f'cuda:0, {dtype}, 1 process(es)' in out and 'step 6/6' in out, out
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    weights = ckpt['G' if name == 'gan_baseline' else 'model']
    assert ckpt['step'] == 6 and all(torch.isfinite(w.float()).all() for w in weights.values())
    conv = next(w for w in weights.values() if w.dim() == 4 and w.shape[1] > 1 and w.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # saved as trained
    scalers = [ckpt[k] for k in ckpt if k.startswith('scaler')]
    assert scalers and all(bool(s) == (dtype == 'float16') for s in scalers)  # a GradScaler's state only for float16
    MODULES[name].main(argv + ['--sample-only', 'true'])
    with np.load(tmp_path / 'samples.npz') as f:
        assert len(f[f.files[0]]) == 4


def torchrun(nproc, name, argv, port):
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
                           f'--master-port={port}', os.path.join(HERE, f'{name}.py'), *argv], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize('name', list(RUNS))
def test_torchrun_one_process_with_nccl(name, data, tmp_path):
    port = 29541 + list(RUNS).index(name)  # a port each, so the tests may run side by side (pytest -n)
    r = torchrun(1, name, RUNS[name] + COMMON + ['--data-dir', data, '--out-dir', str(tmp_path)], port)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'cuda:0' in r.stdout and '1 process(es)' in r.stdout and 'step 6/6' in r.stdout
    assert torch.load(tmp_path / 'ckpt.pt', weights_only=True)['step'] == 6


def test_more_torchrun_processes_than_gpus_stop_with_one_line(data, tmp_path):
    n = torch.cuda.device_count()
    r = torchrun(n + 1, 'ddpm_mnist', RUNS['ddpm_mnist'] + COMMON + ['--data-dir', data, '--out-dir', str(tmp_path)],
                 29549)
    assert r.returncode != 0 and f'no cuda:{n}: {n} GPU(s) here' in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / 'ckpt.pt').exists()


@pytest.mark.parametrize('name', ['ddpm_cifar', 'ddpm_mnist'])
def test_ctrl_c_saves_a_compiled_run(name, data, tmp_path):
    """SIGINT to the process group of a --compile true run on CUDA, once its 4th step is printed: a checkpoint of a
    later step, and one line. (A compiled run stopped this way once wrote nothing on a GPU.)"""
    argv = RUNS[name] + ['--batch-size', '32', '--log-every', '1', '--epochs', '200', '--save-every', '100000',
                         '--compile', 'true', '--dtype', 'bfloat16', '--device', 'cuda', '--data-dir', data,
                         '--out-dir', str(tmp_path)]
    check_stop_signal_saves(os.path.join(HERE, f'{name}.py'), argv, tmp_path / 'ckpt.pt', 4, signal.SIGINT)
