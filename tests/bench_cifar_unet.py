"""How fast ddpm_cifar.py trains, and how much of that its training loop costs: in one run, on any device,
  1. the bare step of the script's U-Net (forward, the loss, backward, gradient clipping as configured, AdamW; inputs
     already on the device, in the script's layout and autocast), eager and under torch.compile;
  2. the same bare step of diffusers' UNet2DModel in the same DDPM CIFAR-10 layout (google/ddpm-cifar10-32's config
     plus 11 class embeddings; the default preset only, when diffusers is installed), eager and compiled;
  3. the script's own train() (data, the noise draw, the step, EMA, logging; no figures) for --loop-steps steps,
     its ms/step per logging window as it prints them, eager and compiled, the median of the windows after the first
     (compile and warm-up) set beside the bare step: loop share = 1 - bare / loop, the part of each step outside the
     model's own work.
Bare steps alternate eager/compiled and ours/theirs round by round, --rounds before the loop runs and --rounds after
it; medians over all of them. Not collected by pytest.

    python tests/bench_cifar_unet.py                                       # GPU: default U-Net, batch 128, bf16
    python tests/bench_cifar_unet.py --preset tiny --batch-size 32 --compile false --device cpu   # this CPU
    pip install diffusers   # for row 2
"""
import argparse
import contextlib
import io
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm_cifar  # noqa: E402


def diffusers_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2, dropout=0.1,
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), num_class_embeds=11)


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


class BareStep:
    """One model's training step on one fixed batch of the script's data, noised as the script does (x_t from
    q_sample at random t), as the script configures it: forward (autocast), the squared error to the noise, backward,
    clip, AdamW with the script's weight decay."""
    def __init__(self, model, call, c, dev, compiled, x0, y):
        layout = torch.channels_last if dev.type == 'cuda' else torch.contiguous_format
        self.model, self.dev, self.clip = model.to(dev, memory_format=layout).train(), dev, c['grad_clip']
        self.net = torch.compile(self.model) if compiled else self.model
        self.call = call
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=c['lr'], weight_decay=c['weight_decay'],
                                     fused=dev.type == 'cuda')
        self.autocast = torch.autocast(dev.type, dtype=getattr(torch, c['dtype'])) if c['dtype'] != 'float32' else nullcontext()
        g = torch.Generator(dev).manual_seed(0)
        alphas_cumprod = torch.cumprod(1 - ddpm_cifar.make_betas(c), 0).float().to(dev)
        self.noise = torch.randn(x0.shape, generator=g, device=dev)
        self.t = torch.randint(0, c['timesteps'], (len(x0),), generator=g, device=dev)
        self.x = ddpm_cifar.q_sample(x0, alphas_cumprod[self.t].view(-1, 1, 1, 1), self.noise).contiguous(memory_format=layout)
        self.y = y

    def __call__(self, steps):
        """ms per step over `steps` steps (the device synchronised before and after)."""
        sync(self.dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            with self.autocast:
                loss = (self.call(self.net, self.x, self.t, self.y).float() - self.noise).square().mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
        sync(self.dev)
        return (time.perf_counter() - t0) / steps * 1e3


def loop_windows(argv, dev, compiled):
    """ddpm_cifar.train() as the script runs it (its own flags), printing as it goes; its per-window ms/step."""
    print(f"loop | ddpm_cifar.py train(), {'compiled' if compiled else 'eager'}, {argv[argv.index('--max-steps') + 1]} steps:")
    c = ddpm_cifar.get_config(argv + ['--compile', str(compiled).lower()])
    ddpm_cifar.check_config(c)
    with tempfile.TemporaryDirectory() as out:
        c['out_dir'] = out
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ddpm_cifar.train(c, dev, 0, 1)
    text = buf.getvalue()
    print(''.join('    ' + line + '\n' for line in text.splitlines() if line.startswith('step')), end='')
    return [float(v) for v in re.findall(r'^step \d+/\d+ .*?\| ([\d.]+) ms/step', text, re.M)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='default', choices=['default', 'tiny'])
    ap.add_argument('--batch-size', type=int, default=128)
    ap.add_argument('--device', default='auto')
    ap.add_argument('--dtype', default='auto', help="auto = bfloat16 on CUDA, float32 elsewhere (as the script)")
    ap.add_argument('--compile', default='both', choices=['both', 'false', 'true'])
    ap.add_argument('--rounds', type=int, default=5, help='rounds of bare steps; the median is printed')
    ap.add_argument('--steps', type=int, default=10, help='bare steps timed per round (after one untimed)')
    ap.add_argument('--loop-steps', type=int, default=300, help="train() steps, in windows of --log-every")
    ap.add_argument('--log-every', type=int, default=50)
    ap.add_argument('--dataset', default='shapes', help="the script's --dataset (shapes: generated, needs no files)")
    ap.add_argument('--data-dir', default='./data')
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.backends.cudnn.benchmark = dev.type == 'cuda'
    dtype = a.dtype if a.dtype != 'auto' else 'bfloat16' if dev.type == 'cuda' else 'float32'
    argv = ['--preset', a.preset, '--batch-size', str(a.batch_size), '--dtype', dtype, '--max-steps', str(a.loop_steps),
            '--log-every', str(a.log_every), '--save-every', str(10 ** 9), '--dataset', a.dataset, '--data-dir', a.data_dir,
            '--workers', '0', '--epochs', str(10 ** 6)]
    if a.dataset == 'shapes':
        argv += ['--train-images', str(max(2000, a.batch_size * 20))]
    c = ddpm_cifar.get_config(argv)
    modes = {'both': (False, True), 'false': (False,), 'true': (True,)}[a.compile]
    name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__} | {dev} ({name}) | {dtype} | batch {a.batch_size} | preset {a.preset}, '
          f"{c['image_size']}px | grad clip {c['grad_clip']}")

    models = {'ddpm_cifar UNet': lambda: ddpm_cifar.make_model(c, 10)}
    calls = {'ddpm_cifar UNet': lambda m, x, t, y: m(x, t, y)}
    if a.preset == 'default':
        try:
            diffusers_unet()
            models['diffusers UNet2DModel'] = diffusers_unet
            calls['diffusers UNet2DModel'] = lambda m, x, t, y: m(x, t, class_labels=y).sample
        except ImportError:
            print('(diffusers not installed: its rows are skipped; pip install diffusers)')
    ds = ddpm_cifar.load_data(c)[0]
    x0 = torch.stack([ds[i][0] for i in range(a.batch_size)]).to(dev).float() / 127.5 - 1  # the first batch
    y = torch.tensor([int(ds[i][1]) for i in range(a.batch_size)], device=dev)
    torch.manual_seed(0)
    steps = {(k, m): BareStep(models[k](), calls[k], c, dev, m, x0, y) for k in models for m in modes}
    times = {k: [] for k in steps}
    for step in steps.values():  # warm-up, compile included
        step(2)

    def rounds():
        for _ in range(a.rounds):
            for k, step in steps.items():
                step(1)
                times[k].append(step(a.steps))
    rounds()
    loops = {m: loop_windows(argv, dev, m)[1:] for m in modes}  # the first window holds compile and warm-up
    rounds()  # the bare rounds again after the loop: a drifting machine then weighs on both alike
    bare = {}
    for (k, m), v in times.items():
        bare[k, m] = statistics.median(v)
        params = sum(p.numel() for p in steps[k, m].model.parameters())
        print(f"bare step | {k:22s} | {'compiled' if m else 'eager   '} | {params:,} parameters | {bare[k, m]:.1f} ms/step"
              f" | {a.batch_size / bare[k, m] * 1e3:,.0f} img/s | rounds {' '.join(f'{x:.1f}' for x in v)}")
    for m, windows in loops.items():
        ms, b = statistics.median(windows), bare['ddpm_cifar UNet', m]
        print(f"loop | {'compiled' if m else 'eager   '} | {ms:.1f} ms/step (median of {len(windows)} windows after the "
              f"first) | {a.batch_size / ms * 1e3:,.0f} img/s | {b / ms:.1%} of the bare step's speed | loop share "
              f"{1 - b / ms:.1%} | 600 CIFAR-10 epochs ({600 * (50_000 // a.batch_size):,} steps): "
              f"{ms * 600 * (50_000 // a.batch_size) / 3.6e6:.1f} h")


if __name__ == '__main__':
    main()
