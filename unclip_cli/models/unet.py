"""The decoder and upsampler UNets (unCLIP §2.1, App. C; ADM/GLIDE architecture).

One network class serves both stages; they differ only in configuration:

- decoder: conditioned on the CLIP image embedding z_i, which is "projected and added to the timestep
  embedding" and "projected into four extra tokens of context" that, with the projected CLIP text
  token states, the attention layers attend to (GLIDE style: context keys/values are concatenated to
  the spatial ones). Inpainting is native (GLIDE §4.3): 4 extra input channels hold the known image
  and the known-pixel mask; they are zero for plain generation.
- upsampler: convolutions only ("we use only spatial convolutions in the model (i.e., no attention
  layers)"), conditioned on the bilinearly upsampled low-resolution image as 3 extra input channels,
  so it runs at any multiple of its training crop size.

The network predicts whatever the diffusion parameterisation asks for; it knows nothing of noise
schedules (those live in `unclip_cli.diffusion`).

Karlo's decoder and super-resolution UNets (diffusers' UNet2DConditionModel with UnCLIPTextProjModel, and
UNet2DModel) are this network configured: `resblock_updown` (ADM's down/up-sampling inside residual
blocks: average pooling or nearest upsampling between the first activation and convolution),
`raw_embeddings` (z_i used as CLIP gives it), `text_embed_to_time` (the CLIP text embedding z_t projected
and added to the time embedding too), `clip_token_layout="interleaved"` (the 4 extra context tokens read
from the projection with a stride of 4), `time_conditioning="additive"` for the super-resolution nets, no
inpainting channels, and 6 output channels for the decoder (eps and the learned variance interpolation).

Stable unCLIP's latent UNet (diffusers' UNet2DConditionModel as Stable Diffusion 2 configures it) is this network
too: `attention_kind="transformer"` (Rombach et al. 2022 §3.3: a spatial transformer per attention level,
self-attention, cross-attention to the text encoder's token states, GEGLU feed-forward, linear in/out
projections; `heads` per level), `class_dim` (the noise-augmented image embedding with its level embedding,
"projected and added to the timestep embedding" by a two-layer MLP; zeros when dropped for guidance), DDPM's
additive time conditioning and strided-convolution down/up-sampling, 4 latent channels in and out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip_cli.models.layers import TimestepMLP, attention, initial, zero_module


@dataclass
class UNetConfig:
    image_size: int = 32  # training resolution (the upsampler's is its crop size)
    in_channels: int = 3
    out_channels: int = 3
    extra_channels: int = 0  # decoder: 4 (known image + mask); upsampler: 3 (low-res image)
    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 2
    attention_ds: tuple[int, ...] = (4, 8)  # downsampling factors that get self-attention
    head_channels: int = 32
    dropout: float = 0.0
    clip_dim: int = 0  # 0: no CLIP image embedding (upsampler)
    num_clip_tokens: int = 4
    text_width: int = 0  # 0: no text token states
    context_dim: int = 256
    # Space-to-depth factor: the network runs on (C * p^2, H/p, W/p) and shuffles back at the end. The
    # upsampler uses 2, which makes it 4x cheaper at 128 px on a CPU for the same widths.
    patch_size: int = 1
    resblock_updown: bool = False  # down/up-sample inside residual blocks (ADM's resblock_updown; Karlo) instead of Down/Up layers
    time_conditioning: str = "scale_shift"  # "additive": the embedding is added before the second norm (Karlo's super-res)
    raw_embeddings: bool = False  # True: z_i as CLIP gives it (Karlo); False: unit-norm z_i scaled by sqrt(clip_dim)
    text_embed_to_time: bool = False  # True: the CLIP text embedding z_t is projected and added to the time embedding (Karlo)
    clip_token_layout: str = "blocked"  # "interleaved": token k is the projection's outputs k, k + 4, k + 8, ... (Karlo)
    # "glide": AttentionBlock, context keys/values appended to self-attention; "transformer": a spatial transformer
    # (self-attention, cross-attention to the text states, GEGLU), Stable Diffusion's
    attention_kind: str = "glide"
    heads: tuple[int, ...] = ()  # transformer: attention heads per level (diffusers' attention_head_dim); () = channels / head_channels
    class_dim: int = 0  # > 0: z_i is a class input of this width, MLP-projected and added to the time embedding (zeros when dropped)
    noise_augment: bool = False  # the decoder holds the image embedding's normalising mean and std (emb_mean, emb_std)

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_ds = tuple(self.attention_ds)
        self.heads = tuple(self.heads)

    @property
    def has_context(self) -> bool:
        return self.clip_dim > 0 or self.text_width > 0


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift norm: h = norm(h) * (1 + scale) + shift, from the embedding.

    `additive`: h = norm(h + emb) instead (DDPM's time conditioning). `resample` "down" / "up": the block
    also halves / doubles the resolution, of both branches, between the first activation and convolution
    (ADM's resblock_updown: 2x2 average pooling, nearest-neighbour upsampling)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, additive: bool = False, resample: str | None = None):
        super().__init__()
        self.additive, self.resample = additive, resample
        self.in_layers = nn.Sequential(norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch if additive else 2 * out_ch))
        self.out_norm = norm(out_ch)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1)))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def _resampled(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest")

    def forward(self, x: torch.Tensor, emb: torch.Tensor, ctx=None) -> torch.Tensor:
        if self.resample is None:
            h = self.in_layers(x)  # (B, C, H, W)
        else:
            h = self._resampled(self.in_layers[:2](x))  # norm, SiLU, then resample
            h = self.in_layers[2](h)
            x = self._resampled(x)
        e = self.emb_layers(emb)[:, :, None, None]  # (B, C or 2C, 1, 1)
        if self.additive:
            h = self.out_norm(h + e)
        else:
            scale, shift = e.chunk(2, dim=1)  # (B, C, 1, 1) each
            h = self.out_norm(h) * (1 + scale) + shift
        return self.skip(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Self-attention over pixels, with context tokens' keys/values appended (GLIDE's text attention)."""

    def __init__(self, ch: int, head_channels: int, context_dim: int | None):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = norm(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.context_kv = nn.Linear(context_dim, 2 * ch) if context_dim else None
        self.proj = zero_module(nn.Conv1d(ch, ch, 1))

    def forward(self, x: torch.Tensor, emb=None, ctx: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x).view(B, C, H * W)).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        mask = None
        if self.context_kv is not None and ctx is not None:
            tokens, token_mask = ctx  # (B, S, context_dim), (B, S) True = attend
            ck, cv = self.context_kv(tokens).chunk(2, dim=-1)  # (B, S, C) each
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)  # (B, S + HW, C)
            pixels = torch.ones(B, H * W, dtype=torch.bool, device=x.device)
            mask = torch.cat([token_mask, pixels], dim=1)[:, None, :]  # (B, 1, S + HW)
        h = attention(q, k, v, self.heads, mask)  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2)).view(B, C, H, W)


class CrossAttention(nn.Module):
    """Multi-head attention of pixels to themselves or to context tokens (q, k, v without bias)."""

    def __init__(self, ch: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(ch, ch, bias=False)
        self.to_k = nn.Linear(context_dim or ch, ch, bias=False)
        self.to_v = nn.Linear(context_dim or ch, ch, bias=False)
        self.to_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        c = x if context is None else context  # (B, S, ctx)
        return self.to_out(attention(self.to_q(x), self.to_k(c), self.to_v(c), self.heads, mask))  # (B, HW, C)


class TransformerBlock(nn.Module):
    """Pre-LN: x + self-attention, x + cross-attention to the context, x + GEGLU feed-forward (Shazeer 2020)."""

    def __init__(self, ch: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(ch), CrossAttention(ch, heads)
        self.norm2, self.attn2 = nn.LayerNorm(ch), CrossAttention(ch, heads, context_dim)
        self.norm3 = nn.LayerNorm(ch)
        self.ff_in = nn.Linear(ch, 2 * 4 * ch)  # value and gate
        self.ff_out = nn.Linear(4 * ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        h, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)  # (B, HW, 4C) each
        return x + self.ff_out(h * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm, linear projection in, transformer block, linear projection out, residual (Rombach et al. 2022)."""

    def __init__(self, ch: int, heads: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.block = TransformerBlock(ch, heads, context_dim)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, emb=None, ctx: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        tokens, mask = ctx
        if mask is not None:
            mask = mask[:, None, :]  # (B, 1, S)
        h = self.proj_out(self.block(h, tokens, mask))
        return x + h.view(B, H, W, C).permute(0, 3, 1, 2)


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.op(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, emb=None, ctx=None):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Blocks(nn.ModuleList):
    """A sequence of blocks that all take (x, emb, ctx)."""

    def forward(self, x, emb, ctx):
        for layer in self:
            x = layer(x, emb, ctx)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        self.time_embed = TimestepMLP(ch0, emb_dim)
        ctx_dim = cfg.context_dim if cfg.has_context else None

        if cfg.time_conditioning not in ("scale_shift", "additive"):
            raise ValueError(f"UNetConfig.time_conditioning is {cfg.time_conditioning!r}; choose from scale_shift, additive")
        if cfg.clip_token_layout not in ("blocked", "interleaved"):
            raise ValueError(f"UNetConfig.clip_token_layout is {cfg.clip_token_layout!r}; choose from blocked, interleaved")
        if cfg.attention_kind not in ("glide", "transformer"):
            raise ValueError(f"UNetConfig.attention_kind is {cfg.attention_kind!r}; choose from glide, transformer")
        transformer = cfg.attention_kind == "transformer"
        if transformer and (cfg.clip_dim or cfg.text_width != cfg.context_dim):
            raise ValueError("UNetConfig: a transformer UNet reads the text states as they are (text_width = context_dim) and z_i "
                             "as a class input (class_dim), not clip_dim")
        if cfg.heads and len(cfg.heads) != len(cfg.channel_mult):
            raise ValueError(f"UNetConfig.heads has {len(cfg.heads)} entries for {len(cfg.channel_mult)} levels")
        additive = cfg.time_conditioning == "additive"

        def res(i, o, resample=None):
            return ResBlock(i, o, emb_dim, cfg.dropout, additive, resample)

        if cfg.clip_dim:
            self.clip_to_emb = nn.Linear(cfg.clip_dim, emb_dim)
            self.clip_to_tokens = nn.Linear(cfg.clip_dim, cfg.num_clip_tokens * cfg.context_dim)
            # Replaces z_i when it is dropped for classifier-free guidance (unCLIP §2.1: "a learned embedding").
            self.null_clip = nn.Parameter(initial(lambda: torch.randn(cfg.clip_dim) / math.sqrt(cfg.clip_dim), cfg.clip_dim))
            if cfg.text_embed_to_time:
                self.text_emb_to_emb = nn.Linear(cfg.clip_dim, emb_dim)
        if cfg.class_dim:
            self.class_embed = nn.Sequential(nn.Linear(cfg.class_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.noise_augment:  # the image embedding's statistics, which noise augmentation standardises it with
            self.emb_mean = nn.Parameter(torch.zeros(cfg.class_dim // 2))
            self.emb_std = nn.Parameter(torch.ones(cfg.class_dim // 2))
        if cfg.text_width and not transformer:
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_width, cfg.context_dim), nn.LayerNorm(cfg.context_dim))

        p2 = cfg.patch_size**2
        self.input_conv = nn.Conv2d((cfg.in_channels + cfg.extra_channels) * p2, ch0, 3, padding=1)

        def attention_block(ch, level):
            if transformer:
                return SpatialTransformer(ch, cfg.heads[level] if cfg.heads else max(1, ch // cfg.head_channels), ctx_dim)
            return AttentionBlock(ch, cfg.head_channels, ctx_dim)

        def attn_or_none(ch, ds):
            return [attention_block(ch, ds.bit_length() - 1)] if ds in cfg.attention_ds else []

        self.down = nn.ModuleList()
        skip_chs, ch, ds = [ch0], ch0, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Blocks([res(ch, mult * ch0), *attn_or_none(mult * ch0, ds)]))
                ch = mult * ch0
                skip_chs.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(Blocks([res(ch, ch, "down") if cfg.resblock_updown else Down(ch)]))
                skip_chs.append(ch)
                ds *= 2
        # The middle block attends whenever the model has attention at all (the upsampler has none).
        mid_attn = [attention_block(ch, len(cfg.channel_mult) - 1)] if cfg.attention_ds else []
        self.middle = Blocks([res(ch, ch), *mid_attn, res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                blocks = [res(ch + skip_chs.pop(), mult * ch0)]
                ch = mult * ch0
                blocks += attn_or_none(ch, ds)
                if level > 0 and i == cfg.num_res_blocks:
                    blocks.append(res(ch, ch, "up") if cfg.resblock_updown else Up(ch))
                    ds //= 2
                self.up.append(Blocks(blocks))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels * p2, 3, padding=1)))

    @property
    def downsample_factor(self) -> int:
        """Input sides must be multiples of this."""
        return self.cfg.patch_size * 2 ** (len(self.cfg.channel_mult) - 1)

    def forward(
        self,
        x: torch.Tensor,  # (B, 3, H, W) the noised image x_t
        t: torch.Tensor,  # (B,) timesteps
        cond: torch.Tensor | None = None,  # (B, extra_channels, H, W): inpainting (known image, mask) or the low-res image
        z_i: torch.Tensor | None = None,  # (B, clip_dim) unit-norm CLIP image embedding (raw with raw_embeddings)
        z_keep: torch.Tensor | None = None,  # (B,) bool, False = use the learned null embedding
        text_states: torch.Tensor | None = None,  # (B, L, text_width)
        text_mask: torch.Tensor | None = None,  # (B, L) bool, True = a real token; all False = text dropped
        z_t: torch.Tensor | None = None,  # (B, clip_dim) CLIP text embedding, read with text_embed_to_time
    ) -> torch.Tensor:
        cfg = self.cfg
        B = x.shape[0]
        if cfg.extra_channels:
            if cond is None:
                cond = x.new_zeros(B, cfg.extra_channels, *x.shape[2:])
            x = torch.cat([x, cond], dim=1)
        if cfg.patch_size > 1:
            x = F.pixel_unshuffle(x, cfg.patch_size)  # (B, C * p^2, H / p, W / p)
        emb = self.time_embed(t)  # (B, 4*ch0)
        ctx = None
        if cfg.class_dim:
            c = z_i if z_keep is None else torch.where(z_keep[:, None], z_i, torch.zeros((), dtype=z_i.dtype, device=z_i.device))
            emb = emb + self.class_embed(c)  # (B, 4*ch0)
        if cfg.attention_kind == "transformer":
            ctx = (text_states, None)  # every token attended, as Stable Diffusion's text encoder gives them
        if cfg.clip_dim:
            if z_keep is not None:
                z_i = torch.where(z_keep[:, None], z_i, self.null_clip.to(z_i.dtype)[None])
            z = z_i if cfg.raw_embeddings else z_i * math.sqrt(cfg.clip_dim)  # unit-norm -> unit variance per dimension
            if cfg.text_embed_to_time:
                emb = emb + (self.clip_to_emb(z) + self.text_emb_to_emb(z_t))  # (B, 4*ch0)
            else:
                emb = emb + self.clip_to_emb(z)
            if cfg.clip_token_layout == "blocked":
                tokens = self.clip_to_tokens(z).view(B, cfg.num_clip_tokens, cfg.context_dim)  # (B, 4, ctx)
            else:
                tokens = self.clip_to_tokens(z).view(B, cfg.context_dim, cfg.num_clip_tokens).transpose(1, 2)  # (B, 4, ctx)
            token_mask = torch.ones(B, cfg.num_clip_tokens, dtype=torch.bool, device=x.device)
            if cfg.text_width and text_states is not None:
                tokens = torch.cat([tokens, self.text_proj(text_states)], dim=1)  # (B, 4 + L, ctx)
                token_mask = torch.cat([token_mask, text_mask], dim=1)
            ctx = (tokens, token_mask)

        h = self.input_conv(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb, ctx)
            skips.append(h)
        h = self.middle(h, emb, ctx)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb, ctx)
        h = self.out(h)
        if cfg.patch_size > 1:
            h = F.pixel_shuffle(h, cfg.patch_size)
        return h  # (B, out_channels, H, W)
