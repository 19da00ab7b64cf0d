"""Training speed of ddpm_cifar.py's default U-Net beside diffusers' UNet2DModel in the same DDPM CIFAR-10 layout
(google/ddpm-cifar10-32's config plus 11 class embeddings: widths 128-256-256-256, 2 blocks per level, attention at
16x16), measured side by side: each round times a few training steps (forward, backward, AdamW) of one model, then
of the other, and the medians over rounds are printed with their ratio. Not collected by pytest.

    pip install diffusers   # only for this benchmark
    python tests/bench_cifar_unet.py --batch-size 32 --rounds 5
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddpm_cifar  # noqa: E402


def diffusers_unet():
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2, dropout=0.1,
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'), num_class_embeds=11)


def step_ms(model, call, batch, steps):
    """Mean wall time of one training step over `steps` steps, after one untimed warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 11, (batch,), generator=g)
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        loss = F.mse_loss(call(model, x, t, y), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--batch-size', type=int, default=32)
    ap.add_argument('--rounds', type=int, default=5)
    ap.add_argument('--steps', type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    ours = ddpm_cifar.make_model(ddpm_cifar.get_config([]), 10).train()
    theirs = diffusers_unet().train()
    calls = {'ddpm_cifar UNet': (ours, lambda m, x, t, y: m(x, t, y)),
             'diffusers UNet2DModel': (theirs, lambda m, x, t, y: m(x, t, class_labels=y).sample)}
    times = {k: [] for k in calls}
    for _ in range(a.rounds):
        for name, (model, call) in calls.items():
            times[name].append(step_ms(model, call, a.batch_size, a.steps))
    print(f'torch {torch.__version__} | {torch.get_num_threads()} threads | batch {a.batch_size} | '
          f'{a.rounds} rounds of {a.steps} steps each, medians')
    for name, (model, _) in calls.items():
        ms = statistics.median(times[name])
        print(f'{name:22s} {sum(p.numel() for p in model.parameters()):,} parameters | {ms:.0f} ms/step | '
              f'{a.batch_size / ms * 1e3:.1f} img/s | rounds {" ".join(f"{v:.0f}" for v in times[name])}')
    ratio = statistics.median(o / d for o, d in zip(times['ddpm_cifar UNet'], times['diffusers UNet2DModel']))
    print(f'ours / diffusers time per step, median of the per-round ratios: {ratio:.2f}')


if __name__ == '__main__':
    main()
