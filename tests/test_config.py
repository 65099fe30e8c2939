import pytest

from sqlab import QuantConfig, SqlabError


@pytest.mark.parametrize("kwargs, message", [
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
])
def test_bad_fields_are_named(kwargs, message):
    with pytest.raises(SqlabError, match=message):
        QuantConfig(**kwargs)


def test_round_trip_and_key():
    config = QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.05)
    assert QuantConfig.from_dict(config.as_dict()) == config
    assert config.sparse and config.uses_outliers
    assert config.key() == QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.05).key()
    assert config.key() != QuantConfig(wbits=4, outlier_pct=0.45, sensitive_pct=0.06).key()
    with pytest.raises(SqlabError, match="unknown QuantConfig fields"):
        QuantConfig.from_dict({"bits": 3})
