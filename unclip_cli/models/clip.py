"""CLIP, trained from scratch, laid out exactly like open_clip's `CLIP` (ViT image tower, causal text tower).

The towers are written out here instead of imported: importing open_clip pulls in torchvision and timm
(~2.3 s on the 2-core machine), more than sampling `generate --quality fast` takes. Parameter names,
shapes and arithmetic match open_clip's `CLIP` built with the same config (tests/test_models.py checks
both on the same weights), so checkpoints move between the two unchanged. CLIP's BPE merges ship with this
module (bpe_merges.txt.gz, the head of the file open_clip bundles; `BPE` here tokenizes with them as its tokenizer
does, in a third of the start-up time), so running a model needs neither open_clip nor the torchvision and timm it
requires; training imports open_clip's `ClipLoss`.

On top of the towers this module adds what the unCLIP stack needs:

- a compact vocabulary: CLIP's BPE tokenizer (49,408 tokens) is kept, but its ids go through
  `token_map` into a small embedding table sized to the corpus (the emoji captions use a few thousand
  tokens; a full table would be most of the shipped megabytes and never trained). `fit_vocab` assigns
  the corpus' tokens their own rows; unseen tokens share one "unknown" row.
- per-token text states (the `ln_final` output), which the prior and decoder attend to (§2.1, §2.2);
- inputs in [-1, 1] at any size, resized here to the vision tower's resolution.

Embeddings are returned unit-norm: the prior, decoder, slerp and text diffs all work on the sphere.

The same towers also hold OpenAI's CLIP as Karlo uses it (a converted set, `unclip convert karlo`), by
configuration: `activation="quick_gelu"`, `vocab="bpe"` (the tokenizer's 49,408 ids as Hugging Face's
CLIPTokenizer numbers them: start 49406, end 49407, padding 0), `normalize=False` (the raw projected
embeddings Karlo's prior and decoder were trained on) and `preprocess="openai"` (shortest side resized
bicubically, centre crop, OpenAI's mean and std).
"""

from __future__ import annotations

import functools
import html
import math
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip_cli.models.layers import activation, initial

PAD, SOT, EOT, UNK, FIRST_WORD = 0, 1, 2, 3, 4
BPE_VOCAB = 49408
BPE_SOT, BPE_EOT = 49406, 49407  # <|startoftext|>, <|endoftext|> in the full BPE vocabulary
# The pixel statistics OpenAI's CLIP was trained with (and Hugging Face's CLIPImageProcessor applies).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
VOCABS = ("compact", "bpe")
PREPROCESS = ("resize", "openai")


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
    activation: str = "gelu"  # "quick_gelu": OpenAI's CLIP
    vocab: str = "compact"  # "bpe": the full 49,408-token vocabulary with Hugging Face's ids (vocab_size 49408)
    normalize: bool = True  # False: raw projected embeddings (Karlo's prior and decoder read them so)
    preprocess: str = "resize"  # "openai": shortest side to image_size (bicubic), centre crop, OpenAI mean/std
    vision: bool = True  # False: a text tower only (a Karlo set converted without its image-variation folder)
    text_mlp_width: int = 0  # hidden width of the text tower's MLPs; 0: 4 x text_width (CLIP's ratio; sets before this field)
    vision_mlp_width: int = 0  # the same for the vision tower; 0: 4 x vision_width
    text: bool = True  # False: an image tower only (Stable unCLIP's image encoder, converted without a prior)
    # False: no text projection, z_t is the pooled state itself; the token states are what such a tower is for
    # (Stable Diffusion 2's OpenCLIP ViT-H text tower, its penultimate layer: a separate decoder text encoder)
    text_projection: bool = True


# ftfy (and its 0.1 s import) is only needed for text it could change: it leaves printable ASCII without "&"
# (no HTML entity, no control character, no mojibake) as it is (tests/test_models.py checks that against ftfy).
_FTFY_NOOP = re.compile(r"[ -%'-~]*")


def _fix_text(text: str) -> str:
    if _FTFY_NOOP.fullmatch(text):
        return text
    import ftfy

    return ftfy.fix_text(text)


@functools.lru_cache(maxsize=1)
def bpe_tokenizer() -> "BPE":
    """CLIP's BPE tokenizer over the merges shipped beside this module (no download), built once per process."""
    return BPE(Path(__file__).with_name("bpe_merges.txt.gz"))


class BPE:
    """CLIP's byte-level BPE (Radford et al. 2021, as OpenAI's and open_clip's tokenizers apply it; the tests check
    the ids against open_clip's): text cleaned (ftfy, HTML entities, spaces, lower case), split into words, each
    word's UTF-8 bytes spelled as printable characters and merged pair by pair, lowest-ranked merge first.

    The vocabulary is the 256 byte characters, the same ending a word (`</w>`), one token per merge (the first
    48,894 lines of the merges file) and the start and end tokens: 49,408 ids. Only that head of the file is
    decompressed, and merges are looked up by their text ("a b"), which keeps building it at ~0.04 s."""

    MERGES = 49152 - 256 - 2
    SPECIAL = ("<start_of_text>", "<end_of_text>")

    def __init__(self, path: Path):
        import zlib

        unzip, head = zlib.decompressobj(16 + zlib.MAX_WBITS), bytearray()  # a gzip stream
        with open(path, "rb") as f:
            while head.count(b"\n") <= self.MERGES and (chunk := f.read(1 << 16)):
                head += unzip.decompress(chunk)
        merges = head.decode("utf-8").split("\n")[1 : self.MERGES + 1]  # line 0 is a version header
        if len(merges) != self.MERGES:
            raise ImportError(f"{path}: not CLIP's BPE merges (unclip's install is damaged)")
        self.ranks = {m: i for i, m in enumerate(merges)}  # "a b" -> rank
        self.byte_char, order = _byte_chars()
        chars = [self.byte_char[b] for b in order]
        vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
        self.encoder = {tok: i for i, tok in enumerate(vocab + list(self.SPECIAL))}
        self.cache = {t: [t] for t in self.SPECIAL}
        import regex  # \p{L}: letters of every script

        self.pattern = regex.compile("|".join(self.SPECIAL) + r"|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                                     regex.IGNORECASE)

    @property
    def bpe_ranks(self) -> dict[tuple[str, str], int]:
        """(first, second) -> rank of every merge, as a merges file lists them (for the converters' checks)."""
        return {tuple(m.split(" ")): i for m, i in self.ranks.items()}

    def encode(self, text: str) -> list[int]:
        text = " ".join(html.unescape(html.unescape(_fix_text(text))).split()).lower()
        return [self.encoder[tok] for word in self.pattern.findall(text)
                for tok in self._merge("".join(self.byte_char[b] for b in word.encode("utf-8")))]

    def _merge(self, word: str) -> list[str]:
        """One word's tokens: its characters (the last one ending the word), then the lowest-ranked pair merged
        everywhere it occurs, left to right, until no pair of neighbours is a merge."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(f"{a} {b}", self.MERGES), (a, b)) for a, b in zip(parts, parts[1:]))
            if rank == self.MERGES:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts


def _byte_chars() -> tuple[list[str], list[int]]:
    """A printable character for each byte value (GPT-2's table, which CLIP's BPE uses), and the bytes in the order
    of the vocabulary's first ids: the printable Latin-1 bytes stand for themselves and come first, the other 68
    stand for the characters from U+0100 on and follow, each group in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(rest)) for b in range(256)]
    return chars, printable + [b for b in range(256) if b not in printable]


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). open_clip's names."""

    def __init__(self, width: int, heads: int, act: str = "gelu", mlp_width: int = 0):
        super().__init__()
        hidden = mlp_width or 4 * width
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=activation(act), c_proj=nn.Linear(hidden, width),
        ))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)  # (B, N, W)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str = "gelu", mlp_width: int = 0):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act, mlp_width) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """ViT: patches + class token -> transformer -> ln_post on the class token -> projection."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        W, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        scale = W**-0.5
        self.conv1 = nn.Conv2d(3, W, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(initial(lambda: scale * torch.randn(W), W))
        self.positional_embedding = nn.Parameter(initial(lambda: scale * torch.randn(grid * grid + 1, W), grid * grid + 1, W))
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = Transformer(W, cfg.vision_layers, W // cfg.vision_head_width, cfg.activation, cfg.vision_mlp_width)
        self.ln_post = nn.LayerNorm(W)
        self.proj = nn.Parameter(initial(lambda: scale * torch.randn(W, cfg.embed_dim), W, cfg.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid², W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1 + grid², W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 0] @ self.proj  # (B, D)


class NoImageEncoder(RuntimeError):
    """An image was to be encoded by a CLIP that has only its text tower."""


class NoTextEncoder(RuntimeError):
    """A text was to be encoded by a CLIP that has only its image tower."""


def causal_mask(L: int) -> torch.Tensor:
    """(L, L) additive mask: -inf above the diagonal, so token i attends to tokens 0..i. On the meta device
    an empty one (see layers.initial: triu there imports torch's compiler, 1.5 s); loading recomputes it."""
    full = torch.full((L, L), float("-inf"))
    return full if full.is_meta else full.triu_(1)


class ClipTowers(nn.Module):
    """Both towers under the attribute names of open_clip's `CLIP`, so state dicts are interchangeable."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        W, L = cfg.text_width, cfg.context_length
        self.visual = VisionTransformer(cfg) if cfg.vision else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        if not cfg.text:
            return
        self.token_embedding = nn.Embedding(cfg.vocab_size, W, _weight=initial(lambda: None, cfg.vocab_size, W))  # None: it draws its own
        self.positional_embedding = nn.Parameter(torch.empty(L, W))
        self.transformer = Transformer(W, cfg.text_layers, cfg.text_heads, cfg.activation, cfg.text_mlp_width)
        self.ln_final = nn.LayerNorm(W)
        self.text_projection = nn.Parameter(torch.empty(W, cfg.embed_dim)) if cfg.text_projection else None
        self.register_buffer("attn_mask", causal_mask(L), persistent=False)
        # The text tower's initialisation from CLIP (Radford et al. 2021) as open_clip keeps it;
        # the vision tower keeps PyTorch's defaults plus the scaled embeddings above, as open_clip does.
        if self.positional_embedding.is_meta:  # shapes only (see layers.initial)
            return
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std, attn_std, fc_std = W**-0.5 * (2 * cfg.text_layers) ** -0.5, W**-0.5, (2 * W) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if self.text_projection is not None:
            nn.init.normal_(self.text_projection, std=W**-0.5)

    def reset_buffers(self) -> None:
        """Recompute the derived, non-persistent buffers (after a load that built the module without data)."""
        if hasattr(self, "attn_mask"):
            self.attn_mask = causal_mask(self.positional_embedding.shape[0]).to(self.positional_embedding.device)


class Clip(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        if cfg.vocab not in VOCABS:
            raise ValueError(f"ClipConfig.vocab is {cfg.vocab!r}; choose from {', '.join(VOCABS)}")
        if cfg.vocab == "bpe" and cfg.vocab_size != BPE_VOCAB:
            raise ValueError(f"ClipConfig.vocab_size is {cfg.vocab_size}; the full BPE vocabulary has {BPE_VOCAB}")
        if cfg.preprocess not in PREPROCESS:
            raise ValueError(f"ClipConfig.preprocess is {cfg.preprocess!r}; choose from {', '.join(PREPROCESS)}")
        self.cfg = cfg
        self.model = ClipTowers(cfg)
        if cfg.vocab == "compact":
            # Until `fit_vocab` is called the BPE ids are hashed into the table.
            self.register_buffer("token_map", initial(lambda: FIRST_WORD + torch.arange(BPE_VOCAB) % (cfg.vocab_size - FIRST_WORD),
                                                      BPE_VOCAB, dtype=torch.long))
            self.pad_id, self.sot_id, self.eot_id = PAD, SOT, EOT
        else:  # the BPE ids are the table's rows; the tokenizer's own start and end ids; padding 0 (`!`, as HF pads)
            self.token_map = None
            self.pad_id, self.sot_id, self.eot_id = 0, BPE_SOT, BPE_EOT

    # -- text ----------------------------------------------------------------------------------------
    def fit_vocab(self, texts: list[str]) -> int:
        """Give each BPE token of `texts` its own embedding row, most frequent first. Returns tokens kept."""
        if self.token_map is None:
            raise ValueError("a CLIP with the full BPE vocabulary has a row for every token already")
        counts = Counter(tok for text in texts for tok in bpe_tokenizer().encode(text))
        kept = [tok for tok, _ in counts.most_common(self.cfg.vocab_size - FIRST_WORD)]
        token_map = torch.full((BPE_VOCAB,), UNK, dtype=torch.long)
        token_map[torch.tensor(kept, dtype=torch.long)] = torch.arange(FIRST_WORD, FIRST_WORD + len(kept))
        self.token_map.copy_(token_map)
        return len(kept)

    def _bpe_ids(self, text: str) -> list[int]:
        """BPE ids of a text. With the full vocabulary, as Hugging Face's CLIP tokenizer with Karlo's padding
        token `!` makes them: each `!` is split out and becomes the padding id 0, the text around it is
        tokenized piece by piece."""
        if self.token_map is not None:
            return bpe_tokenizer().encode(text)
        ids: list[int] = []
        for k, piece in enumerate(text.split("!")):
            if k:
                ids.append(self.pad_id)
            ids += bpe_tokenizer().encode(piece)
        return ids

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, list[bool]]:
        """Texts -> (tokens (B, L) long, truncated flags). Layout: SOT, words..., EOT, PAD..."""
        L = self.cfg.context_length
        tokens = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        truncated = []
        for i, text in enumerate(texts):
            ids = torch.tensor(self._bpe_ids(text), dtype=torch.long)
            truncated.append(len(ids) > L - 2)
            ids = ids[: L - 2] if self.token_map is None else self.token_map.cpu()[ids[: L - 2]]
            tokens[i, 0] = self.sot_id
            tokens[i, 1 : 1 + len(ids)] = ids
            tokens[i, 1 + len(ids)] = self.eot_id
        return tokens.to(self.model.logit_scale.device), truncated

    def encode_text(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (B, L) -> z_t (B, D) unit-norm (raw with `normalize=False`), token states (B, L, W),
        mask (B, L) True = SOT..EOT."""
        m = self.model
        if not self.cfg.text:
            raise NoTextEncoder("this model set's CLIP has no text encoder")
        x = m.token_embedding(tokens) + m.positional_embedding  # (B, L, W)
        x = m.transformer(x, attn_mask=m.attn_mask.to(x.dtype))  # causal
        states = m.ln_final(x)  # (B, L, W) — the per-token states the prior and decoder read
        eot = (tokens == self.eot_id).int().argmax(dim=1)  # (B,)
        pooled = states[torch.arange(tokens.shape[0]), eot]  # (B, W)
        z_t = pooled if m.text_projection is None else pooled @ m.text_projection  # (B, D)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]  # (B, L)
        return (F.normalize(z_t, dim=-1) if self.cfg.normalize else z_t), states, mask

    # -- images --------------------------------------------------------------------------------------
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) in [-1, 1] -> z_i (B, D) unit-norm (raw with `normalize=False`)."""
        size = self.cfg.image_size
        if self.cfg.preprocess == "openai":
            return self.encode_pixels(self._openai_pixels(x))
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return self.encode_pixels(x)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S), as `image_pixels` makes them -> z_i (B, D)."""
        if self.model.visual is None:
            raise NoImageEncoder("this model set's CLIP has no image encoder")
        z = self.model.visual(pixels)
        return F.normalize(z, dim=-1) if self.cfg.normalize else z

    def image_pixels(self, img) -> torch.Tensor:
        """A PIL image -> the vision tower's input (1, 3, S, S) float32, as this CLIP was trained to see it.

        "openai": shortest side resized to S (bicubic), centre crop, then (x / 255 - mean) / std, the steps of
        OpenAI's CLIP preprocessing and Hugging Face's CLIPImageProcessor. "resize": the whole image resized to
        S x S, in [-1, 1]."""
        import numpy as np
        from PIL import Image

        S = self.cfg.image_size
        img = img.convert("RGB")
        if self.cfg.preprocess == "resize":
            if img.size != (S, S):
                img = img.resize((S, S), Image.Resampling.BICUBIC, reducing_gap=None)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
            return x[None]
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(S * long / short)
        size = (S, new_long) if w <= h else (new_long, S)
        if img.size != size:
            img = img.resize(size, Image.Resampling.BICUBIC)
        w, h = img.size
        left, top = (w - S) // 2, (h - S) // 2
        img = img.crop((left, top, left + S, top + S))
        x = (torch.from_numpy(np.asarray(img).copy()).double() * (1 / 255)).float().permute(2, 0, 1)  # (3, S, S) in [0, 1]
        mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
        return ((x - mean) / std)[None]

    def _openai_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> OpenAI-normalised pixels (B, 3, S, S): the tensor form of `image_pixels`."""
        S = self.cfg.image_size
        H, W = x.shape[-2:]
        if min(H, W) != S:
            size = (S, int(S * W / H)) if H <= W else (int(S * H / W), S)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        H, W = x.shape[-2:]
        top, left = (H - S) // 2, (W - S) // 2
        x = (x[..., top : top + S, left : left + S] + 1) / 2
        mean = torch.tensor(OPENAI_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """For open_clip's ClipLoss: (image features, text features, logit scale)."""
        z_t, _, _ = self.encode_text(tokens)
        return self.encode_image(images), z_t, self.model.logit_scale.exp()
