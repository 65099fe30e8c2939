import pytest

from sqlab import GPTQConfig, QuantConfig, RTNConfig, SqlabError, SqueezeLLMConfig, config_for
from sqlab.config import config_from_dict


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"wbits": 2}, "wbits must be 3 or 4 \\(an integer\\), got 2"),
        ({"wbits": True}, "wbits must be 3 or 4"),
        ({"outlier_pct": 100}, r"outlier_pct is a percentage in \[0, 100\), got 100"),
        ({"sensitive_pct": -0.1}, "sensitive_pct is a percentage"),
        ({"outlier_pct": float("nan")}, "outlier_pct is a percentage"),
        ({"outlier_pct": 60, "sensitive_pct": 40}, "must stay below 100"),
        ({"outlier_range": -1}, "outlier_range .* must be a finite number >= 0"),
        ({"outlier_range": 2.0, "outlier_pct": 0.45}, "not both"),
        ({"nsamples": 0}, "nsamples must be an integer >= 1, got 0"),
        ({"seqlen": 1}, "seqlen must be an integer >= 2"),
        ({"weighted": "yes"}, "weighted must be True or False"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(SqlabError, match=message):
        QuantConfig(**kwargs)


def test_round_trip_and_key():
    config = QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.05)
    assert config_from_dict(config.as_dict()) == config
    assert config.sparse and config.uses_outliers
    assert config.key() == QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.05).key()
    assert config.key() != QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.06).key()
    with pytest.raises(SqlabError, match="unknown SqueezeLLMConfig fields"):
        config_from_dict({"bits": 3})
    for other in (RTNConfig(wbits=3, groupsize=64), GPTQConfig(wbits=4, act_order=True)):
        assert (
            config_from_dict(other.as_dict()) == other and other.as_dict()["method"] == other.method
        )


def test_one_config_type_per_method_registered_to_its_handler():
    from sqlab import experiments

    assert QuantConfig is SqueezeLLMConfig and SqueezeLLMConfig.packed and not RTNConfig.packed
    assert {t for t in experiments._HANDLERS} == {SqueezeLLMConfig, RTNConfig, GPTQConfig}
    assert config_for(
        "gptq", 3, groupsize=128, outlier_pct=0.0, kmeans_iters=9, calib="x"
    ) == GPTQConfig(wbits=3, groupsize=128, calib="x")
    with pytest.raises(
        SqlabError, match="outlier_pct: not a setting of rtn; method 'rtn' keeps no sparse part"
    ):
        config_for("rtn", 3, strict=True, outlier_pct=1.0)
    with pytest.raises(SqlabError, match="groupsize: not a setting of squeezellm"):
        config_for("squeezellm", 3, strict=True, groupsize=128)
    assert config_for("rtn", 3, strict=True, nsamples=4) == RTNConfig(
        wbits=3
    )  # shared calibration: not read
    with pytest.raises(SqlabError, match="method must be one of squeezellm, rtn, gptq, got 'awq'"):
        config_for("awq", 3)
    with pytest.raises(SqlabError, match="percdamp must be in"):
        GPTQConfig(percdamp=2.0)
    with pytest.raises(SqlabError, match="groupsize must be a positive integer"):
        RTNConfig(groupsize=0)
    with pytest.raises(SqlabError, match="kmeans must be one of optimal, fast"):
        QuantConfig(kmeans="exact")
    assert QuantConfig(kmeans="fast").label() == "SqueezeLLM 3-bit dense fast k-means"
