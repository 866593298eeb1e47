from __future__ import annotations

import pytest

from service.errors import CheckpointError, RatioError, SpecError
from service.spec import GroupSpec
from tests.models import TINY_CONFIGS, make_tiny
from workers.architectures import architecture_for
from workers.checkpoint import Checkpoint
from workers.grouping import build_grouping, layer_groups


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {mt: Checkpoint.open(make_tiny(root / mt, mt)) for mt in TINY_CONFIGS}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_every_tensor_maps_to_its_layer(tiny_checkpoints, model_type):
    ckpt = tiny_checkpoints[model_type]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="layers"))
    assert g.num_layers == 4 and g.slots == ("layer0", "layer1", "layer2", "layer3")
    assert set(g.rules) == set(ckpt.tensors)
    for name, (kind, slot) in g.rules.items():
        if name in g.non_layer:
            continue
        # the layer index sits in the name as ".<i>."; the slot must be that layer
        assert kind == "slot" and f".{slot}." in name, name
    # at least the input embedding and the final norm are outside the layers
    assert len(g.non_layer) >= 2
    assert all(".0." not in n and ".3." not in n for n in g.non_layer)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_split_attention_and_mlp(tiny_checkpoints, model_type):
    ckpt = tiny_checkpoints[model_type]
    g = build_grouping(ckpt.config, ckpt.tensors,
                       GroupSpec(scheme="blocks", k=2, split_attn_mlp=True))
    assert g.slots == ("block0.attn", "block0.mlp", "block1.attn", "block1.mlp")
    for name, (_, slot) in g.rules.items():
        if name in g.non_layer:
            continue
        layer = int(architecture_for(model_type).layer.match(name).group(1))
        assert slot // 2 == (0 if layer < 2 else 1)
        is_mlp = ".mlp." in name or "post_attention_layernorm" in name or ".ln_2." in name
        assert slot % 2 == (1 if is_mlp else 0), name


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_nearest_rule_embeddings_first_head_last(tiny_checkpoints, model_type):
    ckpt = tiny_checkpoints[model_type]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="blocks", k=2))
    ratios = (0.25, 0.75)
    for name in g.non_layer:
        is_input = any(k in name for k in ("embed_tokens", "embed_in", "wte", "wpe"))
        assert g.ratio_of(name, ratios) == (0.25 if is_input else 0.75), name


def test_tied_embedding_is_one_tensor_with_the_first_ratio(tiny_checkpoints):
    gemma = tiny_checkpoints["gemma"]
    assert gemma.config["tie_word_embeddings"] and "lm_head.weight" not in gemma.tensors
    # a checkpoint that still carries the tied head: it follows the input embedding
    names = [*gemma.tensors, "lm_head.weight"]
    g = build_grouping(gemma.config, names, GroupSpec(scheme="blocks", k=2))
    assert g.tied
    assert g.ratio_of("lm_head.weight", (0.1, 0.9)) == g.ratio_of("model.embed_tokens.weight", (0.1, 0.9)) == 0.1
    untied = build_grouping(tiny_checkpoints["llama"].config, tiny_checkpoints["llama"].tensors,
                            GroupSpec(scheme="blocks", k=2))
    assert untied.ratio_of("lm_head.weight", (0.1, 0.9)) == 0.9


@pytest.mark.parametrize("rule,expected", [("mean", 0.5), ("base", 0.0), ("aligned", 1.0)])
def test_non_layer_rules(tiny_checkpoints, rule, expected):
    ckpt = tiny_checkpoints["llama"]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="blocks", k=2, non_layer=rule))
    assert g.n_ratios == 2
    assert [g.ratio_of(n, (0.2, 0.8)) for n in g.non_layer] == pytest.approx([expected] * len(g.non_layer))


def test_own_non_layer_ratio_is_last_slot(tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="uniform", non_layer="own"))
    assert g.slots == ("all", "non_layer")
    assert {g.ratio_of(n, (0.3, 0.6)) for n in g.non_layer} == {0.6}
    assert g.ratio_of("model.layers.2.mlp.up_proj.weight", (0.3, 0.6)) == 0.3


def test_uniform_gives_every_tensor_the_one_ratio(tiny_checkpoints):
    ckpt = tiny_checkpoints["gpt2"]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="uniform"))
    assert {g.ratio_of(n, (0.4,)) for n in ckpt.tensors} == {0.4}


def test_blocks_follow_the_paper_split():
    groups = layer_groups(GroupSpec(scheme="blocks", k=3), 26)
    assert [g.layers for g in groups] == [tuple(range(0, 8)), tuple(range(8, 17)), tuple(range(17, 26))]
    assert [len(g.layers) for g in layer_groups(GroupSpec(scheme="blocks", k=4), 10)] == [2, 2, 3, 3]


def test_custom_boundaries():
    groups = layer_groups(GroupSpec(scheme="custom", boundaries=(1, 3)), 4)
    assert [g.layers for g in groups] == [(0,), (1, 2), (3,)]
    with pytest.raises(SpecError, match="boundary 4 is not inside"):
        layer_groups(GroupSpec(scheme="custom", boundaries=(2, 4)), 4)


def test_too_many_blocks():
    with pytest.raises(SpecError, match="k=5 blocks but the model has 4 layers"):
        layer_groups(GroupSpec(scheme="blocks", k=5), 4)


@pytest.mark.parametrize("text,message", [
    ("blocks:x", "cannot read"),
    ("custom:3,2", "strictly increasing"),
    ("custom", "needs boundaries"),
    ("layers:2", "takes no"),
    ("shuffle", "uniform"),
    ("blocks:0", "greater than or equal to 1"),
])
def test_bad_group_spec_names_the_field(text, message):
    with pytest.raises(SpecError, match=message) as info:
        GroupSpec.parse_arg(text)
    assert str(info.value).startswith("groups")


def test_parse_arg_round_trips():
    for text in ("uniform", "layers", "blocks:3", "custom:2,5"):
        assert GroupSpec.parse_arg(text).describe() == text
    assert GroupSpec.parse_arg("blocks").blocks == 3


def test_check_ratios(tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    g = build_grouping(ckpt.config, ckpt.tensors, GroupSpec(scheme="blocks", k=2, split_attn_mlp=True))
    with pytest.raises(RatioError, match=r"takes 4 ratio\(s\) \(block0.attn, block0.mlp, block1.attn, block1.mlp\), got 2"):
        g.check_ratios([0.1, 0.2])
    with pytest.raises(RatioError, match="ratio for block1.attn is 1.5, outside"):
        g.check_ratios([0.1, 0.2, 1.5, 0.3])
    with pytest.raises(RatioError, match="nan"):
        g.check_ratios([0.1, float("nan"), 0.5, 0.3], allow_extrapolation=True)
    assert g.check_ratios([0.1, 0.2, 1.5, -0.3], allow_extrapolation=True) == (0.1, 0.2, 1.5, -0.3)


def test_config_and_weights_disagree(tiny_checkpoints):
    ckpt = tiny_checkpoints["llama"]
    config = {**ckpt.config, "num_hidden_layers": 6}
    with pytest.raises(CheckpointError, match=r"no tensors found for decoder layer\(s\) \[4, 5\]"):
        build_grouping(config, ckpt.tensors, GroupSpec(scheme="layers"))
    with pytest.raises(CheckpointError, match="layer count"):
        build_grouping({"model_type": "llama"}, ckpt.tensors, GroupSpec(scheme="layers"))
