"""Checks and helpers shared by the scripts' tests: closed-form checks for schedules indexed t = 0..T-1 (the papers'
1..T), MNIST-format data for the tiny runs, reading a checkpoint's step, and the checks every image script passes
(foreign checkpoints, unknown flags, stop signals, torchrun equivalence)."""
import errno
import math
import os
import re
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch


def check_posterior_is_bayes(module, betas, t):
    """module.q_posterior_mean_var against conditioning the joint Gaussian of (x_{t-1}, x_t) given x0:
    Cov(x_{t-1}, x_t | x0) = sqrt(1 - beta_t) (1 - abar_{t-1}), abar_{-1} = 1 (x_{-1} is x0 itself)."""
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0, xt = torch.tensor([0.3, -1.2], dtype=torch.float64), torch.tensor([1.1, 0.4], dtype=torch.float64)
    mean, var = module.q_posterior_mean_var(x0, xt, t, betas, alphas_cumprod)
    ap, a = (alphas_cumprod[t - 1].item() if t > 0 else 1.0), alphas_cumprod[t].item()
    cov = math.sqrt(1 - betas[t].item()) * (1 - ap)
    np.testing.assert_allclose(mean.numpy(), (math.sqrt(ap) * x0 + cov / (1 - a) * (xt - math.sqrt(a) * x0)).numpy(),
                               rtol=1e-10, atol=1e-14)
    assert math.isclose(var.item(), (1 - ap) - cov ** 2 / (1 - a), rel_tol=1e-9, abs_tol=1e-15)


def check_q_sample_is_iterated_chain(module, betas):
    """module.q_sample against iterating x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z from (x0, 0):
    mean_t = sqrt(1 - beta_t) mean_{t-1}, var_t = (1 - beta_t) var_{t-1} + beta_t (the +-1 noise draws give both)."""
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    x0, mean, var = torch.tensor(0.6, dtype=torch.float64), 0.6, 0.0
    for t in range(len(betas)):
        b = betas[t].item()
        mean, var = math.sqrt(1 - b) * mean, (1 - b) * var + b
        lo, hi = (module.q_sample(x0, alphas_cumprod[t], torch.tensor(z, dtype=torch.float64)).item() for z in (-1.0, 1.0))
        assert math.isclose((hi + lo) / 2, mean, rel_tol=1e-10, abs_tol=1e-14)
        assert math.isclose((hi - lo) / 2, math.sqrt(var), rel_tol=1e-10)


def exact_sampler_moments(betas, steps, method, mu, std):
    """Output mean and variance of the discretised sampler (x0 clipping aside) driven by eps* for x0 ~ N(mu, std^2):
    every step is affine in x, x' = A x + b + s z, so from x_T ~ N(0, 1) they follow exactly (float64).
    'ddpm' uses sigma^2 = beta_tilde; 'ddim' is eta = 0 with eps recomputed from x0_hat, as the scripts do."""
    alphas_cumprod, m, v = torch.cumprod(1 - betas, 0), 0.0, 1.0
    T = len(betas)
    ts = list(range(T - 1, -1, -1)) if method == 'ddpm' else torch.linspace(T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a = alphas_cumprod[t].item()
        k = math.sqrt(1 - a) / (a * std ** 2 + 1 - a)  # eps*(x) = k (x - sqrt(a) mu)
        A0, b0 = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * mu  # x0_hat = A0 x + b0
        if method == 'ddpm':
            ap = alphas_cumprod[t - 1].item() if t > 0 else 1.0
            c0, ct = math.sqrt(ap) * betas[t].item() / (1 - a), math.sqrt(1 - betas[t].item()) * (1 - ap) / (1 - a)
            A, b, s2 = c0 * A0 + ct, c0 * b0, (1 - ap) / (1 - a) * betas[t].item()
        else:
            ap = alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
            Ae, be = (1 - math.sqrt(a) * A0) / math.sqrt(1 - a), -math.sqrt(a) * b0 / math.sqrt(1 - a)
            A, b, s2 = math.sqrt(ap) * A0 + math.sqrt(1 - ap) * Ae, math.sqrt(ap) * b0 + math.sqrt(1 - ap) * be, 0.0
        m, v = A * m + b, A * A * v + s2
    return m, v


def write_mnist(root, n_train=256, n_test=64):
    """Synthetic digits in MNIST's idx format under root/MNIST/raw: class k is a bar at angle 18k degrees
    through the centre, so a classifier can learn them; uint8 images, labels 0..9 in turn."""
    raw = os.path.join(root, 'MNIST', 'raw')
    os.makedirs(raw, exist_ok=True)
    yy, xx = np.mgrid[0:28, 0:28] - 13.5
    rng = np.random.default_rng(0)
    for name, n in (('train', n_train), ('t10k', n_test)):
        labels = np.arange(n) % 10
        ang = labels * math.pi / 10 + rng.normal(0, 0.05, n)
        dist = np.abs(np.cos(ang)[:, None, None] * yy - np.sin(ang)[:, None, None] * xx)  # distance to the line
        images = (255 * np.clip(2.0 - dist, 0, 1) * (np.hypot(yy, xx) < 11)).astype(np.uint8)
        with open(os.path.join(raw, f'{name}-images-idx3-ubyte'), 'wb') as f:
            f.write(np.array([2051, n, 28, 28], '>i4').tobytes() + images.tobytes())
        with open(os.path.join(raw, f'{name}-labels-idx1-ubyte'), 'wb') as f:
            f.write(np.array([2049, n], '>i4').tobytes() + labels.astype(np.uint8).tobytes())
    return root


def ckpt_step(path):
    try:
        return torch.load(path, weights_only=True)['step']
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def check_foreign_and_broken_checkpoints(main, argv, script):
    """main(argv) with, as ckpt.pt in its --out-dir, a checkpoint another script wrote, then one with this script's
    name but no config, then a file that is no checkpoint at all: each stops with one line saying so."""
    ckpt = os.path.join(argv[argv.index('--out-dir') + 1], 'ckpt.pt')
    torch.save({'model': {}, 'script': 'another_script.py'}, ckpt)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert f'is not a checkpoint of {script}' in str(e.value) and '\n' not in str(e.value), str(e.value)
    torch.save({'model': {}, 'script': script, 'step': 3}, ckpt)  # this script's name, but no config
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert f'is not a checkpoint of {script}' in str(e.value) and '\n' not in str(e.value), str(e.value)
    with open(ckpt, 'wb') as f:
        f.write(b'not a checkpoint')
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert 'no readable checkpoint' in str(e.value) and '\n' not in str(e.value), str(e.value)


def check_unknown_flag(get_config, capsys):
    """A misspelt flag is argparse's one usage error (exit 2), naming the flag."""
    with pytest.raises(SystemExit) as e:
        get_config(['--epoch', '3'])
    assert e.value.code == 2 and 'unrecognized arguments: --epoch' in capsys.readouterr().err


def check_the_average_keeps_no_graph(module, argv):
    """The EMA weights train() returns are plain tensors: an average updated under autograd (its lerp reads the
    trained weights, which require grad) chains every step onto its weights, a graph as long as the run that holds
    memory and that each gradient through the sampled model walks (the likelihood ODE slowed to a halt after a run)."""
    c = module.get_config(argv)
    module.check_config(c)
    model = module.train(c, *module.setup(c))[0]
    assert all(p.grad_fn is None and not p.requires_grad for p in model.parameters())


def check_stop_signal_saves(script, argv, ckpt, at_step, sig):
    """Runs script with argv in a process group of its own and, once it prints 'step {at_step}/', sends sig to the
    whole group, as a terminal's Ctrl-C (SIGINT) or a cluster scheduler (SIGTERM) does: DataLoader and compile workers
    get it too. The run must exit with code 1 and one line naming the signal (no traceback), leaving a checkpoint at
    or after that step and short of the run's end, and no temporary file."""
    with tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen([sys.executable, script, *argv], env=dict(os.environ, OMP_NUM_THREADS='1'),
                                stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            total = None
            for line in proc.stdout:
                if line.startswith(f'step {at_step}/'):
                    total = int(line.split('/')[1].split()[0])
                    os.killpg(proc.pid, sig)
                    break
            proc.communicate(timeout=300)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # a hung run, or workers left behind
            except ProcessLookupError:
                pass
        err.seek(0)
        err = err.read()
    assert total is not None, f'no progress line for step {at_step}: {err[-2000:]}'
    assert proc.returncode == 1 and 'interrupted at step' in err and sig.name in err and 'Traceback' not in err, err[-3000:]
    assert at_step <= ckpt_step(ckpt) < total and not [f for f in os.listdir(os.path.dirname(ckpt)) if '.tmp' in f]


def check_resume_after_a_stop_is_exact(main, argv, out, parts, more=4):
    """After a stop saved step s in out (check_stop_signal_saves), main(argv) resumed to s + more leaves bitwise the
    weights of one uninterrupted run to s + more: the stop saved a whole step. One thread, as the stopped run had
    (OMP_NUM_THREADS=1), since CPU reductions round differently with another thread count."""
    s, threads = ckpt_step(out / 'ckpt.pt'), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(argv + ['--out-dir', str(out), '--resume', 'true', '--max-steps', str(s + more)])
        main(argv + ['--out-dir', str(out.parent / 'whole'), '--max-steps', str(s + more)])
    finally:
        torch.set_num_threads(threads)
    wa, wb = (torch.load(p / 'ckpt.pt', weights_only=True) for p in (out, out.parent / 'whole'))
    assert wa['step'] == wb['step'] == s + more
    for part in parts:
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)


def losses_of(stdout):
    return [float(v) for v in re.findall(r'^step \d+/\d+ \| loss ([\d.]+)', stdout, re.M)]


def run_alone(cmd, timeout=300):
    """subprocess.run(cmd), one thread, in a process group of its own that is killed whole afterwards: a run that
    hangs (torchrun's processes waiting on each other) fails the test at the timeout and does not outlive it."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_torchrun_matches_one_process(script, argv, out, port, steps):
    """argv (logging every step) run by 1 process, and by 2 gloo processes under torchrun, each with half of the
    global batch. Each step's loss is the mean over the same images, t and noise (drawn for the global batch, rank r
    taking rows r::2), so the two runs agree up to float32 rounding of the reductions (relative 1e-4), and so do the
    weights they save. In float32 on any host: --dtype auto picks bfloat16 on a CPU with native bf16, whose 8-bit
    mantissas round far above this."""
    argv = [*argv, '--dtype', 'float32']
    one = run_alone([sys.executable, script, *argv, '--out-dir', str(out / 'one')])
    two = run_alone([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master-port={port}',
                     script, *argv, '--out-dir', str(out / 'two')])
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-1500:], two.stderr[-1500:])
    assert '2 process(es)' in two.stdout and len(losses_of(one.stdout)) == steps
    np.testing.assert_allclose(losses_of(two.stdout), losses_of(one.stdout), rtol=1e-4)
    wa, wb = (torch.load(out / p / 'ckpt.pt', weights_only=True)['model'] for p in ('one', 'two'))
    for k in wa:
        np.testing.assert_allclose(wa[k].numpy(), wb[k].numpy(), atol=1e-4, err_msg=k)


def full_disk(obj, f, *a, **k):
    """In place of torch.save(obj, f) or Figure.savefig(fig, f): 1000 bytes written to f, then the disk is full."""
    with open(f, 'wb') as fh:
        fh.write(b'\0' * 1000)
    raise OSError(errno.ENOSPC, 'No space left on device')


def check_nothing_is_lost(main, argv, other_arch, monkeypatch, capsys):
    """The faults a user meets on a finished tiny run main(argv), each one line and a non-zero exit:
    - a second run without --resume stops (resume, or --overwrite true) and writes nothing;
    - --resume with another architecture (other_arch flags), or with a batch larger than the data, stops and writes
      nothing (config.json stays the run's);
    - a run while another process holds the out-dir's lock stops naming the out-dir;
    - a checkpoint save that fails part-way (ENOSPC injected into torch.save) names the path and the cause, removes
      its temporary file and keeps the last checkpoint byte for byte;
    - divergence (--lr 1e30, a save every step) stops naming the steps and the checkpoint on disk, which holds only
      finite numbers."""
    out = argv[argv.index('--out-dir') + 1]
    ckpt = os.path.join(out, 'ckpt.pt')
    main(argv)
    read = lambda: {f: open(os.path.join(out, f), 'rb').read() for f in os.listdir(out)
                    if os.path.isfile(os.path.join(out, f))}
    files = read()
    for extra, says in (([], '--overwrite true'), (['--resume', 'true'] + other_arch, 'different model'),
                        (['--resume', 'true', '--batch-size', '100000'], 'lower --batch-size')):
        with pytest.raises(SystemExit) as e:
            main(argv + extra)
        assert says in str(e.value) and '\n' not in str(e.value), str(e.value)
        assert read() == files, 'a refused run wrote into the out-dir'
    for lock in sys.modules[main.__module__].LOCK:  # as the process of the last run would at its end
        lock.close()
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, os.path.join(out, '.lock')], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(SystemExit) as e:
            main(argv + ['--overwrite', 'true'])
    finally:
        holder.kill()
        holder.wait()
    assert f'another run is using --out-dir {out}' in str(e.value), str(e.value)
    assert ckpt_step(ckpt) == int(argv[argv.index('--max-steps') + 1])
    monkeypatch.setattr(torch, 'save', full_disk)
    with pytest.raises(SystemExit) as e:
        main(argv + ['--overwrite', 'true'])
    monkeypatch.undo()
    msg = str(e.value)
    assert f'could not write {ckpt} (No space left on device)' in msg and '\n' not in msg, msg
    assert open(ckpt, 'rb').read() == files['ckpt.pt'] and not [f for f in os.listdir(out) if '.tmp' in f]
    with pytest.raises(SystemExit) as e:
        main(argv + ['--overwrite', 'true', '--lr', '1e30', '--save-every', '1', '--log-every', '1'])
    msg = str(e.value)
    m = re.search(r'in steps \d+-(\d+); (.*) holds step (\d+); try a lower --lr', msg)
    assert (m and m[2] == ckpt and int(m[3]) < int(m[1])) or 'this run saved none' in msg, msg
    saved = torch.load(ckpt, weights_only=True)
    assert all(t.isfinite().all() for t in tensors_in(saved)), msg


HOLD_LOCK = """import fcntl, sys, time
f = open(sys.argv[1], 'a+')
fcntl.flock(f, fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(600)
"""


def tensors_in(obj):
    """Every floating-point tensor in a nested checkpoint (dicts, lists, tuples)."""
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in items for t in tensors_in(v)]


def check_truncated_mnist_is_named(load, tmp):
    """load(root) on MNIST files whose training images are cut in half: one line naming the folder and saying a file
    there is missing or damaged."""
    root = write_mnist(str(tmp))
    f = os.path.join(root, 'MNIST', 'raw', 'train-images-idx3-ubyte')
    data = open(f, 'rb').read()
    open(f, 'wb').write(data[:len(data) // 2])
    with pytest.raises(SystemExit) as e:
        load(root)
    assert 'missing or damaged' in str(e.value) and root in str(e.value) and '\n' not in str(e.value), str(e.value)


def small_inception(monkeypatch, tmp_path):
    """torch-fidelity with a stand-in for its Inception network, so no weights are downloaded: per-channel
    means and standard deviations as the '2048' features, 5 times the means as the logits; TORCH_HOME (its
    statistics cache) under tmp_path."""
    from torch_fidelity import registry
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class Small(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return '2048', 'logits_unbiased'

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {'isc': 'logits_unbiased', 'fid': '2048'}[metric]

        def forward(self, x):
            f = torch.cat([x.float().mean((2, 3)), x.float().std((2, 3))], 1) / 255
            return tuple({'2048': f, 'logits_unbiased': 5 * f[:, :3]}[k] for k in self.features_list)
    monkeypatch.setitem(registry.FEATURE_EXTRACTORS_REGISTRY, 'inception-v3-compat', Small)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
