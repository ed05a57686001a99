"""The diffusion prior (unCLIP §2.2): a CLIP text embedding (and caption) -> a CLIP image embedding.

"We use a decoder-only Transformer with a causal attention mask on a sequence consisting of, in order:
the encoded text, the CLIP text embedding, an embedding for the diffusion timestep, the noised CLIP
image embedding, and a final embedding whose output from the Transformer is used to predict the
unnoised CLIP image embedding." The network predicts x_start directly (L = ||f(z_i^(t), t, y) - z_i||^2).

Embeddings are standardised per dimension with dataset statistics stored in this module's buffers
(as karlo does), so the diffusion runs on unit-variance inputs; `standardize` / `destandardize` map
between unit-norm CLIP space and diffusion space.

Karlo's prior (diffusers' PriorTransformer) is this network with the same token order, configured by
`raw_embeddings=True` (CLIP's raw text embedding goes in unscaled; the output, destandardised with the
stored mean and std, is used as it is) and `learned_null_text=False` (its unconditional branch is the
encoded empty caption, not a learned null embedding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip_cli.models.layers import TimestepMLP, attention, initial


@dataclass
class PriorConfig:
    clip_dim: int = 256  # CLIP embedding size
    text_width: int = 256  # width of CLIP's per-token text states
    context_length: int = 48  # text tokens
    width: int = 384
    layers: int = 6
    heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.0
    raw_embeddings: bool = False  # True: z_t enters as CLIP gives it (Karlo); False: unit-norm z_t scaled by sqrt(clip_dim)
    learned_null_text: bool = True  # False: no null embedding; guidance encodes the empty caption instead (Karlo)


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln_1(x)).chunk(3, dim=-1)  # (B, T, C) each
        x = x + self.drop(self.proj(attention(q, k, v, self.heads, mask)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        W, L = cfg.width, cfg.context_length
        self.text_proj = nn.Linear(cfg.text_width, W)
        self.text_emb_proj = nn.Linear(cfg.clip_dim, W)
        self.time_embed = TimestepMLP(W, W)
        self.x_proj = nn.Linear(cfg.clip_dim, W)
        self.query = nn.Parameter(initial(lambda: torch.randn(W) * 0.02, W))  # the "final embedding" whose output predicts z_i
        if cfg.learned_null_text:
            # Replaces the CLIP text embedding when the text is dropped for classifier-free guidance (§2.2).
            self.null_text_emb = nn.Parameter(torch.zeros(W))
        self.pos_emb = nn.Parameter(initial(lambda: torch.randn(L + 4, W) * 0.01, L + 4, W))
        self.blocks = nn.ModuleList([Block(W, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(W)
        self.out = nn.Linear(W, cfg.clip_dim)
        # Per-dimension statistics of unit-norm CLIP image embeddings, set from the training data.
        self.register_buffer("emb_mean", torch.zeros(cfg.clip_dim))
        self.register_buffer("emb_std", torch.full((cfg.clip_dim,), cfg.clip_dim**-0.5))

    def standardize(self, z_i: torch.Tensor) -> torch.Tensor:
        return (z_i - self.emb_mean) / self.emb_std

    def destandardize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.emb_std + self.emb_mean

    def forward(
        self,
        x_t: torch.Tensor,  # (B, D) noised, standardised image embedding
        t: torch.Tensor,  # (B,)
        z_t: torch.Tensor,  # (B, D) unit-norm CLIP text embedding
        text_states: torch.Tensor,  # (B, L, text_width)
        text_mask: torch.Tensor,  # (B, L) bool, True = real token
        text_keep: torch.Tensor | None = None,  # (B,) bool, False = caption dropped (guidance)
    ) -> torch.Tensor:
        B, L, _ = text_states.shape
        if text_keep is not None:
            text_mask = text_mask & text_keep[:, None]
        text_tok = self.text_proj(text_states)  # (B, L, W)
        z_t_tok = self.text_emb_proj(z_t if self.cfg.raw_embeddings else z_t * self.cfg.clip_dim**0.5)  # (B, W)
        if text_keep is not None:
            if not self.cfg.learned_null_text:
                raise ValueError("this prior has no null text embedding: guide it with the encoded empty caption")
            z_t_tok = torch.where(text_keep[:, None], z_t_tok, self.null_text_emb.to(z_t_tok.dtype)[None])
        seq = torch.cat(
            [text_tok, z_t_tok[:, None], self.time_embed(t)[:, None], self.x_proj(x_t)[:, None], self.query.expand(B, 1, -1)],
            dim=1,
        )  # (B, L + 4, W)
        seq = seq + self.pos_emb[: L + 4]
        T = L + 4
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()  # (T, T)
        keys = torch.cat([text_mask, torch.ones(B, 4, dtype=torch.bool, device=seq.device)], dim=1)  # (B, T)
        # A padding query still attends to itself, so no attention row is empty.
        mask = causal[None] & (keys[:, None, :] | torch.eye(T, dtype=torch.bool, device=seq.device)[None])  # (B, T, T)
        for block in self.blocks:
            seq = block(seq, mask)
        return self.out(self.ln_f(seq[:, -1]))  # (B, D) predicted x_start (standardised)


def pick_closest(candidates: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """§2.2: "sample two copies of z_i from the prior, and choose the one with a higher dot product with z_t".

    candidates (B, K, D) unit-norm, z_t (B, D) -> (B, D)."""
    scores = torch.einsum("bkd,bd->bk", candidates, F.normalize(z_t, dim=-1))  # (B, K)
    return candidates[torch.arange(candidates.shape[0]), scores.argmax(dim=1)]
