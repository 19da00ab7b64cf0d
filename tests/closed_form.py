"""Checks shared by the scripts' tests whose schedules index t = 0..T-1 for the papers' 1..T."""
import math

import numpy as np
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
