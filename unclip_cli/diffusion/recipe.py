"""A model set's sampling recipe: how its networks are sampled, carried by the set itself.

Our emoji set was tuned with one policy (DPM-Solver++ for the prior with two candidates, the decoder
from the noised training mean at t = 800, the upsampler from the noised low-resolution image at t = 400),
and a converted Karlo set was trained for another (ancestral sampling from pure noise at t = 999 in
every stage, learned variance in the decoder, the empty caption as the unconditional branch). Neither is
"the" policy, so each set says which it wants: the decoder checkpoint's metadata holds a `sampling`
object (in `extra`), and a set without one, such as weights/emoji, samples with the defaults below, which
are exactly the emoji policy. `--quality` picks one of the set's own step tables.

This module imports no torch: requests (and so the command line) read it to resolve quality names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

QUALITIES = ("fast", "default", "best")
SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "ancestral", "ancestral_ddpm")
CHOICES = {
    "unconditional": ("dropped", "empty_caption"),
    "timestep_spacing": ("linspace", "karlo", "leading", "leading1"),
    "prior_spacing": ("same", "linspace", "karlo", "leading", "leading1"),
    "prior_sampler": SAMPLER_NAMES,
    "decoder_sampler": SAMPLER_NAMES,
    "vary_sampler": ("ddim", "decoder"),
    "decoder_start": ("mean", "noise"),
    "upsampler_sampler": ("ddim", "ancestral"),
    "upsampler_start": ("low_res", "noise"),
    "upsample_filter": ("bilinear", "bicubic_antialias"),
    "inpaint": ("channels", "repaint"),
}
MAX_TIMESTEP = 999  # the recipe's start timesteps index a 1000-step schedule (modelset.SAMPLED_TIMESTEPS)


@dataclass(frozen=True)
class SamplingRecipe:
    """Every choice a sampling run makes that is not in a request. The defaults are the emoji set's policy
    (see `diffusion.policy` for the measurements behind them).

    Step tables are (prior, decoder, upsampler, decoder candidates) per `--quality`."""

    steps_fast: tuple[int, int, int, int] = (8, 10, 3, 1)
    steps_default: tuple[int, int, int, int] = (16, 20, 4, 3)
    steps_best: tuple[int, int, int, int] = (32, 50, 8, 4)
    # Blends decode through the DDIM inversion of both end images; see requests.BLEND_DECODER_STEP_FACTOR.
    blend_decoder_step_factor: int = 2
    # Vary (below strength 1), nudge and blend decode through a DDIM inversion, whose error shrinks with the step size:
    # at the emoji set's 10 fast steps it was as large as what vary's strength 0.2 adds (distance to the input flat from
    # 0 to 0.3); at 40 it grows with strength (the model card's table). Their decoder steps are at least this (1: their
    # quality's own steps).
    inversion_steps_min: int = 40
    guidance: float = 3.0  # the decoder's classifier-free guidance scale when a request gives none
    prior_guidance: float = 1.5
    # The unconditional branch of guidance, and "no caption" where an operation has none (vary, blend, nudge):
    # "dropped": the learned null embeddings and an all-masked caption (how our networks were trained);
    # "empty_caption": the encoded empty caption "" (Karlo, diffusers), with the decoder's learned null z_i.
    unconditional: str = "dropped"
    # "linspace": round(linspace(start, 0, n)); "karlo": round(i * 999 / (n - 1)), Karlo's and diffusers' steps.
    timestep_spacing: str = "linspace"
    prior_sampler: str = "dpmpp_2m"
    prior_candidates: int = 2  # §2.2: sample this many z_i and keep the one closest to z_t
    prior_clamp: float = 10.0  # clamp of the standardised x_start prediction
    decoder_sampler: str = "ddpm"  # text-to-image and edit decoding from noise
    decoder_start: str = "mean"  # "mean": the training mean image noised to decoder_t_start; "noise": pure noise
    decoder_t_start: int = 800
    decoder_clamp: float = 1.0  # 0: no clamp (latents have no fixed range)
    decoder_eta: float = 1.0  # DDIM's eta when the decoder's sampler is "ddim" and decodes from noise (Stable unCLIP: 0)
    # The prior's timestep spacing, "same" as timestep_spacing unless its scheduler spaces them otherwise (Stable
    # unCLIP runs Karlo's prior under diffusers' DDPM scheduler: "leading")
    prior_spacing: str = "same"
    # Noise augmentation of the image embedding (decoders with noise_augment): the level 0-999 it is noised to
    # before the decoder reads it, when a request gives none
    noise_level: int = 0
    # Variations at strength 1: "ddim", DDIM with eta 1 from the image's inverted noise like every lower strength (recipes
    # from before 2026-12-05, `fresh_at_one`: eta 1 from the decoder start), or "decoder": fresh noise and the decoder's
    # own sampler (what diffusers' UnCLIPImageVariationPipeline does).
    vary_sampler: str = "ddim"
    upsampler_sampler: str = "ddim"
    upsampler_start: str = "low_res"  # "low_res": the upsampled image noised to upsampler_t_start; "noise": pure noise
    upsampler_t_start: int = 400
    upsampler_clamp: float = 1.0
    # "bilinear": bilinear, then clamped to [-1, 1]; "bicubic_antialias": clamped, then bicubic with antialiasing (Karlo)
    upsample_filter: str = "bilinear"
    # "channels": the decoder's inpainting input channels (GLIDE §4.3) and x_start replacement; "repaint": the
    # known region replaced at every step (RePaint), for networks without inpainting channels.
    inpaint: str = "channels"
    inpaint_resample: int = 1  # RePaint's resampling: each step taken this many times, jumping back between tries

    def __post_init__(self):
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"SamplingRecipe.{name} is {getattr(self, name)!r}; choose from {', '.join(choices)}")
        for name in ("decoder_t_start", "upsampler_t_start"):
            if not 1 <= getattr(self, name) <= MAX_TIMESTEP:
                raise ValueError(f"SamplingRecipe.{name} is {getattr(self, name)}; it must be from 1 to {MAX_TIMESTEP}")
        for q in QUALITIES:
            if any(v > 1000 for v in self.table(q)[:3]) or self.table(q)[3] > 16:
                raise ValueError(f"SamplingRecipe.steps_{q} is {list(self.table(q))}: at most 1000 steps and 16 decoder candidates")
        if self.inpaint_resample > 20:
            raise ValueError(f"SamplingRecipe.inpaint_resample is {self.inpaint_resample}; it must be at most 20")
        if not 0 <= self.noise_level <= MAX_TIMESTEP:
            raise ValueError(f"SamplingRecipe.noise_level is {self.noise_level}; it must be from 0 to {MAX_TIMESTEP}")
        if not 1 <= self.inversion_steps_min <= 1000:
            raise ValueError(f"SamplingRecipe.inversion_steps_min is {self.inversion_steps_min}; it must be from 1 to 1000")
        if self.blend_decoder_step_factor > 10:
            raise ValueError(f"SamplingRecipe.blend_decoder_step_factor is {self.blend_decoder_step_factor}; it must be at most 10")

    def table(self, quality: str) -> tuple[int, int, int, int]:
        """(prior, decoder, upsampler, decoder candidates) steps of a --quality name."""
        if quality not in QUALITIES:
            raise ValueError(f"unknown quality {quality!r}; choose from {', '.join(QUALITIES)}")
        return getattr(self, f"steps_{quality}")

    def as_dict(self) -> dict:
        """The fields that differ from the defaults (what a set's metadata needs to hold), JSON-ready."""
        default = SamplingRecipe()
        return {f.name: list(v) if isinstance(v, tuple) else v
                for f in fields(self) if (v := getattr(self, f.name)) != getattr(default, f.name)}


DEFAULT = SamplingRecipe()

# Karlo-v1.0.alpha as diffusers' UnCLIPPipeline runs it (prior 25, decoder 25, super-res 7 steps by default;
# karlo's own "default" configuration takes 50 decoder steps: our `best`), guidance 4 and 8.
KARLO = SamplingRecipe(
    steps_fast=(25, 15, 7, 1), steps_default=(25, 25, 7, 1), steps_best=(25, 50, 7, 1), inversion_steps_min=1,
    guidance=8.0, prior_guidance=4.0, unconditional="empty_caption", timestep_spacing="karlo",
    prior_sampler="ancestral", prior_candidates=1, prior_clamp=5.0,
    decoder_sampler="ancestral", decoder_start="noise", decoder_t_start=999, decoder_clamp=1.0, vary_sampler="decoder",
    upsampler_sampler="ancestral", upsampler_start="noise", upsampler_t_start=999, upsampler_clamp=1.0,
    upsample_filter="bicubic_antialias", inpaint="repaint", inpaint_resample=1,
)

# Stable unCLIP 2.1 as diffusers' StableUnCLIPImg2ImgPipeline and StableUnCLIPPipeline run it: the decoder DDIM
# (eta 0) from pure latent noise on "leading" timesteps plus 1, guidance 10 with the empty prompt and a zero image
# embedding as the unconditional branch, no clamp, 20 steps; Karlo's prior (for text-to-image) under a DDPM
# scheduler, 25 steps, guidance 4; noise level 0. No upsampler; edits are RePaint in latent space.
STABLE_UNCLIP = SamplingRecipe(
    steps_fast=(25, 10, 1, 1), steps_default=(25, 20, 1, 1), steps_best=(25, 50, 1, 1), inversion_steps_min=1,
    guidance=10.0, prior_guidance=4.0, unconditional="empty_caption", timestep_spacing="leading1", prior_spacing="leading",
    prior_sampler="ancestral_ddpm", prior_candidates=1, prior_clamp=5.0,
    decoder_sampler="ddim", decoder_eta=0.0, decoder_start="noise", decoder_t_start=999, decoder_clamp=0.0, vary_sampler="decoder",
    inpaint="repaint", inpaint_resample=1, noise_level=0,
)
