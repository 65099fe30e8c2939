import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sqlab import SqlabError
from sqlab import outliers


def test_iqr_threshold_formula():
    assert outliers.iqr_threshold(-1.0, 2.0, 1.5) == max(abs(-1 - 4.5), abs(2 + 4.5))
    w = torch.arange(101, dtype=torch.float32) - 40  # quartiles -15 and 35
    assert outliers.quartiles(w) == (-15.0, 35.0)
    mask = outliers.outlier_mask(w, 0.2)  # IQR 50: T = max(|-15-10|, |35+10|) = 45
    assert mask.sum() == 16 and mask[-16:].all()


def _matrices(seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (128, 96), (96, 256), (32, 32)]
    mats = {}
    for i, s in enumerate(shapes):
        w = torch.randn(s, generator=gen) * (0.01 * (i + 1))
        w += (
            (torch.rand(s, generator=gen) < 0.01) * torch.randn(s, generator=gen) * 0.2
        )  # heavy tails
        mats[f"m{i}"] = w
    return mats


@pytest.mark.parametrize("target", [0.05, 0.45, 1.0, 3.0])
def test_solving_for_r_meets_the_model_wide_outlier_share(target):
    mats = _matrices()
    r = outliers.OutlierProfile(mats).solve(target)
    total = sum(w.numel() for w in mats.values())
    got = 100 * sum(int(outliers.outlier_mask(w, r).sum()) for w in mats.values()) / total
    assert abs(got - target) <= 0.02


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(SqlabError, match="outlier_pct 60.0 is out of reach"):
        outliers.OutlierProfile(_matrices()).solve(60.0)
    bad = _matrices()
    bad["m1"][0, 0] = float("nan")
    with pytest.raises(SqlabError, match="weights of m1 contain NaN or Inf"):
        outliers.OutlierProfile(bad)


def test_sensitive_values_are_the_top_fisher_entries_outside_the_outliers():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=gen)
    fisher = torch.rand(40, 50, generator=gen)
    threshold = outliers.iqr_threshold(*outliers.quartiles(w), 1.0)
    split = outliers.split(w, fisher, threshold, sensitive_pct=2.0)
    out = w.abs() >= threshold
    sens = split.mask & ~out
    assert split.outliers == int(out.sum()) and split.sensitive == int(sens.sum()) == round(
        0.02 * 2000
    )
    assert torch.equal(split.mask, out | sens)
    assert fisher[sens].min() >= fisher[~out & ~sens].max()
    with pytest.raises(SqlabError, match="needs the Fisher information"):
        outliers.split(w, None, None, 1.0)


def test_profile_counts_match_the_outlier_mask():
    gen = torch.Generator().manual_seed(3)
    weights = {
        "layers.0.a": torch.randn(64, 80, generator=gen),
        "layers.1.b": torch.randn(32, 48, generator=gen) ** 3,
    }
    profile = outliers.OutlierProfile(weights)
    for r in (0.5, 1.5, 3.0):
        counts = {n: int(outliers.outlier_mask(w, r).sum()) for n, w in weights.items()}
        assert {n: profile.exact_count(n, r) for n in weights} == counts
        assert profile.exact_share(r) == pytest.approx(
            100 * sum(counts.values()) / (64 * 80 + 32 * 48)
        )
        table = profile.by_matrix(r).set_index("name")
        assert table.loc["layers.1.b", "outlier_pct"] == pytest.approx(
            100 * counts["layers.1.b"] / (32 * 48)
        )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.integers(1, 3000),
    st.integers(1, 400),
    st.sampled_from([0.0, 0.01, 0.3]),
    st.sampled_from([1, 8, 64]),
    st.integers(0, 10**6),
)
def test_top_entries_are_the_full_topk_outside_the_excluded(n, count, excluded, stride, seed):
    from sqlab.outliers import _top_entries

    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=gen) ** 6  # distinct values, no ties
    exclude = torch.rand(n, generator=gen) < excluded
    count = min(count, n)
    kept = scores.masked_fill(exclude, float("-inf")).topk(count).indices
    expected = set(kept[~exclude[kept]].tolist())
    got = _top_entries(scores, count, exclude, stride)
    assert set(got[~exclude[got]].tolist()) == expected


def test_top_entries_fall_back_when_the_sample_holds_the_largest_scores():
    from sqlab.outliers import _top_entries

    scores = torch.rand(64 * 100) * 0.1
    scores[::64] += 10.0  # every sampled score is far above the rest: a threshold too high
    got = _top_entries(scores, 150, None)
    assert set(got.tolist()) == set(scores.topk(150).indices.tolist())


def test_solve_counts_exactly_only_when_asked(caplog):
    profile = outliers.OutlierProfile(_matrices())

    class Untouchable(dict):
        def __getitem__(self, name):
            raise AssertionError(f"{name} was read again")

    profile.weights = Untouchable(profile.weights)
    r = profile.solve(0.45, exact=False)  # the sample alone
    assert r > 0
    with pytest.raises(AssertionError, match="was read again"):
        profile.solve(0.45)  # the same range, now counted exactly


def test_check_share_warns_only_beyond_the_tolerance(caplog):
    with caplog.at_level("INFO", logger="sqlab.outliers"):
        outliers.check_share(0.46, 0.45, 2.0)
    assert "misses the target" not in caplog.text and "gives 0.4600% outliers" in caplog.text
    caplog.clear()
    outliers.check_share(0.50, 0.45, 2.0)
    assert "outlier share 0.5000% at r=2.0000 misses the target 0.4500%" in caplog.text
