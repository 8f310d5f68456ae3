"""The transformer ("LLM") schemes in the configuration (issue 19): the QScheme properties
of the new schemes, every validation rule QuantSpec and QuantizationConfig add for them
(each error naming the field), the presets' fields, and dict round trips (JSON included)
of each preset, of the embedding and attention specs, and of a config file written before
those fields existed."""

import json

import pytest

from qatcore.errors import ConfigError
from qatcore.quantization import QScheme, QuantizationConfig, QuantMode, QuantSpec
from qatcore.quantization.config import Learnable, ObserverKind
from qatcore.quantization.qat import LayerOverride, LayerwiseConfig

GROUP = dict(bits=4, signed=True, scheme="per_group_symmetric", observer="minmax", group_size=32)
TOKEN = dict(bits=8, signed=True, scheme="per_token_affine", observer="minmax")
TERNARY = dict(bits=2, signed=True, narrow_range=True, scheme="per_tensor_absmean", observer="minmax")


def spec(base: dict, **changes) -> QuantSpec:
    return QuantSpec(**{**base, **changes})


def presets() -> dict[str, QuantizationConfig]:
    return {
        "8da4w": QuantizationConfig.int8_dynamic_activation_int4_weight(),
        "8da4w_g64": QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=64),
        "4w": QuantizationConfig.int4_weight_only(),
        "4w_g32": QuantizationConfig.int4_weight_only(32),
        "2w": QuantizationConfig.intx_weight_only(2, 32),
        "8w": QuantizationConfig.intx_weight_only(8, 16),
        "ternary": QuantizationConfig.ternary_weight(),
        "ternary_g32": QuantizationConfig.ternary_weight(group_size=32),
        "ternary_weights_only": QuantizationConfig.ternary_weight(activations=False),
    }


# ---------------------------------------------------------------- QScheme

# scheme: (per_channel, symmetric, grouped, per_token, absmean, dynamic)
PROPERTIES = {
    QScheme.PER_TENSOR_AFFINE: (False, False, False, False, False, False),
    QScheme.PER_TENSOR_SYMMETRIC: (False, True, False, False, False, False),
    QScheme.PER_CHANNEL_AFFINE: (True, False, False, False, False, False),
    QScheme.PER_CHANNEL_SYMMETRIC: (True, True, False, False, False, False),
    QScheme.PER_GROUP_AFFINE: (False, False, True, False, False, True),
    QScheme.PER_GROUP_SYMMETRIC: (False, True, True, False, False, True),
    QScheme.PER_TOKEN_AFFINE: (False, False, False, True, False, True),
    QScheme.PER_TOKEN_SYMMETRIC: (False, True, False, True, False, True),
    QScheme.PER_TENSOR_ABSMEAN: (False, True, False, False, True, True),
    QScheme.PER_GROUP_ABSMEAN: (False, True, True, False, True, True),
}


def test_every_scheme_has_its_properties():
    assert set(PROPERTIES) == set(QScheme)
    for scheme, expected in PROPERTIES.items():
        got = (scheme.per_channel, scheme.symmetric, scheme.grouped, scheme.per_token, scheme.absmean,
               scheme.dynamic)
        assert got == expected, scheme
        assert QScheme(scheme.value) is scheme


# ---------------------------------------------------------------- QuantSpec: valid dynamic specs

@pytest.mark.parametrize("base, changes", [
    (GROUP, {}),
    (GROUP, dict(scheme="per_group_affine")),
    (GROUP, dict(bits=2)),
    (GROUP, dict(bits=8, group_size=1)),
    (GROUP, dict(learnable="lsq")),
    (TOKEN, {}),
    (TOKEN, dict(scheme="per_token_symmetric", bits=4)),
    (TERNARY, {}),
    (TERNARY, dict(scheme="per_group_absmean", group_size=64)),
])
def test_valid_dynamic_specs(base, changes):
    s = spec(base, **changes)
    assert s.scheme.dynamic
    assert s.observer is ObserverKind.MINMAX and dict(s.observer_options) == {}
    assert s.group_size == changes.get("group_size", base.get("group_size"))


def test_dynamic_grids():
    assert (spec(GROUP).qmin, spec(GROUP).qmax) == (-8, 7)            # torchao's torch.int4
    assert (spec(GROUP, bits=2).qmin, spec(GROUP, bits=2).qmax) == (-2, 1)
    assert (spec(TOKEN).qmin, spec(TOKEN).qmax) == (-128, 127)        # torch.int8, not narrow
    assert (spec(TERNARY).qmin, spec(TERNARY).qmax) == (-1, 1)        # {-1, 0, 1}


def test_the_default_observer_is_accepted_and_stored_as_minmax():
    # QuantSpec's default observer is moving_average_minmax; a dynamic spec that leaves it
    # unset (or names it) keeps no observer and reads back as "minmax"
    for observer in ({}, dict(observer="moving_average_minmax")):
        base = {k: v for k, v in GROUP.items() if k != "observer"}
        made = QuantSpec(**base, **observer)
        assert made.observer is ObserverKind.MINMAX
        assert made == spec(GROUP)


# ---------------------------------------------------------------- QuantSpec: refusals

@pytest.mark.parametrize("base, changes, message", [
    # group_size: required (a positive int) by the per-group schemes, forbidden elsewhere
    (GROUP, dict(group_size=None), r"QuantSpec\.group_size must be a positive int for per_group_symmetric, "
                                   r"got None"),
    (GROUP, dict(scheme="per_group_affine", group_size=None), r"QuantSpec\.group_size .* per_group_affine"),
    (TERNARY, dict(scheme="per_group_absmean"), r"QuantSpec\.group_size must be a positive int for "
                                                r"per_group_absmean, got None"),
    (GROUP, dict(group_size=0), r"QuantSpec\.group_size must be a positive int .* got 0"),
    (GROUP, dict(group_size=-32), r"QuantSpec\.group_size must be a positive int .* got -32"),
    (GROUP, dict(group_size=32.0), r"QuantSpec\.group_size must be a positive int .* got 32\.0"),
    (GROUP, dict(group_size=True), r"QuantSpec\.group_size must be a positive int .* got True"),
    (GROUP, dict(group_size="32"), r"QuantSpec\.group_size must be a positive int .* got '32'"),
    (TOKEN, dict(group_size=32), r"QuantSpec\.group_size must be None for per_token_affine .* got 32"),
    (TERNARY, dict(group_size=32), r"QuantSpec\.group_size must be None for per_tensor_absmean"),
    (dict(), dict(group_size=32), r"QuantSpec\.group_size must be None for per_tensor_affine"),
    (dict(signed=True, narrow_range=True, scheme="per_channel_symmetric"), dict(group_size=16),
     r"QuantSpec\.group_size must be None for per_channel_symmetric"),
    # the grid of the per-group and per-token schemes: signed, not narrow, 2 to 8 bits
    (GROUP, dict(signed=False), r"QuantSpec: per_group_symmetric uses the signed grid .* signed=True, "
                                r"narrow_range=False, got bits=4, signed=False, narrow_range=False"),
    (GROUP, dict(narrow_range=True), r"QuantSpec: per_group_symmetric .* got bits=4, signed=True, "
                                     r"narrow_range=True"),
    (GROUP, dict(bits=9), r"QuantSpec: per_group_symmetric .* bits from 2 to 8, .* got bits=9"),
    (TOKEN, dict(bits=16), r"QuantSpec: per_token_affine .* got bits=16"),
    (TOKEN, dict(signed=False), r"QuantSpec: per_token_affine .* got bits=8, signed=False"),
    (TOKEN, dict(scheme="per_token_symmetric", narrow_range=True), r"QuantSpec: per_token_symmetric .* "
                                                                   r"narrow_range=True"),
    # absmean is the ternary grid only
    (TERNARY, dict(bits=4), r"QuantSpec: per_tensor_absmean is the ternary grid \{-1, 0, 1\}: it needs "
                            r"bits=2, signed=True, narrow_range=True, got bits=4"),
    (TERNARY, dict(narrow_range=False), r"QuantSpec: per_tensor_absmean is the ternary grid .* "
                                        r"narrow_range=False"),
    (TERNARY, dict(scheme="per_group_absmean", group_size=8, bits=8), r"QuantSpec: per_group_absmean is the "
                                                                      r"ternary grid .* got bits=8"),
    # no observer: only minmax (or the default) is accepted, without options
    (GROUP, dict(observer="histogram"), r"QuantSpec\.observer: per_group_symmetric computes its scale from "
                                        r"each call's values and uses no observer; leave observer at 'minmax' "
                                        r"\(got 'histogram'\)"),
    (TOKEN, dict(observer="mse"), r"QuantSpec\.observer: per_token_affine .* \(got 'mse'\)"),
    (TERNARY, dict(observer="histogram"), r"QuantSpec\.observer: per_tensor_absmean .* \(got 'histogram'\)"),
    (TOKEN, dict(observer="moving_average_minmax", observer_options={"averaging_constant": 0.5}),
     r"QuantSpec\.observer: per_token_affine .* \(got 'moving_average_minmax' with options\)"),
    # learned scales: lsq on per_group_symmetric only
    (TOKEN, dict(scheme="per_token_symmetric", learnable="lsq"),
     r"QuantSpec\.learnable 'lsq': of the dynamic schemes only per_group_symmetric learns its scales \(lsq\); "
     r"per_token_symmetric computes them from each call's values"),
    (TOKEN, dict(learnable="lsq+"), r"QuantSpec\.learnable 'lsq\+': .* only per_group_symmetric .* "
                                    r"per_token_affine"),
    (GROUP, dict(scheme="per_group_affine", learnable="lsq+"), r"QuantSpec\.learnable 'lsq\+': .* "
                                                               r"per_group_affine computes them"),
    (TERNARY, dict(learnable="lsq"), r"QuantSpec\.learnable 'lsq': .* per_tensor_absmean computes them"),
    (TERNARY, dict(scheme="per_group_absmean", group_size=32, learnable="lsq"),
     r"QuantSpec\.learnable 'lsq': .* per_group_absmean"),
    # lsq on an affine scheme is refused by the general rule, which also names the field
    (GROUP, dict(scheme="per_group_affine", learnable="lsq"), r"QuantSpec\.learnable 'lsq' learns the scale "
                                                              r"with the zero point held at 0.*per_group_affine"),
    (GROUP, dict(learnable="lsq+"), r"QuantSpec\.learnable 'lsq\+' learns a zero point; it needs an affine "
                                    r"scheme, not per_group_symmetric"),
])
def test_spec_refusals_name_the_field(base, changes, message):
    with pytest.raises(ConfigError, match=message):
        spec(base, **changes)


def test_group_size_is_part_of_equality_and_hash():
    a, b = spec(GROUP), spec(GROUP, group_size=64)
    assert a != b and hash(a) != hash(b)
    assert spec(GROUP) == a and hash(spec(GROUP)) == hash(a)
    assert a.replace(group_size=64) == b


def test_replace_revalidates_the_dynamic_rules():
    with pytest.raises(ConfigError, match=r"QuantSpec\.group_size must be None for per_token_affine"):
        spec(TOKEN).replace(group_size=8)
    with pytest.raises(ConfigError, match=r"QuantSpec\.group_size must be a positive int for per_group_symmetric"):
        QuantSpec(bits=4, signed=True, observer="minmax").replace(scheme="per_group_symmetric")


def test_a_spec_dict_with_a_bad_group_size_names_where_it_was():
    data = spec(GROUP).to_dict()
    data["group_size"] = 0
    with pytest.raises(ConfigError, match=r"^QuantizationConfig\.weight: QuantSpec\.group_size must be a "
                                          r"positive int"):
        QuantizationConfig(weight=data)
    with pytest.raises(ConfigError, match=r"^QuantizationConfig\.embedding: QuantSpec\.group_size"):
        QuantizationConfig(embedding=data)


# ---------------------------------------------------------------- QuantizationConfig: which scheme where

@pytest.mark.parametrize("kwargs, message", [
    (dict(weight=spec(TOKEN)), r"QuantizationConfig\.weight: per_token_affine is for activations \(one scale "
                               r"per token\); weights use per_group, per_channel, per_tensor or absmean schemes"),
    (dict(weight=spec(TOKEN, scheme="per_token_symmetric")), r"QuantizationConfig\.weight: per_token_symmetric"),
    (dict(activation=spec(GROUP)), r"QuantizationConfig\.activation: per_group_symmetric is for weights; "
                                   r"dynamic activations are per_token_affine or per_token_symmetric"),
    (dict(activation=spec(GROUP, scheme="per_group_affine")), r"QuantizationConfig\.activation: per_group_affine"),
    (dict(activation=spec(TERNARY)), r"QuantizationConfig\.activation: per_tensor_absmean is for weights"),
    (dict(embedding=spec(TOKEN)), r"QuantizationConfig\.embedding must be a per_group or absmean spec \(groups "
                                  r"along the embedding dimension\), got per_token_affine"),
    (dict(embedding=QuantizationConfig().weight), r"QuantizationConfig\.embedding must be a per_group or absmean "
                                                  r"spec .* got per_channel_symmetric"),
    (dict(embedding=QuantizationConfig().activation), r"QuantizationConfig\.embedding .* got per_tensor_affine"),
    (dict(attention=spec(GROUP)), r"QuantizationConfig\.attention quantizes q, k, v and the softmax "
                                  r"probabilities: a per_token or per_tensor spec, got per_group_symmetric"),
    (dict(attention=spec(TERNARY)), r"QuantizationConfig\.attention .* got per_tensor_absmean"),
    (dict(attention=QuantizationConfig().weight), r"QuantizationConfig\.attention .* got per_channel_symmetric"),
    (dict(embedding=4), r"QuantizationConfig\.embedding must be None or a QuantSpec, got int"),
    (dict(attention="per_token_affine"), r"QuantizationConfig\.attention must be None or a QuantSpec, got str"),
    (dict(attention={"bogus": 1}), r"QuantizationConfig\.attention: unknown fields \['bogus'\]"),
])
def test_config_refusals_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantizationConfig(**kwargs)


def test_embedding_and_attention_accept_what_they_quantize():
    config = QuantizationConfig.int8_dynamic_activation_int4_weight()
    for embedding in (spec(GROUP), spec(GROUP, scheme="per_group_affine"), spec(TERNARY),
                      spec(TERNARY, scheme="per_group_absmean", group_size=16)):
        assert config.replace(embedding=embedding).embedding == embedding
    for attention in (spec(TOKEN), spec(TOKEN, scheme="per_token_symmetric"), QuantizationConfig().activation,
                      QuantSpec(bits=8, signed=True, scheme="per_tensor_symmetric")):
        assert config.replace(attention=attention).attention == attention
    # a mapping is read as a QuantSpec
    made = QuantizationConfig(embedding=spec(GROUP).to_dict(), attention=spec(TOKEN).to_dict())
    assert (made.embedding, made.attention) == (spec(GROUP), spec(TOKEN))


def test_dynamic_activations_needs_a_dynamic_spec_and_the_activations_mode():
    assert QuantizationConfig.int8_dynamic_activation_int4_weight().dynamic_activations
    assert QuantizationConfig.ternary_weight().dynamic_activations
    assert not QuantizationConfig.ternary_weight(activations=False).dynamic_activations
    assert not QuantizationConfig.int4_weight_only().dynamic_activations
    assert not QuantizationConfig().dynamic_activations
    weights_only = QuantizationConfig.int8_dynamic_activation_int4_weight().replace(mode="weights_only")
    assert not weights_only.dynamic_activations          # the spec is per token, but activations are off
    assert QuantizationConfig(activation=spec(TOKEN)).dynamic_activations  # any weights, per-token activations


# ---------------------------------------------------------------- presets

def test_8da4w_is_torchaos_int8_dynamic_activation_int4_weight():
    config = QuantizationConfig.int8_dynamic_activation_int4_weight()
    w, a = config.weight, config.activation
    assert (w.bits, w.signed, w.narrow_range, w.scheme, w.group_size) == (4, True, False,
                                                                           QScheme.PER_GROUP_SYMMETRIC, 32)
    assert (w.qmin, w.qmax, w.learnable, w.observer, w.axis) == (-8, 7, Learnable.FIXED, ObserverKind.MINMAX, None)
    assert (a.bits, a.signed, a.narrow_range, a.scheme, a.group_size) == (8, True, False, QScheme.PER_TOKEN_AFFINE,
                                                                           None)
    assert (a.qmin, a.qmax) == (-128, 127)
    assert config.mode is QuantMode.WEIGHTS_AND_ACTIVATIONS and config.dynamic_activations
    assert (config.embedding, config.attention) == (None, None)
    assert QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=128).weight.group_size == 128


def test_weight_only_presets():
    four = QuantizationConfig.int4_weight_only()
    assert four.weight == spec(GROUP, group_size=128) and four.mode is QuantMode.WEIGHTS_ONLY
    assert QuantizationConfig.int4_weight_only(32).weight == spec(GROUP)
    assert four == QuantizationConfig.intx_weight_only(4, 128)
    two = QuantizationConfig.intx_weight_only(2, 32)
    assert (two.weight.bits, two.weight.qmin, two.weight.qmax, two.weight.group_size) == (2, -2, 1, 32)
    assert two.weight.scheme is QScheme.PER_GROUP_SYMMETRIC and two.mode is QuantMode.WEIGHTS_ONLY
    for config in (four, two):
        assert not config.dynamic_activations and (config.embedding, config.attention) == (None, None)


def test_ternary_presets():
    per_tensor = QuantizationConfig.ternary_weight()
    assert per_tensor.weight == spec(TERNARY)
    assert (per_tensor.weight.qmin, per_tensor.weight.qmax, per_tensor.weight.group_size) == (-1, 1, None)
    # BitNet's activations: int8 absmax per token (symmetric), at each layer's input
    assert per_tensor.activation == spec(TOKEN, scheme="per_token_symmetric")
    assert per_tensor.mode is QuantMode.WEIGHTS_AND_ACTIVATIONS
    grouped = QuantizationConfig.ternary_weight(group_size=32)
    assert grouped.weight == spec(TERNARY, scheme="per_group_absmean", group_size=32)
    assert grouped.activation == per_tensor.activation
    weights_only = QuantizationConfig.ternary_weight(activations=False)
    assert weights_only.weight == spec(TERNARY) and weights_only.mode is QuantMode.WEIGHTS_ONLY


@pytest.mark.parametrize("make, message", [
    (lambda: QuantizationConfig.int8_dynamic_activation_int4_weight(group_size=0),
     r"QuantSpec\.group_size must be a positive int for per_group_symmetric, got 0"),
    (lambda: QuantizationConfig.int4_weight_only(group_size=None), r"QuantSpec\.group_size .* got None"),
    (lambda: QuantizationConfig.intx_weight_only(9, 32), r"QuantSpec: per_group_symmetric .* got bits=9"),
    (lambda: QuantizationConfig.intx_weight_only(1, 32), r"QuantSpec\.bits must be an int in \[2, 16\], got 1"),
    (lambda: QuantizationConfig.ternary_weight(group_size=0), r"QuantSpec\.group_size .* per_group_absmean, "
                                                              r"got 0"),
])
def test_preset_arguments_are_validated(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


# ---------------------------------------------------------------- dict round trips

@pytest.mark.parametrize("name", sorted(presets()))
def test_each_preset_round_trips_through_a_dict_and_json(name):
    config = presets()[name]
    data = config.to_dict()
    assert "embedding" not in data and "attention" not in data  # written only when set
    assert data["weight"]["group_size"] == config.weight.group_size
    assert QuantizationConfig.from_dict(data) == config
    assert QuantizationConfig.from_dict(json.loads(json.dumps(data))) == config
    assert hash(QuantizationConfig.from_dict(data)) == hash(config)


def test_embedding_and_attention_specs_round_trip():
    base = QuantizationConfig.int8_dynamic_activation_int4_weight()
    config = base.replace(embedding=spec(TERNARY, scheme="per_group_absmean", group_size=16),
                          attention=spec(TOKEN, scheme="per_token_symmetric"))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["embedding"]["scheme"] == "per_group_absmean" and data["embedding"]["group_size"] == 16
    assert data["attention"]["scheme"] == "per_token_symmetric"
    assert QuantizationConfig.from_dict(data) == config
    only_attention = base.replace(attention=QuantizationConfig().activation)
    assert "embedding" not in only_attention.to_dict()
    assert QuantizationConfig.from_dict(only_attention.to_dict()) == only_attention


def test_a_config_written_before_the_llm_schemes_still_loads():
    # what an older qatcore wrote: no group_size in the specs, no embedding or attention
    older = {
        "weight": {"bits": 8, "signed": True, "narrow_range": True, "scheme": "per_channel_symmetric", "axis": 0,
                   "observer": "minmax", "observer_options": {}, "learnable": "fixed", "grad_factor": None,
                   "ignore_nan": False},
        "activation": {"bits": 8, "signed": False, "narrow_range": False, "scheme": "per_tensor_affine",
                       "axis": None, "observer": "moving_average_minmax",
                       "observer_options": {"averaging_constant": 0.01}, "learnable": "fixed", "grad_factor": None,
                       "ignore_nan": False},
        "mode": "weights_and_activations",
        "requantization": "fixed_point",
    }
    config = QuantizationConfig.from_dict(older)
    assert config == QuantizationConfig()
    assert (config.weight.group_size, config.activation.group_size, config.embedding, config.attention) == (
        None, None, None, None)
    # and the default config writes exactly what the older one wrote, plus the group sizes
    written = QuantizationConfig().to_dict()
    assert written["weight"].pop("group_size") is None and written["activation"].pop("group_size") is None
    assert written == older


def test_unknown_config_fields_are_listed_with_the_known_ones():
    data = {**QuantizationConfig().to_dict(), "embeddings": None}
    with pytest.raises(ConfigError, match=r"QuantizationConfig: unknown fields \['embeddings'\]; fields are weight, "
                                          r"activation, mode, requantization, embedding, attention"):
        QuantizationConfig.from_dict(data)


def test_a_layerwise_config_with_llm_schemes_round_trips():
    base = QuantizationConfig.int8_dynamic_activation_int4_weight()
    config = LayerwiseConfig(
        global_config=base.replace(embedding=spec(GROUP), attention=spec(TOKEN)),
        overrides={"head": QuantizationConfig.int4_weight_only(32), "blocks.*.fc_2": LayerOverride(enabled=False),
                   "tok": LayerOverride(config=base.replace(embedding=spec(TERNARY)))},
    )
    restored = LayerwiseConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored.global_config == config.global_config
    assert restored.to_dict() == config.to_dict()
    assert restored.overrides["tok"].config.embedding == spec(TERNARY)
