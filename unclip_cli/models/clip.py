"""CLIP, trained from scratch: open_clip's own `CLIP` class built from a small custom config.

This is the only module that imports open_clip. It adds three things the unCLIP stack needs:

- a compact vocabulary: open_clip's bundled BPE tokenizer (49,408 tokens) is kept, but its ids go through
  `token_map` into a small embedding table sized to the corpus (the emoji captions use a few thousand
  tokens; a full table would be most of the shipped megabytes and never trained). `fit_vocab` assigns
  the corpus' tokens their own rows; unseen tokens share one "unknown" row.
- per-token text states (the `ln_final` output), which the prior and decoder attend to (§2.1, §2.2);
- inputs in [-1, 1] at any size, resized here to the vision tower's resolution.

Embeddings are returned unit-norm: the prior, decoder, slerp and text diffs all work on the sphere.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

PAD, SOT, EOT, UNK, FIRST_WORD = 0, 1, 2, 3, 4
BPE_VOCAB = 49408


@dataclass
class ClipConfig:
    embed_dim: int = 256
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 256
    vision_layers: int = 6
    vision_head_width: int = 64
    context_length: int = 48
    vocab_size: int = 8192
    text_width: int = 256
    text_heads: int = 4
    text_layers: int = 4


@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()  # reads the BPE merges bundled inside the open_clip package; no download


class Clip(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        self.cfg = cfg
        vision = CLIPVisionCfg(
            layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_head_width,
            patch_size=cfg.patch_size, image_size=cfg.image_size,
        )
        text = CLIPTextCfg(
            context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
            heads=cfg.text_heads, layers=cfg.text_layers, pool_type="eos", eos_id=EOT, pad_id=PAD,
        )
        self.model = CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision, text_cfg=text)
        # Until `fit_vocab` is called the BPE ids are hashed into the table.
        ids = torch.arange(BPE_VOCAB)
        self.register_buffer("token_map", FIRST_WORD + ids % (cfg.vocab_size - FIRST_WORD))

    # -- text ----------------------------------------------------------------------------------------
    def fit_vocab(self, texts: list[str]) -> int:
        """Give each BPE token of `texts` its own embedding row, most frequent first. Returns tokens kept."""
        counts = Counter(tok for text in texts for tok in bpe_tokenizer().encode(text))
        kept = [tok for tok, _ in counts.most_common(self.cfg.vocab_size - FIRST_WORD)]
        token_map = torch.full((BPE_VOCAB,), UNK, dtype=torch.long)
        token_map[torch.tensor(kept, dtype=torch.long)] = torch.arange(FIRST_WORD, FIRST_WORD + len(kept))
        self.token_map.copy_(token_map)
        return len(kept)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts -> (tokens (B, L) long, truncated flags). Layout: SOT, words..., EOT, PAD..."""
        L = self.cfg.context_length
        tokens = torch.full((len(texts), L), PAD, dtype=torch.long)
        truncated = []
        for i, text in enumerate(texts):
            ids = torch.tensor(bpe_tokenizer().encode(text), dtype=torch.long)
            truncated.append(len(ids) > L - 2)
            ids = self.token_map.cpu()[ids[: L - 2]]
            tokens[i, 0] = SOT
            tokens[i, 1 : 1 + len(ids)] = ids
            tokens[i, 1 + len(ids)] = EOT
        return tokens.to(self.token_map.device), truncated

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, L) -> z_t (B, D) unit-norm, token states (B, L, W), mask (B, L) True = SOT..EOT."""
        m = self.model
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, W)
        x = m.transformer(x, attn_mask=m.attn_mask)  # causal
        states = m.ln_final(x)  # (B, L, W) — the per-token states the prior and decoder read
        eot = (tokens == EOT).int().argmax(dim=1)  # (B,)
        pooled = states[torch.arange(tokens.shape[0]), eot]  # (B, W)
        z_t = pooled @ m.text_projection if isinstance(m.text_projection, torch.Tensor) else m.text_projection(pooled)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]  # (B, L)
        return F.normalize(z_t, dim=-1), states, mask

    # -- images --------------------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z_i (B, D) unit-norm."""
        size = self.cfg.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return F.normalize(self.model.visual(x), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """For open_clip's ClipLoss: (image features, text features, logit scale)."""
        z_t, _, _ = self.encode_text(tokens)
        return self.encode_image(images), z_t, self.model.logit_scale.exp()
