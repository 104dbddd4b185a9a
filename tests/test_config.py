"""Config: presets carry the paper's dimensions (DESIGN.md section 3), overrides are type-checked."""

import dataclasses

import pytest

import miniflamingo as mf

# paper Table 4: LM (layers, width, heads), xattn every
PAPER = {
    "flamingo-3b": (24, 2048, 16, 1),
    "flamingo-9b": (40, 4096, 32, 4),
    "flamingo-80b": (80, 8192, 64, 7),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_have_the_papers_dimensions(name):
    cfg = mf.FlamingoConfig.preset(name)
    n_layer, d_model, n_head, every = PAPER[name]
    assert (cfg.lm.n_layer, cfg.lm.d_model, cfg.lm.n_head) == (n_layer, d_model, n_head)
    assert (cfg.xattn.every, cfg.xattn.n_head) == (every, n_head)
    assert cfg.xattn.n_head * cfg.xattn.d_head == cfg.lm.d_model  # xattn width is the LM's
    r = cfg.resampler
    assert (r.n_layer, r.d_model, r.n_head, r.num_latents) == (6, 1536, 16, 64)
    v = cfg.vision
    assert v.depths == (7, 14, 42, 21) and v.widths == (256, 512, 1536, 1536) and v.final_width == 3072
    assert v.image_size == 320 and cfg.xattn.only_immediate_media


def test_xattn_insertion_points():
    # before blocks 0, every, 2*every, ... : 24 for 3B, 10 for 9B, 12 for 80B (80 / 7 rounded up)
    assert [mf.FlamingoConfig.preset(n).n_xattn for n in sorted(PAPER)] == [24, 12, 10]


def test_every_preset_builds_and_unknown_preset_lists_the_valid_ones():
    for name in ("tiny", "small", *PAPER):
        assert isinstance(mf.FlamingoConfig.preset(name), mf.FlamingoConfig)
    with pytest.raises(ValueError, match="flamingo-80b"):
        mf.FlamingoConfig.preset("flamingo-1t")


def test_special_token_ids_are_the_last_three():
    cfg = mf.FlamingoConfig.preset("tiny")
    v = cfg.lm.vocab_size
    assert (cfg.eot_id, cfg.image_id, cfg.eoc_id) == (v - 3, v - 2, v - 1)


def test_overrides_are_type_checked():
    cfg = mf.FlamingoConfig.preset("tiny")
    new = cfg.override(["--lm.n_layer=6", "--xattn.only_immediate_media=false", "--max_media=3",
                        "--vision.depths=2,2,2,2"])
    assert new.lm.n_layer == 6 and new.xattn.only_immediate_media is False and new.max_media == 3
    assert new.vision.depths == (2, 2, 2, 2)
    assert cfg.lm.n_layer == 2, "override must not mutate the original config"
    with pytest.raises(ValueError, match="expected int"):
        cfg.override(["--lm.n_layer=six"])
    with pytest.raises(ValueError, match="expected bool"):
        cfg.override(["--xattn.gated=maybe"])


def test_unknown_override_key_lists_valid_keys():
    cfg = mf.FlamingoConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"unknown config key 'lm\.n_layers'.*lm\.n_layer"):
        cfg.override(["--lm.n_layers=6"])
    with pytest.raises(ValueError, match="must look like"):
        cfg.override(["lm.n_layer=6"])


def test_invariants_are_checked_with_the_field_named():
    cfg = mf.FlamingoConfig.preset("tiny")
    with pytest.raises(AssertionError, match="lm.d_model"):
        cfg.override(["--lm.n_head=3"])
    with pytest.raises(AssertionError, match="vision.image_size"):
        cfg.override(["--vision.image_size=63"])


def test_dict_round_trip():
    for name in ("tiny", "flamingo-9b"):
        cfg = mf.FlamingoConfig.preset(name)
        assert mf.FlamingoConfig.from_dict(cfg.to_dict()) == cfg
        assert dataclasses.asdict(cfg) == cfg.to_dict()
