"""Diffusion core: schedules, parameterisations, samplers, DDIM inversion, slerp, guidance.

Two kinds of reference denoiser, neither of which re-derives the samplers' update rules:
- the oracle, which knows the true x_start and so answers exactly at every x_t;
- the Gaussian-data denoiser: for x_start ~ N(mu, s^2) the posterior mean E[x_start | x_t] is known in
  closed form, and so is the probability-flow ODE's solution (it maps the standardised x_t to itself),
  which lets us measure each sampler's order of convergence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unclip_cli.diffusion.gaussian import DiffusionConfig, GaussianDiffusion, Parameterization, make_denoiser
from unclip_cli.diffusion.guidance import guided
from unclip_cli.diffusion.samplers import SAMPLERS, ddim_invert, sample_ddim, sample_ddpm, sample_dpmpp_2m, slerp
from unclip_cli.diffusion.schedule import make_betas, spaced_timesteps

T = 1000
PARAMS = [p.value for p in Parameterization]


def _diffusion(param: str = "eps", schedule: str = "cosine") -> GaussianDiffusion:
    return GaussianDiffusion(DiffusionConfig(timesteps=T, schedule=schedule, parameterization=param))


def _abar(d: GaussianDiffusion, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar read straight from the schedule table, shaped (B, 1, ...)."""
    a = d.alphas_cumprod[t.cpu()].to(like.dtype)
    return a.view(-1, *([1] * (like.dim() - 1)))


def _true_output(d: GaussianDiffusion, param: str, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a perfect network outputs at (x_t, t) when the clean sample is known to be x_start."""
    a = _abar(d, t, x_t)
    eps = (x_t - a.sqrt() * x_start) / (1 - a).sqrt()
    if param == "eps":
        return eps
    if param == "x0":
        return x_start
    return a.sqrt() * eps - (1 - a).sqrt() * x_start  # v (Salimans & Ho 2022, §4)


def _oracle(d: GaussianDiffusion, param: str, x_start: torch.Tensor):
    return make_denoiser(d, lambda x_t, t: _true_output(d, param, x_start, x_t, t))


def _gaussian_denoiser(d: GaussianDiffusion, mu: float, s: float):
    """Bayes-optimal denoiser for x_start ~ N(mu, s^2 I): E[x0 | x_t] = mu + s^2 sqrt(a) / (a s^2 + 1 - a) (x_t - sqrt(a) mu)."""

    def denoise(x_t, t):
        a = torch.tensor(d.alphas_cumprod[t].item() if t >= 0 else 1.0, dtype=x_t.dtype)
        x0 = mu + s * s * a.sqrt() / (a * s * s + 1 - a) * (x_t - a.sqrt() * mu)
        return x0, (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return denoise


def _gaussian_ode_solution(d: GaussianDiffusion, x_T: torch.Tensor, mu: float, s: float) -> torch.Tensor:
    """The probability-flow ODE keeps (x_t - sqrt(a_t) mu) / sqrt(a_t s^2 + 1 - a_t) constant."""
    a = d.alphas_cumprod[T - 1].item()
    return mu + s * (x_T - math.sqrt(a) * mu) / math.sqrt(a * s * s + 1 - a)


def _x_start(shape=(2, 3, 8, 8), seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9


# -- schedules ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_betas_float64_in_unit_interval_and_abar_decreasing(schedule):
    betas = make_betas(schedule, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas < 1)
    d = _diffusion(schedule=schedule)
    ac = d.alphas_cumprod
    assert ac.dtype == torch.float64
    assert torch.all(ac[1:] < ac[:-1]), "alphas_cumprod must be strictly decreasing"
    assert ac[0] > 0.999 and ac[-1] < 1e-3  # from (almost) clean to (almost) pure noise


def test_cosine_schedule_endpoints_and_midpoint():
    ac = _diffusion(schedule="cosine").alphas_cumprod
    assert ac[0] == pytest.approx(1.0, abs=1e-3)
    assert ac[T - 1] == pytest.approx(0.0, abs=1e-6)
    # Nichol & Dhariwal's cosine is about half signal, half noise mid-way (cos^2 of ~pi/4).
    assert 0.4 < ac[T // 2] < 0.6


@pytest.mark.parametrize("timesteps", [100, 1000, 4000])
def test_linear_schedule_spans_the_same_noise_range_for_any_length(timesteps):
    ac = np.cumprod(1 - make_betas("linear", timesteps))
    assert ac[0] > 0.998 and ac[-1] < 1e-3


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        make_betas("quadratic", 10)


@pytest.mark.parametrize("steps", [2, 3, 10, 37, 1000])
def test_spaced_timesteps(steps):
    ts = spaced_timesteps(T, steps)
    assert len(ts) == steps
    assert ts[0] == T - 1 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:])), "strictly descending"
    assert all(isinstance(t, int) for t in ts)


def test_spaced_timesteps_single_step_and_errors():
    assert spaced_timesteps(T, 1) == [T - 1]
    for bad in (0, -3, T + 1):
        with pytest.raises(ValueError):
            spaced_timesteps(T, bad)


# -- parameterisations -----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("param", PARAMS)
def test_split_of_the_true_target_recovers_x_start_and_eps(param, schedule):
    d = _diffusion(param, schedule)
    x_start = _x_start((4, 3, 8, 8))
    noise = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([0, 10, 500, T - 1])
    x_t = d.q_sample(x_start, t, noise)
    target = _true_output(d, param, x_start, x_t, t)
    pred_x_start, pred_eps = d.split(target, x_t, t)
    torch.testing.assert_close(pred_x_start, x_start, atol=1e-8, rtol=0)
    torch.testing.assert_close(pred_eps, noise, atol=1e-8, rtol=0)
    # ...and the diffusion's own notion of the target is the same quantity.
    torch.testing.assert_close(d.target(x_start, noise, t), target, atol=1e-10, rtol=0)


def test_q_sample_moves_from_data_to_noise():
    d = _diffusion()
    x_start = torch.full((1, 4096), 3.0, dtype=torch.float64)
    noise = torch.randn(1, 4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(d.q_sample(x_start, torch.tensor([0]), noise), x_start, atol=0.05, rtol=0)
    torch.testing.assert_close(d.q_sample(x_start, torch.tensor([T - 1]), noise), noise, atol=1e-3, rtol=0)


@pytest.mark.parametrize("param", PARAMS)
def test_training_loss_is_zero_for_an_oracle_and_positive_otherwise(param):
    d = _diffusion(param)
    g = torch.Generator().manual_seed(3)
    x_start = _x_start((5, 3, 4, 4))
    noise = torch.randn(x_start.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 700, T - 1])
    loss = d.training_losses(lambda x_t, tt: _true_output(d, param, x_start, x_t, tt), x_start, t, noise)
    assert loss.shape == (5,)
    assert loss.max().item() < 1e-16
    wrong = d.training_losses(lambda x_t, tt: torch.zeros_like(x_t), x_start, t, noise)
    assert (wrong > 1e-3).all()


# -- samplers under the oracle ---------------------------------------------------------------------------
@pytest.mark.parametrize("param", PARAMS)
def test_make_denoiser_returns_the_truth_for_an_oracle(param):
    d = _diffusion(param)
    x_start = _x_start()
    eps = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for t in (0, 300, T - 1):
        x_t = d.q_sample(x_start, torch.full((2,), t), eps)
        pred_x_start, pred_eps = _oracle(d, param, x_start)(x_t, t)
        torch.testing.assert_close(pred_x_start, x_start, atol=1e-9, rtol=0)
        torch.testing.assert_close(pred_eps, eps, atol=1e-9, rtol=0)


def _recording(denoise, log):
    def wrapped(x_t, t):
        log.append((t, x_t.clone()))
        return denoise(x_t, t)

    return wrapped


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("param", PARAMS)
def test_deterministic_samplers_recover_x_start_along_the_forward_line(param, sampler):
    """With an exact x_start, DDIM (eta 0) and DPM-Solver++ solve the ODE exactly: every visited x_t is
    sqrt(a_t) x_start + sqrt(1 - a_t) eps_T for the one eps of the starting noise, and the result is x_start."""
    d = _diffusion(param)
    x_start = _x_start()
    for seed in (0, 1):
        x_T = torch.randn(x_start.shape, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64) * (1 + seed)
        log, calls = [], []
        out = SAMPLERS[sampler](_recording(_oracle(d, param, x_start), log), x_T, spaced_timesteps(T, 10), d,
                                callback=lambda i, n: calls.append((i, n)))
        torch.testing.assert_close(out, x_start, atol=1e-5, rtol=0)
        assert calls == [(i, 10) for i in range(1, 11)]
        assert [t for t, _ in log] == spaced_timesteps(T, 10)
        a_T = d.alphas_cumprod[T - 1].item()
        eps_T = (x_T - math.sqrt(a_T) * x_start) / math.sqrt(1 - a_T)
        for t, x_t in log:
            a = d.alphas_cumprod[t].item()
            torch.testing.assert_close(x_t, math.sqrt(a) * x_start + math.sqrt(1 - a) * eps_T, atol=1e-6, rtol=0)


@pytest.mark.parametrize("param", PARAMS)
def test_ddpm_with_an_oracle_ends_at_x_start(param):
    d = _diffusion(param)
    x_start = _x_start()
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(x_start.shape, generator=g, dtype=torch.float64)
    out = sample_ddpm(_oracle(d, param, x_start), x_T, spaced_timesteps(T, 10), d,
                      randn=lambda: torch.randn(x_start.shape, generator=g, dtype=torch.float64))
    torch.testing.assert_close(out, x_start, atol=1e-5, rtol=0)


def test_ddpm_equals_ddim_with_eta_one():
    """DDIM with eta = 1 is the DDPM posterior (Song et al. 2021, §4.1): same noise in, same sample out."""
    d = _diffusion()
    den = _gaussian_denoiser(d, 0.3, 0.5)
    x_T = torch.randn(3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = spaced_timesteps(T, 12)
    outs = []
    for sampler in (sample_ddpm, sample_ddim):
        g = torch.Generator().manual_seed(1)
        outs.append(sampler(den, x_T, ts, d, eta=1.0, randn=lambda: torch.randn(3, 64, generator=g, dtype=torch.float64)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-10, rtol=0)


# -- samplers on Gaussian data (non-trivial trajectories) ------------------------------------------------
MU, S = 0.3, 0.5


def test_ddim_is_first_order_and_dpmpp_2m_second_order():
    d = _diffusion()
    den = _gaussian_denoiser(d, MU, S)
    x_T = torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = _gaussian_ode_solution(d, x_T, MU, S)

    def err(sampler, steps):
        return (sampler(den, x_T, spaced_timesteps(T, steps), d) - exact).abs().max().item()

    ddim = [err(sample_ddim, n) for n in (100, 200)]
    dpm = [err(sample_dpmpp_2m, n) for n in (100, 200)]
    # Observed: DDIM 2.4e-2 -> 1.2e-2 (ratio 2.0), DPM++(2M) 6.1e-3 -> 1.4e-3 (ratio 4.4).
    assert 1.6 < ddim[0] / ddim[1] < 2.5
    assert dpm[0] / dpm[1] > 3.2
    assert dpm[1] < 0.2 * ddim[1] and dpm[1] < 3e-3


def test_ddpm_samples_the_data_distribution():
    d = _diffusion()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 20000, generator=g, dtype=torch.float64)
    out = sample_ddpm(_gaussian_denoiser(d, MU, S), x_T, spaced_timesteps(T, 200), d,
                      randn=lambda: torch.randn(1, 20000, generator=g, dtype=torch.float64))
    # Observed mean 0.304, std 0.487 (the std is still converging at 200 steps).
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.03)


# -- DDIM inversion ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", PARAMS)
def test_ddim_inversion_with_an_oracle_is_exact_and_retraces_the_path(param):
    d = _diffusion(param)
    x_start = _x_start()
    den = _oracle(d, param, x_start)
    ts = spaced_timesteps(T, 10)
    inv_log, smp_log = [], []
    x_T = ddim_invert(_recording(den, inv_log), x_start, ts, d)
    rec = sample_ddim(_recording(den, smp_log), x_T, ts, d)
    torch.testing.assert_close(rec, x_start, atol=1e-5, rtol=0)
    # The inversion visits the timesteps upwards, starting from the image itself at t = 0.
    assert [t for t, _ in inv_log] == list(reversed(ts))[:-1]
    torch.testing.assert_close(inv_log[0][1], x_start, atol=0, rtol=0)
    # Sampling goes back through the very same points (x_T, then each intermediate x_t).
    inverted = dict(inv_log[1:]) | {T - 1: x_T}
    for t, x_t in smp_log[:-1]:
        torch.testing.assert_close(x_t, inverted[t], atol=1e-6, rtol=0)


def test_ddim_inversion_converges_on_gaussian_data():
    d = _diffusion()
    den = _gaussian_denoiser(d, MU, S)
    x_start = MU + S * torch.randn(4, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def err(steps):
        ts = spaced_timesteps(T, steps)
        return (sample_ddim(den, ddim_invert(den, x_start, ts, d), ts, d) - x_start).abs().max().item()

    e100, e200 = err(100), err(200)
    # Observed 4.0e-2 -> 1.9e-2: first order, as the inversion uses eps(x_t) for the step t -> t'.
    assert e200 < 0.03
    assert 1.5 < e100 / e200 < 3.0


def test_ddim_inversion_with_the_tiny_decoder(tiny_engine):
    """The real (random) tiny decoder, through the engine's own denoiser (as `vary` builds it).

    A random eps-network makes the full schedule ill-conditioned: at t = T-1, sqrt(alpha_bar) = 5e-5, so
    x_start = (x_T - sigma eps) / alpha amplifies any eps mismatch 20,000-fold and the clamp to [-1, 1]
    then loses the image (observed max error ~1.8 for 3 to 200 steps). A trained decoder predicts eps
    there well; a random one does not. So this test inverts up to t = 500 (alpha_bar = 0.5), where the
    network's own consistency is what is measured."""
    e = tiny_engine
    g = torch.Generator().manual_seed(0)
    x_start = torch.rand(2, 3, e.base_size, e.base_size, generator=g) * 1.6 - 0.8
    z_i = torch.nn.functional.normalize(torch.randn(2, e.models.clip.model.cfg.embed_dim, generator=g), dim=-1)
    den = e.decoder_denoiser(z_i, 1.0)  # no caption
    d = e.models.decoder.diffusion

    def err(steps):
        ts = [t for t in spaced_timesteps(T, steps) if t <= 500]
        return (sample_ddim(den, ddim_invert(den, x_start, ts, d), ts, d) - x_start).abs().max().item()

    coarse, fine = err(20), err(50)
    # Observed (float32, CPU): 2.9e-2 with 10 points (20 steps), 1.3e-2 with 25 points (50 steps).
    assert fine < 3e-2
    assert fine < 0.75 * coarse


# -- slerp ------------------------------------------------------------------------------------------------
def _unit(*shape, seed=0):
    return torch.nn.functional.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def _angle(a, b):
    return torch.acos((torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1).clamp(-1, 1))


def test_slerp_endpoints_and_unit_norm():
    a, b = _unit(3, 32, seed=0), _unit(3, 32, seed=1)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-12, rtol=0)
    for theta in np.linspace(0, 1, 11):
        torch.testing.assert_close(slerp(a, b, float(theta)).norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_slerp_moves_at_constant_angle_on_the_great_circle():
    a, b = _unit(2, 32, seed=2), _unit(2, 32, seed=3)
    pts = [slerp(a, b, float(th)) for th in np.linspace(0, 1, 9)]
    steps = torch.stack([_angle(p, q) for p, q in zip(pts, pts[1:])])  # (8, 2)
    torch.testing.assert_close(steps, (_angle(a, b) / 8).expand(8, -1), atol=1e-10, rtol=0)
    # Not the linear path: the midpoint is on the sphere's great circle, the normalised chord midpoint.
    torch.testing.assert_close(slerp(a, b, 0.5), torch.nn.functional.normalize(a + b, dim=-1), atol=1e-10, rtol=0)


def test_slerp_interpolates_norms_linearly_for_non_unit_inputs():
    a, b = 3 * _unit(1, 16, seed=4), 0.5 * _unit(1, 16, seed=5)
    assert slerp(a, b, 0.25).norm().item() == pytest.approx(0.75 * 3 + 0.25 * 0.5)
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(slerp(a, b, 1.0), b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_slerp_nearly_parallel_vectors(dtype):
    a = _unit(4, 32, seed=6).to(dtype)
    tiny = 1e-7 * torch.randn(4, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    for b in (a.clone(), torch.nn.functional.normalize(a + tiny, dim=-1)):
        for theta in (0.0, 0.3, 1.0):
            out = slerp(a, b, theta)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, a, atol=1e-5, rtol=0)


# -- guidance ---------------------------------------------------------------------------------------------
def _conditional_model(log):
    """A deterministic network whose output depends on x, t and, per row, on whether conditioning is kept."""
    w = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))

    def model_fn(x, t, keep):
        log.append(keep.clone())
        cond = torch.tanh(x @ w) + t[:, None] / 1000
        uncond = x.sin() - t[:, None] / 2000
        return torch.where(keep[:, None], cond, uncond)

    return model_fn


@pytest.mark.parametrize("scale", [0.0, 2.5, 7.0])
def test_guidance_equals_two_separate_calls(scale):
    log = []
    model_fn = _conditional_model(log)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 400, 999])
    cond = model_fn(x, t, torch.ones(3, dtype=torch.bool))
    uncond = model_fn(x, t, torch.zeros(3, dtype=torch.bool))
    log.clear()
    out = guided(model_fn, scale)(x, t)
    torch.testing.assert_close(out, uncond + scale * (cond - uncond), atol=1e-6, rtol=0)
    assert len(log) == 1 and log[0].tolist() == [True] * 3 + [False] * 3  # one batched call


def test_guidance_scale_one_runs_only_the_conditional_branch():
    log = []
    model_fn = _conditional_model(log)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 2])
    out = guided(model_fn, 1.0)(x, t)
    assert len(log) == 1 and log[0].tolist() == [True, True]
    torch.testing.assert_close(out, model_fn(x, t, torch.ones(2, dtype=torch.bool)), atol=0, rtol=0)


def test_guidance_with_the_tiny_decoder_equals_two_separate_calls(tiny_engine):
    """The real UNet through the wrapper: the doubled batch must not mix rows (z_i dropped per row)."""
    e = tiny_engine
    g = torch.Generator().manual_seed(3)
    B, s = 2, e.base_size
    z_i = torch.nn.functional.normalize(torch.randn(B, e.models.clip.model.cfg.embed_dim, generator=g), dim=-1)
    cfg = e.models.clip.model.cfg
    states, mask = torch.zeros(B, cfg.context_length, cfg.text_width), torch.zeros(B, cfg.context_length, dtype=torch.bool)  # no caption
    unet = e.models.decoder.model

    def model_fn(x, t, keep):
        reps = x.shape[0] // B
        return unet(x, t, z_i=z_i.repeat(reps, 1), z_keep=keep, text_states=states.repeat(reps, 1, 1), text_mask=mask.repeat(reps, 1))

    x = torch.randn(B, 3, s, s, generator=g)
    t = torch.tensor([100, 800])
    with torch.no_grad():
        cond = model_fn(x, t, torch.ones(B, dtype=torch.bool))
        uncond = model_fn(x, t, torch.zeros(B, dtype=torch.bool))
        out = guided(model_fn, 4.0)(x, t)
    assert (cond - uncond).abs().max() > 1e-4  # dropping z_i does change the output
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-5)
