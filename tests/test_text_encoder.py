"""Parity of minsdxl's CLIP text encoders with transformers' CLIPTextModel / CLIPTextModelWithProjection
and with open_clip's own bigG text tower, fp32 on CPU, random weights (tiny and real shapes)."""

import json
import os

import open_clip
import pytest
import torch
import transformers
from sdxl_testing import hf_config, randomize_, rel_err

from minsdxl.checkpoint import sgm_to_diffusers
from minsdxl.config import TEXT_PRESETS, TextConfig
from minsdxl.text_encoder import CLIPTextModel, CLIPTextModelWithProjection, build_text_encoder, normalize_text_keys

BOS, EOS = 49406, 49407
# max |diff| <= 1e-5 * max |ref|: fp32 with the same op order up to SDPA kernel choice; a wrong mask,
# activation, LayerNorm or layer index is off by far more than this
TOL = 1e-5

TINY_L = TextConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
TINY_G = TextConfig(
    hidden_size=40,
    num_hidden_layers=5,
    num_attention_heads=5,
    intermediate_size=80,
    hidden_act="gelu",
    projection_dim=24,
    pad_token_id=0,
)


def hf_class(cfg: TextConfig):
    return transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel


def token_ids(lengths, pad: int, seed: int = 0) -> torch.Tensor:
    """Tokenizer-shaped ids: BOS, n random word ids, EOS, then pads (EOS for CLIP-L, 0 for bigG)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), 77), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1 : n + 1] = torch.randint(1, BOS, (n,), generator=g)
        ids[i, n + 1] = EOS
    return ids


def reference_outputs(ref, ids):
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else None
    return out.hidden_states, pooled


@torch.no_grad()
def fill_random_(sd: dict, seed: int) -> None:
    """Seeded random weights, quick at 700M parameters: matrices are fan-in scaled windows at random
    offsets into one 64 MB pool of uniform noise (a plain copy; drawing 2.8 GB of fresh random numbers on
    one core takes longer than the whole bigG parity test), vectors are small random biases and
    LayerNorm weights near 1 so a norm bug shows."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.empty(1 << 24).uniform_(-(3**0.5), 3**0.5, generator=g)  # std 1
    for name, p in sd.items():
        if p.ndim == 1:
            p.uniform_(-0.1, 0.1, generator=g)
            if ("ln_" in name or "norm" in name) and name.endswith("weight"):
                p.add_(1.0)
            continue
        flat, scale = p.view(-1), p.shape[-1] ** -0.5  # std 1/sqrt(fan_in)
        for i in range(0, flat.numel(), 1 << 23):
            n = min(1 << 23, flat.numel() - i)
            o = int(torch.randint(0, pool.numel() - n + 1, (), generator=g))
            torch.mul(pool[o : o + n], scale, out=flat[i : i + n])


# ------------------------------------------------------------------------------------------------
# keys


@pytest.mark.parametrize("preset", ["clip_l", "bigg"])
def test_state_dict_keys_equal_installed_transformers(preset):
    cfg = TEXT_PRESETS[preset]
    with torch.device("meta"):
        ours = build_text_encoder(cfg)
        ref = hf_class(cfg)(hf_config(cfg))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    # transformers 5: CLIPTextModel has no `text_model.` prefix, WithProjection does
    assert ("text_model.embeddings.token_embedding.weight" in want) == (preset == "bigg")
    assert isinstance(ours, CLIPTextModelWithProjection if preset == "bigg" else CLIPTextModel)


def test_normalize_text_keys_accepts_old_and_new_spellings():
    ref_l = randomize_(transformers.CLIPTextModel(hf_config(TINY_L)))
    ref_g = randomize_(transformers.CLIPTextModelWithProjection(hf_config(TINY_G)), seed=1)
    sd_l, sd_g = ref_l.state_dict(), ref_g.state_dict()
    pos = torch.arange(77).expand(1, -1)
    # transformers < 5 spelling of CLIPTextModel (and sgm's CLIP-L): text_model. prefix + position_ids,
    # and some files also carry an unused CLIP-L text_projection
    old_l = {f"text_model.{k}": v for k, v in sd_l.items()} | {
        "text_model.embeddings.position_ids": pos,
        "text_projection.weight": torch.zeros(8, 32),
    }
    old_g = dict(sd_g) | {"text_model.embeddings.position_ids": pos.float()}
    for sd, old, cfg in ((sd_l, old_l, TINY_L), (sd_g, old_g, TINY_G)):
        proj = cfg.projection_dim is not None
        for variant in (sd, old):
            got = normalize_text_keys(variant, with_projection=proj)
            assert got.keys() == sd.keys()
            assert all(got[k] is sd[k] for k in sd)  # renamed, never copied
            build_text_encoder(cfg).load_state_dict(got, strict=True)
    # a WithProjection file written without the prefix also maps onto text_model.*
    flat = {k.removeprefix("text_model."): v for k, v in sd_g.items()}
    assert normalize_text_keys(flat, with_projection=True).keys() == sd_g.keys()


# ------------------------------------------------------------------------------------------------
# tiny configs: every clip_skip, pooled output


@pytest.mark.parametrize("cfg", [TINY_L, TINY_G], ids=["clip_l", "bigg"])
def test_tiny_matches_transformers(cfg):
    ref = randomize_(hf_class(cfg)(hf_config(cfg)).eval(), seed=3)
    ours = build_text_encoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)
    ids = token_ids([0, 5, 75, 30], pad=cfg.pad_token_id)  # empty prompt, short, full 77, middle
    hs, pooled = reference_outputs(ref, ids)
    assert len(hs) == cfg.num_hidden_layers + 1
    for clip_skip in (None, 0, 1, 2, cfg.num_hidden_layers - 1):
        with torch.no_grad():
            h, p = ours(ids, clip_skip=clip_skip)
        want = hs[-((clip_skip or 0) + 2)]  # = diffusers encode_prompt's indexing
        assert h.shape == want.shape and rel_err(h, want) <= TOL, clip_skip
        if cfg.projection_dim:
            assert p.shape == pooled.shape and rel_err(p, pooled) <= TOL
        else:
            assert p is None  # CLIP-L's pooled output is never used by SDXL
    # the early stop for CLIP-L (pool=False) gives the same hidden states as the full stack
    body = ours.text_model if cfg.projection_dim else ours
    with torch.no_grad():
        full, pooled_full = body(ids, clip_skip=1, pool=True)
        short, _ = body(ids, clip_skip=1, pool=False)
    assert torch.equal(full, short) and pooled_full.shape == (4, cfg.hidden_size)
    if not cfg.projection_dim:  # CLIP-L's pooled output, unused by SDXL, is still transformers' pooler_output
        with torch.no_grad():
            want = ref(ids).pooler_output
        assert rel_err(pooled_full, want) <= TOL


def test_pooled_position_is_first_argmax_of_ids():
    """An id above EOS (a textual-inversion token) moves the pooled position, as in transformers with
    SDXL's eos_token_id=2 config and open_clip's argmax pooling."""
    cfg = TINY_G
    ref = randomize_(hf_class(cfg)(hf_config(cfg)).eval(), seed=4)
    ours = build_text_encoder(cfg).eval()
    ours.load_state_dict(ref.state_dict(), assign=True)
    ids = token_ids([3, 3], pad=0)
    ids[1, 2] = cfg.vocab_size - 1
    _, want = reference_outputs(ref, ids)
    with torch.no_grad():
        _, p = ours(ids)
    assert rel_err(p, want) <= TOL
    assert not torch.allclose(p[0], p[1])  # same prefix, different pooled position


def test_clip_skip_out_of_range_is_a_clear_error():
    ours = build_text_encoder(TINY_L)
    ids = token_ids([2], pad=EOS)
    for bad in (-1, TINY_L.num_hidden_layers):
        with pytest.raises(ValueError, match="clip_skip"):
            ours(ids, clip_skip=bad)


def test_more_ids_than_positions_is_a_clear_error():
    with pytest.raises(ValueError, match="77 positions"):
        build_text_encoder(TINY_L)(torch.zeros(1, 78, dtype=torch.long))


def test_unknown_activation_is_a_clear_error():
    with pytest.raises(ValueError, match="hidden_act"):
        build_text_encoder(TextConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, hidden_act="relu6"))


# ------------------------------------------------------------------------------------------------
# real shapes


def test_clip_l_real_shape_matches_transformers():
    cfg = TEXT_PRESETS["clip_l"]
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(hf_config(cfg))
        ours = build_text_encoder(cfg)
    sd = {k: torch.empty(v.shape) for k, v in ref.state_dict().items()}
    fill_random_(sd, seed=5)
    ref.load_state_dict(sd, assign=True)
    ref.embeddings.position_ids = torch.arange(77).expand(1, -1)  # a non-persistent buffer left on meta
    ours.load_state_dict(sd, assign=True)  # the same tensors: no second copy
    ids = token_ids([7, 75], pad=EOS, seed=1)
    hs, _ = reference_outputs(ref.eval(), ids)
    for clip_skip in (None, 1):
        with torch.no_grad():
            h, p = ours(ids, clip_skip=clip_skip)
        assert rel_err(h, hs[-((clip_skip or 0) + 2)]) <= TOL and p is None


@pytest.fixture(scope="module")
def bigg():
    """open_clip's bigG text tower (ViT-bigG-14's text_cfg) with random weights, the same tensors
    renamed by minsdxl's sgm -> diffusers table into transformers' CLIPTextModelWithProjection and into
    ours (views and assign=True: one 2.8 GB copy in all)."""
    from open_clip.model import CLIPTextCfg, _build_text_tower

    with open(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "ViT-bigG-14.json")) as f:
        oc_cfg = json.load(f)
    with torch.device("meta"):
        tower = _build_text_tower(oc_cfg["embed_dim"], CLIPTextCfg(**oc_cfg["text_cfg"]))
    tower.to_empty(device="cpu")
    tower.attn_mask = tower.build_causal_mask()  # a non-persistent buffer: rebuild it off the meta device
    sd = tower.state_dict()
    fill_random_(sd, seed=6)
    comps, unmapped = sgm_to_diffusers({f"conditioner.embedders.0.model.{k}": v for k, v in sd.items()})
    assert unmapped == [] and set(comps) == {"text_encoder_2"}
    hf_sd = comps["text_encoder_2"]

    cfg = TEXT_PRESETS["bigg"]
    with torch.device("meta"):
        ref = transformers.CLIPTextModelWithProjection(hf_config(cfg))
        ours = build_text_encoder(cfg)
    ref.load_state_dict(hf_sd, assign=True)
    ref.text_model.embeddings.position_ids = torch.arange(77).expand(1, -1)
    ours.load_state_dict(normalize_text_keys(hf_sd, with_projection=True), assign=True)
    return tower.eval(), ref.eval(), ours.eval()


def test_bigg_real_shape_matches_transformers(bigg):
    _, ref, ours = bigg
    ids = token_ids([5, 75], pad=0, seed=2)
    hs, pooled = reference_outputs(ref, ids)
    with torch.no_grad():
        h, p = ours(ids)
        # causal attention: a 16-token prefix gives the same states, so clip_skip costs little to check
        h2, _ = ours(ids[:, :16], clip_skip=2)
    assert rel_err(h, hs[-2]) <= TOL and rel_err(p, pooled) <= TOL
    assert rel_err(h2, hs[-4][:, :16]) <= TOL


def test_bigg_real_shape_matches_open_clip(bigg):
    """sgm's FrozenOpenCLIPEmbedder2: layer="penultimate" (the input of the last resblock) and
    ln_final(last)[argmax] @ text_projection."""
    tower, _, ours = bigg
    ids = token_ids([12], pad=0, seed=3)
    n = len(tower.transformer.resblocks)
    with torch.no_grad():
        out = tower.forward_intermediates(ids, indices=[n - 3, n - 2], output_fmt="NLC")
        h, p = ours(ids)
        h1, _ = ours(ids[:, :16], clip_skip=1)  # causal: a prefix is enough
    assert rel_err(h, out["text_intermediates"][1]) <= TOL
    assert rel_err(h1, out["text_intermediates"][0][:, :16]) <= TOL
    assert rel_err(p, out["text_features"]) <= TOL
