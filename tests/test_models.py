"""Networks of the tiny preset: shapes, conditioning that is (and is not) read, CLIP text handling, golden numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unclip_cli.checkpoint import config_from_dict
from unclip_cli.models.clip import EOT, FIRST_WORD, PAD, SOT, UNK, Clip, ClipConfig, bpe_tokenizer
from unclip_cli.models.layers import timestep_embedding
from unclip_cli.models.prior import Prior, PriorConfig, pick_closest
from unclip_cli.models.unet import AttentionBlock, UNet, UNetConfig
from unclip_cli.presets import load_preset

PRESET = load_preset("tiny")


def _wake(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give zero-initialised layers random weights, so that every input can reach the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, std, generator=g)
    return model.eval()


def _unet(stage: str) -> UNet:
    torch.manual_seed(0)
    return _wake(UNet(config_from_dict(UNetConfig, PRESET[stage]["model"])))


@pytest.fixture(scope="module")
def clip() -> Clip:
    torch.manual_seed(0)
    return Clip(config_from_dict(ClipConfig, PRESET["clip"])).eval()


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _decoder_inputs(B=2, size=8, seed=0):
    cfg = PRESET["decoder"]["model"]
    L = PRESET["clip"]["context_length"]
    mask = torch.arange(L)[None] < torch.tensor([5, L])[:B, None]
    return dict(
        x=_rand(B, 3, size, size, seed=seed), t=torch.tensor([10, 700])[:B],
        cond=_rand(B, 4, size, size, seed=seed + 1), z_i=F.normalize(_rand(B, cfg["clip_dim"], seed=seed + 2), dim=-1),
        text_states=_rand(B, L, cfg["text_width"], seed=seed + 3), text_mask=mask,
    )


# -- UNet -------------------------------------------------------------------------------------------------
def test_decoder_unet_output_shape():
    unet = _unet("decoder")
    with torch.no_grad():
        out = unet(**_decoder_inputs())
    assert out.shape == (2, 3, 8, 8)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3


@pytest.mark.parametrize("size", [8, 16, 24])
def test_upsampler_runs_at_multiples_of_its_training_size(size):
    unet = _unet("upsampler")
    assert unet.cfg.image_size == 8 and not any(isinstance(m, AttentionBlock) for m in unet.modules())
    x, low = _rand(2, 3, size, size, seed=0), _rand(2, 3, size, size, seed=1)
    with torch.no_grad():
        out = unet(x, torch.tensor([3, 900]), cond=low)
    assert out.shape == (2, 3, size, size)
    assert torch.isfinite(out).all()


def test_upsampler_reads_its_low_resolution_image():
    unet = _unet("upsampler")
    x = _rand(1, 3, 16, 16)
    with torch.no_grad():
        a = unet(x, torch.tensor([500]), cond=_rand(1, 3, 16, 16, seed=1))
        b = unet(x, torch.tensor([500]), cond=_rand(1, 3, 16, 16, seed=2))
    assert (a - b).abs().max() > 1e-4


def test_decoder_missing_extra_channels_mean_zeros():
    unet = _unet("decoder")
    inp = _decoder_inputs()
    with torch.no_grad():
        a = unet(**{**inp, "cond": None})
        b = unet(**{**inp, "cond": torch.zeros_like(inp["cond"])})
        c = unet(**inp)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-4  # the inpainting channels are read


def test_decoder_ignores_padding_tokens_and_dropped_conditioning():
    unet = _unet("decoder")
    inp = _decoder_inputs()
    noisy_pad = inp["text_states"].clone()
    noisy_pad[0, 5:] += 10 * _rand(*noisy_pad[0, 5:].shape, seed=9)  # row 0 has 5 real tokens
    with torch.no_grad():
        base = unet(**inp)
        torch.testing.assert_close(unet(**{**inp, "text_states": noisy_pad}), base, atol=1e-5, rtol=1e-5)
        # A real token does matter.
        real = inp["text_states"].clone()
        real[0, 2] += 5
        assert (unet(**{**inp, "text_states": real})[0] - base[0]).abs().max() > 1e-4
        # z_keep False: z_i is replaced by the learned null embedding and no longer read.
        drop = torch.tensor([False, True])
        a = unet(**{**inp, "z_keep": drop})
        b = unet(**{**inp, "z_keep": drop, "z_i": F.normalize(_rand(2, 32, seed=7), dim=-1)})
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        assert (a[1] - b[1]).abs().max() > 1e-4
        assert (a[0] - base[0]).abs().max() > 1e-4


def test_unet_rows_are_independent_of_their_batch():
    unet = _unet("decoder")
    inp = _decoder_inputs()
    with torch.no_grad():
        both = unet(**inp)
        first = unet(**{k: v[:1] for k, v in inp.items()})
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)


# Computed once with this test's recipe (torch 2.x, CPU, float32); a change means the architecture,
# its initialisation order or its numerics changed.
GOLDEN_SLICE_0 = [[0.07559805, -0.01772760, -0.22672552], [-0.05717465, -0.40726936, 0.08654719], [-0.01907438, 0.46058488, 0.77959406]]
GOLDEN_SLICE_1 = [[-0.22732157, -0.28283045, -0.06604031], [0.22565442, -0.25316143, -0.04623732], [-0.12939413, -0.24959013, 0.08399576]]
GOLDEN_PARAMS = 207459


def test_decoder_unet_golden_numbers():
    torch.manual_seed(0)
    unet = UNet(config_from_dict(UNetConfig, PRESET["decoder"]["model"]))
    _wake(unet, seed=0, std=0.05)
    assert sum(p.numel() for p in unet.parameters()) == GOLDEN_PARAMS
    x = torch.linspace(-1, 1, 2 * 3 * 8 * 8).view(2, 3, 8, 8)
    extra = torch.cos(torch.arange(2 * 4 * 64.0)).view(2, 4, 8, 8)
    z_i = F.normalize(torch.sin(torch.arange(64.0)).view(2, 32) + 0.1, dim=-1)
    states = torch.cos(torch.arange(2 * 16 * 32.0) / 7).view(2, 16, 32)
    mask = torch.arange(16)[None] < torch.tensor([[5], [16]])
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 700]), cond=extra, z_i=z_i, text_states=states, text_mask=mask)
    torch.testing.assert_close(out[0, 0, :3, :3], torch.tensor(GOLDEN_SLICE_0), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, 2, -3:, -3:], torch.tensor(GOLDEN_SLICE_1), atol=1e-4, rtol=0)


# -- Prior ------------------------------------------------------------------------------------------------
def _prior_inputs(B=3):
    cfg = PRESET["prior"]["model"]
    L, D = cfg["context_length"], cfg["clip_dim"]
    return dict(
        x_t=_rand(B, D, seed=0), t=torch.tensor([0, 500, 999])[:B], z_t=F.normalize(_rand(B, D, seed=1), dim=-1),
        text_states=_rand(B, L, cfg["text_width"], seed=2), text_mask=torch.arange(L)[None] < torch.tensor([4, 9, L])[:B, None],
    )


def _prior() -> Prior:
    torch.manual_seed(0)
    return _wake(Prior(config_from_dict(PriorConfig, PRESET["prior"]["model"])))


def test_prior_output_shape():
    prior = _prior()
    with torch.no_grad():
        out = prior(**_prior_inputs())
    assert out.shape == (3, PRESET["prior"]["model"]["clip_dim"])
    assert torch.isfinite(out).all()


def test_prior_reads_the_text_only_when_kept():
    prior = _prior()
    inp = _prior_inputs()
    other = {**inp, "z_t": F.normalize(_rand(3, 32, seed=5), dim=-1), "text_states": _rand(*inp["text_states"].shape, seed=6)}
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        a, b = prior(**inp, text_keep=keep), prior(**other, text_keep=keep)
        pad = inp["text_states"].clone()
        pad[0, 4:] += 10  # row 0 has 4 real tokens
        c = prior(**{**inp, "text_states": pad}, text_keep=keep)
    torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)  # dropped: neither z_t nor tokens matter
    assert (a[0] - b[0]).abs().max() > 1e-4 and (a[2] - b[2]).abs().max() > 1e-4
    torch.testing.assert_close(c, a, atol=1e-5, rtol=1e-5)  # padding tokens are never read


def test_prior_standardisation_round_trip():
    prior = _prior()
    with torch.no_grad():
        prior.emb_mean.copy_(_rand(32, seed=1) * 0.1)
        prior.emb_std.copy_(_rand(32, seed=2).abs() + 0.05)
    z = F.normalize(_rand(4, 32, seed=3), dim=-1)
    torch.testing.assert_close(prior.destandardize(prior.standardize(z)), z, atol=1e-6, rtol=0)


def test_pick_closest_keeps_the_candidate_nearest_the_text():
    z_t = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), dim=-1)
    cands = F.normalize(torch.tensor([[[0.1, 1, 0], [1, 0.2, 0]], [[0, 1, 0.1], [1, 0, 0]]]), dim=-1)  # (B=2, K=2, 3)
    out = pick_closest(cands, z_t)
    torch.testing.assert_close(out, torch.stack([cands[0, 1], cands[1, 0]]))


def test_timestep_embedding():
    e = timestep_embedding(torch.tensor([0, 1, 999]), 7)
    assert e.shape == (3, 7)
    assert not torch.equal(e[1], e[2])
    torch.testing.assert_close(e[0, :3], torch.ones(3))  # cos(0)


# -- CLIP -------------------------------------------------------------------------------------------------
def test_tokenize_layout(clip):
    L = clip.cfg.context_length
    tokens, truncated = clip.tokenize(["a red circle", "cat"])
    assert tokens.shape == (2, L) and tokens.dtype == torch.long
    assert truncated == [False, False]
    n = len(bpe_tokenizer().encode("a red circle"))
    assert n == 3
    row = tokens[0].tolist()
    assert row[0] == SOT and row[n + 1] == EOT and all(v == PAD for v in row[n + 2:])
    assert all(v >= FIRST_WORD for v in row[1 : n + 1])


def test_tokenize_flags_and_truncates_a_long_text(clip):
    L = clip.cfg.context_length
    long = " ".join(["word"] * (3 * L))
    tokens, truncated = clip.tokenize([long, "short"])
    assert truncated == [True, False]
    assert tokens[0, 0] == SOT and tokens[0, L - 1] == EOT
    assert (tokens[0, 1 : L - 1] >= FIRST_WORD).all()
    # Exactly L - 2 words fit.
    _, t = clip.tokenize([" ".join(["word"] * (L - 2)), " ".join(["word"] * (L - 1))])
    assert t == [False, True]


def test_encode_text(clip):
    L, W, D = clip.cfg.context_length, clip.cfg.text_width, clip.cfg.embed_dim
    tokens, _ = clip.tokenize(["a red circle", "a blue square with a hat", "猫"])
    with torch.no_grad():
        z_t, states, mask = clip.encode_text(tokens)
    assert z_t.shape == (3, D) and states.shape == (3, L, W) and mask.shape == (3, L) and mask.dtype == torch.bool
    torch.testing.assert_close(z_t.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    for i in range(3):
        eot = tokens[i].tolist().index(EOT)
        assert mask[i, : eot + 1].all() and not mask[i, eot + 1 :].any()
    assert (z_t[0] - z_t[1]).abs().max() > 1e-4


def test_encode_text_ignores_what_follows_eot(clip):
    """Causal attention and EOT pooling: tokens after EOT (padding) change neither z_t nor earlier states."""
    tokens, _ = clip.tokenize(["a red circle"])
    eot = tokens[0].tolist().index(EOT)
    junk = tokens.clone()
    junk[0, eot + 1 :] = 77
    with torch.no_grad():
        a, sa, _ = clip.encode_text(tokens)
        b, sb, _ = clip.encode_text(junk)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(sa[:, : eot + 1], sb[:, : eot + 1], atol=1e-6, rtol=0)


def test_encode_image_any_size_unit_norm(clip):
    with torch.no_grad():
        for size in (8, 16, 20):
            z = clip.encode_image(_rand(2, 3, size, size).clamp(-1, 1))
            assert z.shape == (2, clip.cfg.embed_dim)
            torch.testing.assert_close(z.norm(dim=-1), torch.ones(2), atol=1e-5, rtol=0)


def test_towers_match_open_clips_clip_on_the_same_weights(clip):
    """Our towers are open_clip's CLIP written out: same state-dict keys, same embeddings."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    c = clip.cfg
    ref = CLIP(
        embed_dim=c.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=c.vision_layers, width=c.vision_width, head_width=c.vision_head_width,
                                 patch_size=c.patch_size, image_size=c.image_size),
        text_cfg=CLIPTextCfg(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                             heads=c.text_heads, layers=c.text_layers, pool_type="eos", eos_id=EOT, pad_id=PAD),
    ).eval()
    ref.load_state_dict(clip.model.state_dict(), strict=True)  # raises on any missing or extra key
    tokens, _ = clip.tokenize(["a red circle", "猫"])
    images = _rand(2, 3, c.image_size, c.image_size).clamp(-1, 1)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(tokens)[0], ref.encode_text(tokens, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.encode_image(images), ref.encode_image(images, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(clip.model.attn_mask, ref.attn_mask)


def test_inference_does_not_import_open_clips_model_zoo():
    """open_clip's package import costs ~2 s (torchvision, timm); generating must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys; from unclip_cli.models.clip import Clip, ClipConfig, bpe_tokenizer; "
        "Clip(ClipConfig(image_size=8, patch_size=4, vision_width=32, vision_layers=1, vision_head_width=16, "
        "context_length=8, vocab_size=16, text_width=32, text_heads=2, text_layers=1)).tokenize(['a cat']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip', 'torchvision', 'timm', 'ftfy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # nor ftfy for a plain English prompt (0.1 s)


def test_tokens_equal_open_clips_own_tokenizer_with_ftfy():
    """bpe_tokenizer skips ftfy for printable ASCII without "&", which ftfy leaves as it is: checked on 3,000
    random such strings (seeded), and the tokens of texts ftfy does change equal those of open_clip's module."""
    import importlib.util
    import random
    import string

    import ftfy

    from unclip_cli.models import clip as clip_mod

    rng = random.Random(0)
    alphabet = [c for c in string.printable[:95] if c != "&"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += [w + " face" for w in ("cat", "grinning", "O'Brien's", "x < y > z", "100% {ok} [a|b] ~`^")]
    assert all(ftfy.fix_text(t) == t for t in texts if clip_mod._FTFY_NOOP.fullmatch(t))
    package = Path(next(iter(importlib.util.find_spec("open_clip").submodule_search_locations)))
    spec = importlib.util.spec_from_file_location("_reference_tokenizer", package / "tokenizer.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)  # with the real ftfy
    changed = ["caf\u00c3\u00a9 &amp; cr\u00e8me", "\u201ccurly\u201d quotes", "ｆｕｌｌ ｗｉｄｔｈ", "a\x1b[31mred\x1b[0m cat",
               "line\r\nbreak", "猫脸 &lt;3", "ﬁsh"]
    for t in texts[:200] + changed:
        assert bpe_tokenizer().encode(t) == ref._tokenizer.encode(t), t
    # BPE is our own: the same vocabulary and merges as open_clip's, and the same ids for any text
    assert bpe_tokenizer().encoder == ref._tokenizer.encoder and bpe_tokenizer().bpe_ranks == ref._tokenizer.bpe_ranks
    alphabet = string.printable + "éüßçñ猫狗火箭表情符号😀🐱👍🏽\u200d♀️ﬁ“”’…—&;<>#\u00a0"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(1000)]
    texts += ["<start_of_text>cat", "a <end_of_text> b", "I'll've", "dog's 2nd 3.5 ｆｕｌｌ", "red apple " * 20]
    assert [bpe_tokenizer().encode(t) for t in texts] == [ref._tokenizer.encode(t) for t in texts]


CORPUS = ["a red circle", "a blue square emoji", "红色的圆", "蓝色 方块"]


def test_fit_vocab_gives_corpus_tokens_distinct_ids():
    torch.manual_seed(0)
    clip = Clip(config_from_dict(ClipConfig, PRESET["clip"]))
    bpe = sorted({tok for text in CORPUS for tok in bpe_tokenizer().encode(text)})
    assert clip.fit_vocab(CORPUS) == len(bpe)
    ids = clip.token_map[torch.tensor(bpe)]
    assert len(set(ids.tolist())) == len(bpe), "two corpus tokens share an embedding row"
    assert (ids >= FIRST_WORD).all() and (ids < clip.cfg.vocab_size).all()
    # Tokenize maps through the fitted vocabulary, and an unseen word becomes UNK.
    tokens, _ = clip.tokenize(["a red circle zebra"])
    assert tokens[0, 1:4].tolist() == clip.token_map[torch.tensor(bpe_tokenizer().encode("a red circle"))].tolist()
    assert tokens[0, 4].item() == UNK and tokens[0, 5].item() == EOT


def test_fit_vocab_keeps_the_most_frequent_when_the_table_is_small():
    torch.manual_seed(0)
    clip = Clip(config_from_dict(ClipConfig, {**PRESET["clip"], "vocab_size": FIRST_WORD + 2}))
    assert clip.fit_vocab(["cat cat cat dog dog bird"]) == 2
    cat, dog, bird = (bpe_tokenizer().encode(w)[0] for w in ("cat", "dog", "bird"))
    assert clip.token_map[cat] != clip.token_map[dog]
    assert clip.token_map[bird] == UNK


def test_clip_handles_chinese_text():
    torch.manual_seed(0)
    clip = Clip(config_from_dict(ClipConfig, PRESET["clip"])).eval()
    clip.fit_vocab(CORPUS)
    tokens, truncated = clip.tokenize(["红色的圆", "蓝色 方块"])
    assert truncated == [False, False]
    for row in tokens.tolist():
        eot = row.index(EOT)
        assert eot > 1 and all(FIRST_WORD <= v for v in row[1:eot]), "Chinese characters must not become UNK or vanish"
    assert tokens[0].tolist() != tokens[1].tolist()
    with torch.no_grad():
        z_t, states, mask = clip.encode_text(tokens)
    assert torch.isfinite(z_t).all() and torch.isfinite(states).all()
    assert (z_t[0] - z_t[1]).abs().max() > 1e-4


def test_space_to_depth_unet_matches_shapes_and_reads_every_pixel():
    """patch_size 2 (the emoji upsampler): same output shape, at any multiple of its factor, and every
    input pixel reaches the output (pixel_unshuffle / pixel_shuffle lose nothing)."""
    from unclip_cli.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, extra_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_ds=(), patch_size=2))
    for p in net.parameters():
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.02)
    assert net.downsample_factor == 4
    for side in (8, 16, 24):
        x = torch.randn(2, 3, side, side, requires_grad=True)
        out = net(x, torch.tensor([10, 500]), cond=torch.zeros(2, 3, side, side))
        assert out.shape == x.shape
    out[0, :, 0, 1].sum().backward()
    assert x.grad[0].abs().sum() > 0
