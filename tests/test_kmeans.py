import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sqlab import kmeans
from sqlab.kmeans import assign, weighted_kmeans


def lloyd_per_row(x: np.ndarray, f: np.ndarray, k: int, iters: int = 200) -> float:
    """Reference: a plain per-row weighted Lloyd loop from the round-to-nearest grid."""
    f = f if f.sum() > 0 else np.ones_like(f)
    c = x.min() + (x.max() - x.min()) * (np.arange(k) + 0.5) / k
    for _ in range(iters):
        labels = np.abs(x[:, None] - c[None, :]).argmin(1)
        new = c.copy()
        for j in range(k):
            member = labels == j
            if f[member].sum() > 0:
                new[j] = (f[member] * x[member]).sum() / f[member].sum()
        if np.array_equal(new, c):
            break
        c = new
    labels = np.abs(x[:, None] - c[None, :]).argmin(1)
    return float((f * (x - c[labels]) ** 2).sum())


def optimum(x: np.ndarray, f: np.ndarray, k: int) -> float:
    """Exact weighted 1-D k-means by dynamic programming over sorted prefixes (small n only)."""
    f = f if f.sum() > 0 else np.ones_like(f)
    order = np.argsort(x)
    x, f = x[order], f[order]
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (f, f * x, f * x * x))

    def cost(i, j):
        s0 = p0[j] - p0[i]
        return 0.0 if s0 <= 0 else max(p2[j] - p2[i] - (p1[j] - p1[i]) ** 2 / s0, 0.0)

    n = len(x)
    best = [0.0] + [np.inf] * n
    for _ in range(k):
        best = [0.0] + [min(best[i] + cost(i, j) for i in range(j)) for j in range(1, n + 1)]
    return best[n]


rows_strategy = st.tuples(
    st.integers(2, 24),
    st.sampled_from([8, 16]),
    st.integers(0, 10**6),
    st.sampled_from([1.0, 6.0]),
    st.booleans(),
    st.booleans(),
)


def _row(n, seed, power, outlier, zeros):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 0.02
    if outlier:
        x[rng.integers(0, n)] *= 12
    f = rng.random(n) ** power
    if zeros:
        f[rng.random(n) < 0.3] = 0.0
    return x, f


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(rows_strategy)
def test_never_worse_than_per_row_lloyd_and_never_below_the_optimum(case):
    n, k, seed, power, outlier, zeros = case
    x, f = _row(n, seed, power, outlier, zeros)
    ours = weighted_kmeans(torch.tensor(x[None]), torch.tensor(f[None]), k, restarts=2).sse.item()
    scale = float(((f if f.sum() > 0 else np.ones(n)) * x * x).sum()) + 1e-30
    assert ours <= lloyd_per_row(x, f, k) * (1 + 1e-7) + 1e-12 * scale
    assert ours >= optimum(x, f, k) * (1 - 1e-7) - 1e-12 * scale


def test_close_to_the_optimum_on_average():
    ratios = []
    for seed in range(60):
        x, f = _row(20, seed, 6.0, seed % 3 == 0, seed % 4 == 0)
        ours = weighted_kmeans(torch.tensor(x[None]), torch.tensor(f[None]), 8).sse.item()
        scale = float((f * x * x).sum())
        ratios.append((ours + 1e-9 * scale) / (optimum(x, f, 8) + 1e-9 * scale))
    assert np.mean(ratios) < 1.15


def test_total_sse_not_worse_than_scikit_learn_per_row():
    from sklearn.cluster import KMeans

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 256, generator=gen, dtype=torch.float64) * 0.02
    f = torch.rand(40, 256, generator=gen, dtype=torch.float64) ** 6
    ours = weighted_kmeans(x, f, 8).sse.sum().item()
    ref = 0.0
    for row, weight in zip(x.numpy(), f.numpy()):
        km = KMeans(n_clusters=8, n_init="auto", max_iter=50, random_state=0).fit(
            row[:, None], sample_weight=weight
        )
        ref += float((weight * (row - km.cluster_centers_[km.labels_, 0]) ** 2).sum())
    assert ours <= ref


def test_outputs_shapes_order_and_consistency():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 100, generator=gen)
    f = torch.rand(33, 100, generator=gen)
    res = weighted_kmeans(x, f, 16)
    assert (
        res.centroids.shape == (33, 16)
        and res.labels.shape == (33, 100)
        and res.labels.dtype == torch.uint8
    )
    assert (res.centroids[:, 1:] >= res.centroids[:, :-1]).all()
    assert torch.equal(res.labels, assign(x, res.centroids))
    direct = (
        f.double() * (x.double() - res.centroids.double().gather(1, res.labels.long())) ** 2
    ).sum(1)
    assert torch.allclose(res.sse, direct, rtol=1e-5)


def test_rows_are_independent_and_deterministic():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(12, 64, generator=gen)
    f = torch.rand(12, 64, generator=gen) ** 4
    together = weighted_kmeans(x, f, 8, restarts=2)
    again = weighted_kmeans(x, f, 8, restarts=2)
    assert torch.equal(together.centroids, again.centroids)
    for i in (0, 5, 11):
        alone = weighted_kmeans(x[i : i + 1], f[i : i + 1], 8, restarts=2)
        assert torch.equal(alone.centroids[0], together.centroids[i])


def test_all_zero_weights_mean_uniform_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 50, generator=gen)
    f = torch.rand(3, 50, generator=gen)
    f[1] = 0
    res = weighted_kmeans(x, f, 8)
    plain = weighted_kmeans(x[1:2], None, 8)
    assert torch.equal(res.centroids[1], plain.centroids[0])
    assert torch.isfinite(res.centroids).all()


def test_weighting_pulls_centroids_towards_heavy_points():
    x = torch.tensor([[0.0, 0.1, 0.2, 1.0, 1.1, 1.2, 5.0, 5.05]])
    f = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1000.0, 1.0]])
    res = weighted_kmeans(x, f, 2)
    assert abs(res.centroids[0, 1].item() - 5.0) < 1e-3  # the heavy point owns its centroid


def test_bad_arguments():
    with pytest.raises(ValueError, match="k must be in"):
        weighted_kmeans(torch.zeros(2, 4), None, 1)
    with pytest.raises(ValueError, match="differs from x shape"):
        weighted_kmeans(torch.zeros(2, 4), torch.zeros(2, 5), 8)


def optimum_fast(x: np.ndarray, f: np.ndarray, k: int) -> float:
    """The same exact optimum as ``optimum``, with numpy over all split points
    (n up to a few hundred).
    """
    order = np.argsort(x)
    x, f = x[order], f[order]
    p0, p1, p2 = (np.concatenate([[0.0], np.cumsum(v)]) for v in (f, f * x, f * x * x))
    s0 = p0[None, :] - p0[:, None]
    s1 = p1[None, :] - p1[:, None]
    cost = np.maximum(p2[None, :] - p2[:, None] - s1 * s1 / np.maximum(s0, 1e-300), 0.0)
    cost[np.tril_indices(len(p0))] = np.inf  # cost[i, j]: points i..j-1, i < j
    best = np.full(len(p0), np.inf)
    best[0] = 0.0
    for _ in range(k):
        best = np.minimum(best, (best[:, None] + cost).min(0))
    return float(best[-1])


@pytest.mark.parametrize("k", [8, 16])
def test_long_rows_go_through_the_coarse_copy_and_stay_near_the_optimum(k):
    # rows longer than 2 * max(BINS, 4k) are seeded and searched on groups, then finished on points
    gen = torch.Generator().manual_seed(4)
    n = 400
    assert n > 2 * max(kmeans.BINS, 4 * k)
    x = torch.randn(12, n, generator=gen) * 0.02
    x[:, :3] *= 8  # a few outliers in every row
    f = torch.randn(12, n, generator=gen) ** 2  # squared gradients: a heavy tail
    res = weighted_kmeans(x, f, k, restarts=2)
    direct = (
        f.double() * (x.double() - res.centroids.double().gather(1, res.labels.long())) ** 2
    ).sum(1)
    assert torch.allclose(res.sse, direct, rtol=1e-6)
    opt = np.array(
        [optimum_fast(x[i].double().numpy(), f[i].double().numpy(), k) for i in range(12)]
    )
    ratio = res.sse.numpy() / opt
    assert (ratio >= 1 - 1e-9).all()
    assert ratio.mean() < 1.08, ratio


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 40), st.integers(0, 10**6))
def test_row_sort_carries_the_weights_along(rows, n, seed):
    rng = np.random.default_rng(seed)
    pool = np.array([0.0, -0.0, 1e-40, -1e-40, 1.5, -1.5, 3e38, -3e38, 0.25], np.float32)
    x = np.where(
        rng.random((rows, n)) < 0.3,
        rng.choice(pool, (rows, n)),
        rng.standard_normal((rows, n)).astype(np.float32),
    )
    f = rng.random((rows, n)).astype(np.float32)
    xs, fs = kmeans._sort_rows(torch.from_numpy(x), torch.from_numpy(f))
    assert torch.equal(xs, torch.from_numpy(x).sort(1).values)
    for i in range(rows):
        assert sorted(zip(x[i].tolist(), f[i].tolist())) == sorted(
            zip(xs[i].tolist(), fs[i].tolist())
        )


def test_double_precision_input_is_clustered_in_double():
    gen = torch.Generator().manual_seed(5)
    x = (
        1.0 + torch.randn(4, 300, generator=gen, dtype=torch.float64) * 1e-9
    )  # distinct only in fp64
    res = weighted_kmeans(x, None, 8)
    assert res.centroids.dtype == torch.float64
    assert len(torch.unique(res.centroids[0])) == 8
    assert torch.allclose(
        res.sse, ((x - res.centroids.gather(1, res.labels.long())) ** 2).sum(1), rtol=1e-6
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_and_weights_are_refused(bad):
    x = torch.randn(3, 300)
    x[1, 7] = bad
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        weighted_kmeans(x, None, 8)
    if bad != -float("inf"):  # a negative weight counts as zero
        f = torch.rand(3, 300)
        f[2, 9] = bad
        with pytest.raises(ValueError, match="weight contains NaN or Inf"):
            weighted_kmeans(torch.randn(3, 300), f, 8)


# --- the exact dynamic program ------------------------------------------------------------------


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(rows_strategy)
def test_optimal_kmeans_is_the_optimum(case):
    n, k, seed, power, outlier, zeros = case
    x, f = _row(n, seed, power, outlier, zeros)
    x = x.astype(np.float32).astype(np.float64)  # the program clusters float32 values
    result = kmeans.optimal_kmeans(torch.tensor(x[None]).float(), torch.tensor(f[None]).float(), k)
    f32 = f.astype(np.float32).astype(np.float64)
    scale = float(((f32 if f32.sum() > 0 else np.ones(n)) * x * x).sum()) + 1e-30
    assert abs(result.sse.item() - optimum(x, f32, k)) <= 1e-9 * scale
    c = result.centroids[0].double()
    assert bool((c[1:] >= c[:-1]).all())
    # the centroids, with every value at its nearest one, give that SSE
    # (the optimum is Lloyd-stable)
    weights = torch.tensor(f32) if f32.sum() > 0 else torch.ones(n, dtype=torch.float64)
    labels = assign(torch.tensor(x[None]), result.centroids.double())[0].long()
    assert (
        abs(float((weights * (torch.tensor(x) - c[labels]) ** 2).sum()) - result.sse.item())
        <= 1e-9 * scale
    )


def test_optimal_kmeans_beats_the_heuristic_on_every_row():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 300, generator=gen) * 0.02
    f = torch.rand(64, 300, generator=gen) ** 6
    exact = kmeans.optimal_kmeans(x, f, 8)
    fast = weighted_kmeans(x, f, 8)
    assert bool((exact.sse <= fast.sse * (1 + 1e-9)).all()) and exact.sse.sum() < fast.sse.sum()
    again = kmeans.optimal_kmeans(x, f, 8)
    assert torch.equal(again.centroids, exact.centroids) and torch.equal(again.sse, exact.sse)
    for threads in (1, 3):  # rows are independent: any thread count, the same result
        other = kmeans.optimal_kmeans(x, f, 8, threads=threads)
        assert torch.equal(other.centroids, exact.centroids) and torch.equal(other.sse, exact.sse)
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        kmeans.optimal_kmeans(x, f, 8, threads=0)


@pytest.mark.parametrize("n", [300, 5000])
def test_optimal_kmeans_on_widened_bfloat16_rows(n):
    # the weights of a bfloat16 model: many equal values, zero low bits, -0 beside +0; runs of
    # zero weight between and after the weighted ones; 5000 takes the 11-bit sorting passes
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(3, n, generator=gen) * 0.02).to(torch.bfloat16).float()
    x[:, :4] = torch.tensor([0.0, -0.0, 0.0, -0.0])
    f = torch.rand(3, n, generator=gen) ** 4
    f[0, x[0] > 0.01] = 0.0  # the largest values carry no weight
    f[1, (x[1] > -0.005) & (x[1] < 0.005)] = 0.0  # nor those in the middle
    result = kmeans.optimal_kmeans(x, f, 8)
    for r in range(3):
        xr, fr = x[r].double().numpy(), f[r].double().numpy()
        scale = float((fr * xr * xr).sum()) + 1e-30
        expected = optimum_fast(xr, fr, 8) if n <= 300 else None
        if expected is not None:
            assert abs(result.sse[r].item() - expected) <= 1e-9 * scale
        c = result.centroids[r].double()
        assert bool((c[1:] >= c[:-1]).all())
        labels = assign(x[r : r + 1].double(), c[None])[0].long()
        direct = float((f[r].double() * (x[r].double() - c[labels]) ** 2).sum())
        assert abs(direct - result.sse[r].item()) <= 1e-9 * scale
    # the same values in another order cluster the same way
    perm = torch.randperm(n, generator=gen)
    again = kmeans.optimal_kmeans(x[:, perm], f[:, perm], 8)
    assert torch.allclose(again.sse, result.sse, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_optimal_kmeans_refuses_weights_that_are_not_finite(bad):
    f = torch.rand(4, 50)
    f[2, 7] = bad
    with pytest.raises(ValueError, match="finite"):
        kmeans.optimal_kmeans(torch.randn(4, 50), f, 4)


def test_optimal_kmeans_edge_cases():
    few = torch.tensor([[0.5, 0.5, -1.0, 2.0]])
    result = kmeans.optimal_kmeans(few, torch.ones(1, 4), 8)  # 3 distinct values for 8 centroids
    assert result.sse.item() == 0.0 and result.centroids[0].tolist() == [
        -1.0,
        0.5,
        2.0,
        2.0,
        2.0,
        2.0,
        2.0,
        2.0,
    ]
    # values without weight count nowhere: five weighted values for eight centroids
    sparse = kmeans.optimal_kmeans(
        torch.arange(1, 11).float()[None] / 10, torch.tensor([[1.0, 0.0] * 5]), 8
    )
    assert sparse.sse.item() == 0.0
    assert sparse.centroids[0].tolist() == pytest.approx([0.1, 0.3, 0.5, 0.7] + [0.9] * 4)
    zeros = kmeans.optimal_kmeans(
        torch.randn(2, 50), torch.zeros(2, 50), 4
    )  # all-zero weights: uniform
    uniform = kmeans.optimal_kmeans(torch.randn(2, 50), None, 4)
    assert zeros.centroids.shape == uniform.centroids.shape == (2, 4)
    x = torch.randn(3, 40)
    assert torch.allclose(
        kmeans.optimal_kmeans(x, torch.zeros(3, 40), 4).sse, kmeans.optimal_kmeans(x, None, 4).sse
    )
    with pytest.raises(ValueError, match="finite"):
        kmeans.optimal_kmeans(torch.tensor([[float("nan"), 1.0]]), None, 2)
    with pytest.raises(ValueError, match="k must be in"):
        kmeans.optimal_kmeans(torch.zeros(1, 4), None, 1)


def test_cluster_follows_the_config_and_says_what_optimal_needs(monkeypatch):
    from sqlab import QuantConfig, SqlabError, cpu_kernels

    x, f = torch.randn(16, 64) * 0.02, torch.rand(16, 64)
    assert torch.equal(
        kmeans.cluster(x, f, QuantConfig(wbits=3)).centroids,
        kmeans.optimal_kmeans(x, f, 8).centroids,
    )
    fast = kmeans.cluster(x, f, QuantConfig(wbits=4, kmeans="fast", kmeans_restarts=1))
    assert torch.equal(fast.centroids, weighted_kmeans(x, f, 16, restarts=1).centroids)
    with pytest.raises(SqlabError, match="kmeans must be one of optimal, fast, got 'exact'"):
        QuantConfig(kmeans="exact")
    monkeypatch.setattr(cpu_kernels, "compiler", lambda: None)
    cpu_kernels.library.cache_clear()
    try:
        with pytest.raises(
            SqlabError, match=r"kmeans='optimal' runs a compiled dynamic program: no C\+\+ compiler"
        ):
            kmeans.cluster(x, f, QuantConfig(wbits=3))
    finally:
        cpu_kernels.library.cache_clear()


@pytest.mark.slow
def test_kmeans_benchmark_compares_every_method(tmp_path):
    """benchmarks/kmeans.py on a few rows
    (its Fisher is the fast preset's, which the notebooks share).
    """
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "kmeans.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kmeans.py"
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "--rows",
            "4",
            "--wbits",
            "3",
            "--layer",
            "1",
            "--nsamples",
            "2",
            "--seqlen",
            "128",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"optimal", "fast-2", "fast-1", "scikit-learn", "flash1dkmeans"}
    assert rows["optimal"]["sse_above_optimum_pct"] == 0.0
    assert all(r["sse_above_optimum_pct"] >= -1e-6 and r["us_per_row"] > 0 for r in rows.values())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    k=st.sampled_from([2, 5, 8, 16]),
    rows=st.integers(1, 6),
    n=st.integers(0, 70),
    seed=st.integers(0, 2**16),
)
def test_compiled_assign_equals_the_comparison_passes(monkeypatch, k, rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    centroids = torch.sort(torch.randn(rows, k, generator=gen), 1).values
    centroids[:, 1] = centroids[:, 0]  # a repeated centroid (a row with few distinct values)
    x = torch.randn(rows, n, generator=gen)
    tied = min(n, k - 1)
    x[:, :tied] = ((centroids[:, 1:] + centroids[:, :-1]) / 2)[:, :tied]  # exactly on midpoints
    assert kmeans._compiled_assign_fits(x, centroids)
    compiled = assign(x, centroids)
    with monkeypatch.context() as patch:
        patch.setenv("SQLAB_CPU_KERNEL", "0")
        assert not kmeans._compiled_assign_fits(x, centroids)
        assert torch.equal(compiled, assign(x, centroids))
    distance = (x[:, tied:, None] - centroids[:, None, :]).abs()  # (rows, n - tied, k)
    chosen = distance.gather(2, compiled[:, tied:, None].long())[..., 0]
    assert torch.equal(chosen, distance.amin(2))  # a nearest centroid
