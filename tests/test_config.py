"""QuantConfig validation: impossible settings fail early, naming the key, the value and the fix."""
import pytest

from atom_lab.config import ConfigError, QuantConfig

SMOLLM2 = dict(hidden=576, intermediate=1536, head_dim=64)


def test_outliers_beyond_the_channels_are_refused_with_the_key():
    cfg = QuantConfig.from_dict(dict(w_bits=4, a_bits=4, outliers=4000))
    with pytest.raises(ConfigError, match=r"quant\.outliers=4000.*576"):
        cfg.validate_for_model(**SMOLLM2)


def test_group_larger_than_the_normal_channels_is_refused():
    cfg = QuantConfig.from_dict(dict(w_bits=4, a_bits=4, outliers=128, group_size=512))
    with pytest.raises(ConfigError, match=r"quant\.group_size=512.*at most 448"):
        cfg.validate_for_model(**SMOLLM2)


def test_sweep_keys_are_inert_when_nothing_is_quantized():
    """`-m quant=fp16,atom_w4a4 quant.group_size=...` must not fail its fp16 jobs."""
    QuantConfig.from_dict(dict(outliers=4000, group_size=4096)).validate_for_model(**SMOLLM2)


def test_kv_group_must_divide_head_dim():
    with pytest.raises(ConfigError, match=r"quant\.kv_group_size=24"):
        QuantConfig.from_dict(dict(kv_bits=4, kv_group_size=24)).validate_for_model(**SMOLLM2)


@pytest.mark.parametrize("key,value", [("w_bits", 1), ("a_clip", 1.5), ("weight_method", "awq"),
                                       ("outlier_bits", "int4"), ("reorder_metric", "l2")])
def test_bad_values_name_the_key_and_the_allowed_values(key, value):
    with pytest.raises(ConfigError, match=rf"quant\.{key}=.*(allowed|one of|bits|ratio)"):
        QuantConfig.from_dict({key: value})


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown quant key.*group_sise.*allowed keys"):
        QuantConfig.from_dict(dict(group_sise=64))


@pytest.mark.parametrize("key,value", [("w_bits", "four"), ("a_clip", "x"), ("dynamic", "yes"),
                                       ("group_size", 64.5)])
def test_values_of_the_wrong_type_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=rf"quant\.{key}=.*expected"):
        QuantConfig.from_dict({key: value})


def test_calibration_window_longer_than_the_text_names_calib_seqlen():
    import torch

    from atom_lab.data import calibration_windows

    with pytest.raises(ConfigError, match=r"calib\.seqlen=100.*lower calib\.seqlen"):
        calibration_windows(torch.arange(50)[None], nsamples=2, seqlen=100, seed=0)
