import json

import pytest
import torch

from bwssl_core.config import ConfigError
from bwssl_core.probe import linear_probe, pool_tokens, retrieval


def test_retrieval_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])  # cosine order from (1, 0): 0, 1, 2, 3
    labels = torch.tensor([5, 6, 7, 6])
    queries = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # from (0, 1): 2, 1, 0/3
    r = retrieval(gallery, labels, queries, torch.tensor([6, 7]), ks=(1, 2, 3))
    # query 0 (label 6) first hits at rank 2; query 1 (label 7) at rank 1
    assert r == {"R@1": 0.5, "R@2": 1.0, "R@3": 1.0}
    with pytest.raises(ValueError, match="gallery of 4 clips is smaller than R@50"):
        retrieval(gallery, labels, queries, torch.tensor([6, 7]))
    long = torch.tensor([[10.0, 0.0], [0.8, 0.6], [0.0, 3.0]])  # by dot product (0.6, 0.8) is nearest to the first
    assert retrieval(long, torch.tensor([0, 1, 2]), torch.tensor([[0.6, 0.8]]), torch.tensor([1]), ks=(1,)) == \
        {"R@1": 1.0}  # by angle, to the second
    with pytest.raises(ConfigError, match="validation 2 vs 1"):  # not broadcast into a number
        retrieval(gallery, labels, queries, torch.tensor([6]), ks=(1,))
    with pytest.raises(ConfigError, match="train 4 vs 3"):
        retrieval(gallery, labels[:3], queries, torch.tensor([6, 7]), ks=(1,))
    with pytest.raises(ConfigError, match=r"different widths: gallery \(train\) \(4, 2\), queries \(validation\) \(2, 3\)"):
        retrieval(gallery, labels, torch.ones(2, 3), torch.tensor([6, 7]), ks=(1,))


def test_probe_layers_retrieves_each_family_as_alone():
    """probe_layers finds the neighbours once per layer: each family's R@k is what retrieval() gives it alone."""
    from bwssl_core.evaluate import probe_layers

    g = torch.Generator().manual_seed(0)
    feats = {"train": {"mean": torch.randn(2, 60, 5, generator=g)}, "val": {"mean": torch.randn(2, 20, 5, generator=g)}}
    tr = {"a": torch.randint(0, 3, (60,), generator=g), "b": torch.randint(0, 2, (60,), generator=g)}
    va = {"a": torch.randint(0, 3, (20,), generator=g), "b": torch.randint(0, 2, (20,), generator=g)}
    res = probe_layers(feats["train"], tr, feats["val"], va, ["a", "b"], ks=(1, 5))
    for fam in ("a", "b"):
        for layer in range(2):
            alone = retrieval(feats["train"]["mean"][layer], tr[fam], feats["val"]["mean"][layer], va[fam], ks=(1, 5))
            assert {k: res["mean"][fam][k][layer] for k in alone} == alone
    assert res["mean"]["a"]["R@1"] != res["mean"]["b"]["R@1"]  # the families' labels do enter


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["acc"] > 0.9
    noise = torch.randint(0, 4, (600,), generator=g)
    assert linear_probe(x[:400], noise[:400], x[400:], noise[400:])["acc"] < 0.4


def test_labels_of_any_integer_dtype_and_a_clear_error_for_the_rest(tmp_path):
    """int32 labels (what numpy and .int() give) probe as int64 do, linearly and attentively, also from a
    tensor data file; float or negative labels are named instead of failing deep inside one_hot."""
    from bwssl_core.attentive import attentive_probe
    from bwssl_core.batches import load_clip_tensors

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    want = linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert linear_probe(x[:150], y[:150].int(), x[150:], y[150:].int()) == want
    tokens = x.view(200, 2, 4)
    kw = dict(epochs=2, batch_size=50, precision="fp32")
    assert attentive_probe(tokens[:150], y[:150].int(), tokens[150:], y[150:].short(), **kw) == \
        attentive_probe(tokens[:150], y[:150], tokens[150:], y[150:], **kw)
    with pytest.raises(ConfigError, match=r"y \(train\): labels of dtype torch.float32, expected integer"):
        linear_probe(x[:150], y[:150].float(), x[150:], y[150:])
    with pytest.raises(ConfigError, match=r"y \(validation\): label -1, expected class indices from 0"):
        linear_probe(x[:150], y[:150], x[150:], y[150:] - 1)
    clips = torch.zeros(3, 4, 8, 8, 3, dtype=torch.uint8)
    torch.save({"clips": clips, "labels": {"motion": torch.tensor([0, 1, 2], dtype=torch.int32)}}, tmp_path / "a.pt")
    assert load_clip_tensors(tmp_path / "a.pt")[1]["motion"].dtype == torch.int64
    torch.save({"clips": clips, "labels": {"motion": torch.tensor([0.0, 1.0, 2.0])}}, tmp_path / "b.pt")
    with pytest.raises(ConfigError, match=r"b\.pt: labels \['motion'\] are not one integer per clip"):
        load_clip_tensors(tmp_path / "b.pt")


def test_poolings_keep_when_and_where():
    x = torch.arange(16 * 6, dtype=torch.float).view(1, 16, 6)  # grid (2, 2, 4), D = 6
    assert pool_tokens(x, (2, 2, 4), "mean").shape == (1, 6)
    assert pool_tokens(x, (2, 2, 4), "slices").shape == (1, 12)
    grid = pool_tokens(x, (2, 2, 4), "grid")
    assert grid.shape == (1, 2 * 4 * 6)
    # first cell: t=0, top-left 1 x 2 tokens (ids 0, 1)
    torch.testing.assert_close(grid[0, :6], x[0, :2].mean(0))


def test_probe_refuses_too_few_samples_and_mismatched_lengths():
    x, y = torch.randn(10, 4), torch.arange(10) % 8
    with pytest.raises(ValueError, match="10 training samples are fewer than the probe needs for 8 classes"):
        linear_probe(x, y, x, y)
    x20, y20 = torch.randn(20, 4), torch.arange(20) % 8
    with pytest.raises(ValueError, match=r"19 training samples .* 8 classes \(at least 20:"):
        linear_probe(x20[:19], y20[:19], x20, y20)
    assert 0 <= linear_probe(x20, y20, x20, y20)["acc"] <= 1  # 20: two per class in the 16 that fit
    with pytest.raises(ValueError, match=r"expected \(N, F\) for both splits with the same F"):
        linear_probe(x20, y20, x20[:, :3], y20)
    with pytest.raises(ValueError, match="features and labels differ in length: train 10 vs 9"):
        linear_probe(x, y[:9], x, y)


def test_agrees_with_scikit_learn():
    """The probe's solver and scikit-learn's LogisticRegression on the same standardised features and the
    same penalty (ours: mean CE + l2/2 |W|^2; theirs: C * sum CE + 1/2 |W|^2, so C = 1 / (l2 n))."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from bwssl_core.probe import ProbeSpace

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 6, generator=g)
    x = torch.randn(1500, 64, generator=g)
    y = (x @ w + 4 * torch.randn(1500, 6, generator=g)).argmax(1)  # noisy: accuracy well below 1
    space = ProbeSpace(x[:1000].double(), x[1000:].double())
    for l2 in (1e-3, 1e-1):
        W, b = space.fit(y[:1000], l2)
        acc = ((space.val @ space.basis.T @ W.T + b).argmax(1) == y[1000:]).float().mean().item()
        tx = (x[:1000] - x[:1000].mean(0)) / (x[:1000].std(0) + 1e-6)
        vx = (x[1000:] - x[:1000].mean(0)) / (x[:1000].std(0) + 1e-6)
        ref = sklearn.LogisticRegression(C=1 / (l2 * 1000), max_iter=2000, tol=1e-8).fit(tx.numpy(), y[:1000].numpy())
        ref_acc = (ref.predict(vx.numpy()) == y[1000:].numpy()).mean()
        assert abs(acc - ref_acc) <= 0.01, (l2, acc, ref_acc)
        assert 0.4 < acc < 0.95


@pytest.mark.parametrize("n, d", [(300, 40), (120, 400)])  # features fewer than samples, and more
def test_solution_in_the_principal_basis_is_the_minimum_of_the_original_problem(n, d):
    """The weights found in the (preconditioned) basis make the gradient of the original objective,
    mean CE + l2/2 |W|^2 over all d standardised features, vanish: the basis loses nothing."""
    from bwssl_core.probe import ProbeSpace

    g = torch.Generator().manual_seed(2)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -3, d)  # correlated, badly conditioned features
    x = (torch.randn(n, d, generator=g) @ mix).double()
    y = torch.randint(0, 4, (n,), generator=g)
    space = ProbeSpace(x, x[:10])
    assert space.basis.shape[1] <= min(n, d)
    W, b = space.fit(y, l2=1e-2, max_iter=500)
    W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    tx = (x - x.mean(0)) / (x.std(0) + 1e-6)
    loss = torch.nn.functional.cross_entropy(tx @ W.T + b, y) + 0.5 * 1e-2 * W.pow(2).sum()
    loss.backward()
    assert W.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_probe_converges_where_a_plain_lbfgs_stopped_early():
    """At its default iteration limit the probe gives the accuracy of a 10x longer fit when the label
    lives in low-variance directions. (The plain L-BFGS used before read 0.177 here instead of 0.213,
    and 0.546 instead of 0.588 on the random-init control of the default study.)"""
    g = torch.Generator().manual_seed(1)
    d = 256
    z = torch.randn(1200, d, generator=g)
    x = (z * torch.logspace(0, -4, d)) @ torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    y = (z[:, 150:158] @ torch.randn(8, 8, generator=g) + torch.randn(1200, 8, generator=g)).argmax(1)
    quick = linear_probe(x[:900], y[:900], x[900:], y[900:])
    long = linear_probe(x[:900], y[:900], x[900:], y[900:], max_iter=1000)
    assert quick["l2"] == long["l2"] and abs(quick["acc"] - long["acc"]) <= 0.005


def test_feature_cache_reuses_and_keys_by_content(tmp_path):
    from bwssl_core.features import FeatureCache, key_of, tensor_hash

    calls = []
    cache = FeatureCache(tmp_path)
    clips = torch.arange(24, dtype=torch.uint8).view(2, 12)
    key = key_of("trained", clips=tensor_hash(clips))
    first = cache.get(key, lambda: calls.append(1) or {"x": torch.ones(3)}, meta={"run": "r"})
    again = cache.get(key, lambda: calls.append(1) or {"x": torch.zeros(3)})
    assert calls == [1] and torch.equal(first["x"], again["x"]) and (tmp_path / f"{key}.json").exists()
    clips[0, 0] = 99  # other clips, another key
    assert key_of("trained", clips=tensor_hash(clips)) != key


def test_one_pass_gives_pooled_and_token_features_and_bf16_stays_close(tiny):
    from bwssl_core.config import ConfigError
    from bwssl_core.model import VideoMAE
    from bwssl_core.probe import feature_precision, layer_features

    model = VideoMAE(tiny())
    clips = torch.randint(0, 256, (5, 3, 4, 32, 32), dtype=torch.uint8)
    pooled, tokens = layer_features(model, clips, ("mean", "slices"), batch_size=2, token_layers=[-1, 0],
                                    precision="fp32")
    assert pooled["mean"].shape == (4, 5, 32) and pooled["slices"].shape == (4, 5, 64)
    assert tokens.shape == (2, 5, 32, 32) and tokens.dtype == torch.float16
    torch.testing.assert_close(tokens[0].float().mean(1), pooled["mean"][-1], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(tokens[1].float().mean(1), pooled["mean"][0], atol=2e-3, rtol=2e-3)
    assert layer_features(model, clips, ("mean",), precision="fp32")[1] is None
    half, _ = layer_features(model, clips, ("mean",), precision="bf16")
    cos = torch.nn.functional.cosine_similarity(half["mean"], pooled["mean"], dim=-1)
    assert cos.min() > 0.99 and not torch.equal(half["mean"], pooled["mean"])
    assert feature_precision("cpu", "fp32") == "fp32" and feature_precision("cpu") in ("bf16", "fp32")
    with pytest.raises(ConfigError, match="precision='half'"):
        feature_precision("cpu", "half")


def test_depthwise_shares_the_random_init_control_across_partitions(tmp_path, tiny):
    from bwssl_core.evaluate import depthwise
    from bwssl_core.model import VideoMAE

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (n, 3, 4, 32, 32), dtype=torch.uint8, generator=g),
             {"a": torch.arange(n) % 2}) for n in (24, 12)]
    kw = dict(poolings=("mean",), ks=(1, 5), cache=tmp_path, attentive_layers=[-1], precision="fp32")
    e2e, k2 = VideoMAE(tiny()), VideoMAE(tiny(blocks=2))
    with torch.no_grad():
        k2.layers[0].mlp.fc2.bias.add_(0.5)  # a "trained" BWSSL encoder that differs from E2E's
    first = depthwise(e2e, *data, **kw, meta={"run": "e2e", "checkpoint": "runs/e2e/checkpoint.pt"})
    assert len(list(tmp_path.glob("*.pt"))) == 6  # features and probes of trained, random init, pixels
    # each entry's sidecar names its own model; only the trained one came from the run's checkpoint
    sidecars = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert sorted(m["model"] for m in sidecars) == ["pixels", "pixels", "random_init", "random_init", "trained",
                                                    "trained"]
    assert [m["model"] for m in sidecars if "checkpoint" in m] == ["trained", "trained"]
    assert all(m["features"] + ".json" in {p.name for p in tmp_path.glob("*.json")}
               for m in sidecars if m["key"].startswith("probe"))
    second = depthwise(k2, *data, **kw)
    assert len(list(tmp_path.glob("*.pt"))) == 8  # only the BWSSL run's own features and probes are new
    assert second["random_init"] == first["random_init"] and second["pixels"] == first["pixels"]
    assert second["trained"] != first["trained"] and len(first["trained"]["attentive"]["a"]["acc"]) == 1


def test_probe_results_of_another_linear_protocol_are_not_reused(tmp_path, tiny, monkeypatch):
    """The linear probe's protocol (solver, l2 grid, held-out part, iteration cap) keys the cached probe
    results: after a change the features are reused and the probes run again."""
    from bwssl_core import evaluate
    from bwssl_core.model import VideoMAE

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (n, 3, 4, 32, 32), dtype=torch.uint8, generator=g),
             {"a": torch.arange(n) % 2}) for n in (24, 12)]
    kw = dict(poolings=("mean",), ks=(1, 5), cache=tmp_path, precision="fp32")
    model = VideoMAE(tiny())
    evaluate.depthwise(model, *data, **kw)
    assert len(list(tmp_path.glob("*.pt"))) == 6
    monkeypatch.setattr(evaluate, "LINEAR_PROTOCOL", {**evaluate.LINEAR_PROTOCOL, "max_iter": 50})
    evaluate.depthwise(model, *data, **kw)
    assert len(list(tmp_path.glob("*.pt"))) == 9 and len(list(tmp_path.glob("probe-*.pt"))) == 6


def test_attentive_family_labels_key_the_cache_and_an_unknown_one_is_named(tmp_path, tiny):
    """A family probed only by the attentive probe keys the cached results too: new labels, new probes. An
    attentive family the data lacks is named before any feature is computed; an R@k the gallery cannot
    answer is left out with a warning."""
    from bwssl_core.evaluate import depthwise
    from bwssl_core.model import VideoMAE

    g = torch.Generator().manual_seed(0)
    clips = [torch.randint(0, 256, (n, 3, 4, 32, 32), dtype=torch.uint8, generator=g) for n in (24, 12)]
    model = VideoMAE(tiny())
    kw = dict(poolings=("mean",), ks=(1, 5, 50), cache=tmp_path, attentive_layers=[-1], precision="fp32",
              families=["a"], attentive_families=["b"])

    def data(b):
        return [(c, {"a": torch.arange(len(c)) % 2, "b": b(len(c))}) for c in clips]

    def run(b, **more):
        with pytest.warns(UserWarning, match=r"R@k for k in \[50\] left out"):
            return depthwise(model, *data(b), **{**kw, **more})

    first = run(lambda n: torch.arange(n) % 3)
    assert "R@50" not in first["trained"]["mean"]["a"] and "R@5" in first["trained"]["mean"]["a"]
    assert first["trained"]["attentive"]["b"]["acc"][0] < 1
    assert run(lambda n: torch.zeros(n, dtype=torch.long))["trained"]["attentive"]["b"]["acc"] == [1.0]  # one class
    cached = len(list(tmp_path.glob("*.pt")))
    with pytest.raises(ConfigError, match=r"label families \['nope'\] are not in the data"):
        depthwise(model, *data(lambda n: torch.zeros(n, dtype=torch.long)), **{**kw, "attentive_families": ["nope"]})
    assert len(list(tmp_path.glob("*.pt"))) == cached
    # the linear families key the results too: probing "b" linearly as well is not the cached "a" alone
    both = run(lambda n: torch.zeros(n, dtype=torch.long), families=["a", "b"])
    assert set(both["trained"]["mean"]) == {"a", "b"}


@pytest.mark.parametrize("grid", [(2, 4, 6), (2, 3, 5)])  # equal cells (a plain reduction), and adaptive ones
def test_pooling_matches_adaptive_pooling_and_accumulates_bf16_in_float32(grid):
    T, H, W = grid
    x = torch.randn(3, T * H * W, 8, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.adaptive_avg_pool3d(x.view(3, T, H, W, 8).permute(0, 4, 1, 2, 3), (T, 2, 2))
    torch.testing.assert_close(pool_tokens(x, grid, "grid"), ref.permute(0, 2, 3, 4, 1).flatten(1))
    for kind in ("mean", "slices", "grid"):
        half = pool_tokens(x.bfloat16(), grid, kind)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half, pool_tokens(x.bfloat16().float(), grid, kind))


def test_joint_solve_equals_one_problem_at_a_time_and_absent_classes_never_win():
    """Every (layer, family, l2) solved together reaches each problem's own minimum, with layers of
    different widths zero-padded to one; a family with fewer classes than another is never predicted an
    absent class."""
    from bwssl_core.probe import ProbeSpace, _accuracy, _fit

    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 20, generator=g).double()
    y8 = (x[:, :8] + 0.5 * torch.randn(600, 8, generator=g).double()).argmax(1)
    y3 = (x[:, 8:11] - 3).argmax(1)  # 3 classes, logits all far below zero before the bias
    wide, narrow = ProbeSpace(x, x[:10]), ProbeSpace(x[:, :12], x[:10, :12])  # two "layers", r = 20 and 12
    z = torch.stack([wide.train, torch.nn.functional.pad(narrow.train, (0, 8))])  # (2, 600, 20)
    lam = torch.stack([wide.lam, torch.nn.functional.pad(narrow.lam, (0, 8))])
    ys, counts = torch.stack([y8, y3, y3]), [8, 3, 3]
    l2 = [[1e-2, 1e-2, 1e-4], [1e-3, 1e-1, 1e-2]]  # (layers, problems): each its own penalty
    B, b, iters, capped = _fit(z, ys, counts, l2, lam, max_iter=500)
    assert B.shape == (2, 3, 8, 20) and b.shape == (2, 3, 8) and iters.shape == (2, 3) and (iters < 500).all()
    assert capped.shape == (2, 3) and not capped.any()
    assert (B[1, :, :, 12:] == 0).all()  # the padded directions keep zero weight
    for layer in range(2):
        for j in range(3):
            Bj, bj, _, _ = _fit(z[layer:layer + 1], ys[j:j + 1], counts[j:j + 1], [l2[layer][j]],
                                lam[layer:layer + 1], max_iter=500)
            prob = lambda B, b: (z[layer] @ B.T + b).softmax(1)  # noqa: E731 (weights agree to the tolerance)
            # each solve stops at a gradient max-norm of 1e-4: close, not equal
            torch.testing.assert_close(prob(B[layer, j, :counts[j]], b[layer, j, :counts[j]]),
                                       prob(Bj[0, 0], bj[0, 0]), atol=1e-2, rtol=0)
    assert torch.isinf(b[:, 1:, 3:]).all() and torch.isfinite(b[:, 0]).all()
    pred = (torch.einsum("gnr,gjcr->gjnc", z, B) + b[:, :, None]).argmax(-1)
    assert pred[:, 1:].max() < 3
    acc = _accuracy(z, B, b, ys)
    assert acc.shape == (2, 3) and (acc > 0.5).all()


def test_probing_all_layers_at_once_gives_each_layers_own_probe():
    """probe_spaces over layers of different widths gives what each layer's probe gives alone: its l2
    choice and accuracies; mismatched layers are refused."""
    from bwssl_core.config import ConfigError
    from bwssl_core.probe import ProbeSpace, probe_spaces

    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 24, generator=g)
    labels = {"a": ((x[:300, :4] + torch.randn(300, 4, generator=g)).argmax(1), x[300:, :4].argmax(1)),
              "b": ((x[:300, 4:7] * 0.3 + torch.randn(300, 3, generator=g)).argmax(1), x[300:, 4:7].argmax(1))}
    spaces = [ProbeSpace(x[:300, :w], x[300:, :w]) for w in (24, 10, 5)]
    together = probe_spaces(spaces, labels, max_iter=300)
    alone = [s.probe_families(labels, max_iter=300) for s in spaces]
    for t, a in zip(together, alone):
        for fam in labels:
            assert t[fam]["l2"] == a[fam]["l2"] and t[fam]["holdout_acc"] == pytest.approx(a[fam]["holdout_acc"], abs=0.02)
            assert t[fam]["acc"] == pytest.approx(a[fam]["acc"], abs=0.02)
    assert together[0]["a"]["acc"] > 0.5 and together[2]["b"]["acc"] < together[0]["b"]["acc"]  # b lives in columns 4-6
    with pytest.raises(ConfigError, match="layers' features differ in length"):
        probe_spaces([spaces[0], ProbeSpace(x[:200], x[300:])], labels)


def test_probe_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/bench_probe.py at tiny size: timings for the features and each pooling's probes, and
    a best-layer accuracy for every label family."""
    import importlib.util
    import json
    from pathlib import Path

    from bwssl_core.synth import FAMILIES

    spec = importlib.util.spec_from_file_location("bench_probe", Path(__file__).parents[1] / "benchmarks" / "bench_probe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probe.json"
    bench.main(["--preset", "tiny", "--clips", "120", "--poolings", "mean", "grid", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["features_s"] > 0 and set(result["probes_s"]) == {"mean", "grid"}
    assert result["total_s"] == pytest.approx(result["features_s"] + sum(result["probes_s"].values()))
    assert set(result["best_acc"]["grid"]) == set(FAMILIES)
    assert all(0 <= a <= 1 for a in result["best_acc"]["mean"].values())


def test_study_probe_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/bench_study_probes.py on a tiny finished study: every probed run and both controls
    timed (features apart from the probes), each with its best-layer accuracies and the attentive probe's."""
    import importlib.util
    import json
    from pathlib import Path

    from notebook_fixtures import bwssl

    data, study = tmp_path / "data", tmp_path / "study"
    bwssl("synth", "--out", str(data), "--n-train", "48", "--n-val", "16", "--size", "32", "--frames", "4",
          "--workers", "1")
    bwssl("pretrain", "--preset", "tiny", "--data", str(data), "--steps", "2", "--batch-size", "4", "--workers", "0",
          "--device", "cpu", "--out", str(study / "runs" / "e2e"))
    (study / "study.json").write_text(json.dumps({"params": {"data": str(data), "runs": ["e2e"],
                                                             "poolings": ["mean", "grid"]}}))
    spec = importlib.util.spec_from_file_location(
        "bench_study_probes", Path(__file__).parents[1] / "benchmarks" / "bench_study_probes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "probes.json"
    bench.main(["--study", str(study), "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["models"]) == {"e2e", "random_init", "pixels"} and result["clips"] == [48, 16]
    assert result["probes_s"] == pytest.approx(result["linear_s"] + result["attentive_s"])
    for row in result["models"].values():
        assert row["features_s"] > 0 and row["linear_s"] > 0 and row["attentive_s"] > 0
        assert set(row["best_acc"]) == {"mean", "grid"} and set(row["attentive_acc"]) == {"motion"}
        assert all(0 <= a <= 1 for a in [*row["best_acc"]["grid"].values(), *row["attentive_acc"]["motion"]])


def test_the_probe_is_refit_on_the_whole_training_split():
    """After l2 is chosen on the held-out rows, the probe is refit on every training row: its validation
    accuracy is that of ProbeSpace.fit (all rows) at the chosen l2 (a fit without the held-out fifth scored
    0.78 against 0.82 here)."""
    from bwssl_core.probe import ProbeSpace

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, 12, generator=g).double()
    y = (x[:, :3] + torch.randn(300, 3, generator=g).double()).argmax(1)
    vx = torch.randn(100, 12, generator=g).double()
    vy = vx[:, :3].argmax(1)
    space = ProbeSpace(x, vx)
    res = space.probe(y, vy)
    W, b = space.fit(y, res["l2"])
    standardised = (vx - x.mean(0)) / (x.std(0) + 1e-6)
    assert ((standardised @ W.T + b).argmax(1) == vy).double().mean().item() == pytest.approx(res["acc"])


def test_ties_in_held_out_accuracy_pick_the_stronger_penalty():
    """Labels every l2 of the grid separates perfectly: the held-out scores tie, and the strongest l2 wins."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    x[:, 0] += torch.where(y.bool(), 3.0, -3.0)  # a wide margin
    res = linear_probe(x[:150], y[:150], x[150:], y[150:], l2_grid=(1e-1, 1e-2, 1e-3, 1e-4))
    assert res["holdout_acc"] == 1.0 and res["l2"] == 1e-1


def test_probe_results_for_other_ks_are_not_reused(tmp_path, tiny):
    from bwssl_core.evaluate import depthwise
    from bwssl_core.model import VideoMAE

    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (n, 3, 4, 32, 32), dtype=torch.uint8, generator=g),
             {"a": torch.arange(n) % 2}) for n in (24, 12)]
    model = VideoMAE(tiny())
    kw = dict(poolings=("mean",), cache=tmp_path, precision="fp32")
    assert "R@5" not in depthwise(model, *data, ks=(1,), **kw)["trained"]["mean"]["a"]
    assert "R@5" in depthwise(model, *data, ks=(1, 5), **kw)["trained"]["mean"]["a"]


def test_a_feature_constant_on_the_training_clips_is_not_scaled_up():
    """A feature constant over the training clips (its std rounding noise, ~1e-7 at 0.7) keeps scale 1: divided by
    std + 1e-6 its validation values were multiplied by ~1e6 and the top-1 fell from 0.75 to 0.47."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2500, 16, generator=g)
    y = (x[:, :4] + 0.5 * torch.randn(2500, 4, generator=g)).argmax(1)
    clean = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:])["acc"]
    for c in (0.0, 0.7):
        xc = torch.cat([x, torch.full((2500, 1), c)], 1)
        xc[2000:, -1] += 0.01 * torch.randn(500, generator=g)  # varies a little in validation
        assert linear_probe(xc[:2000], y[:2000], xc[2000:], y[2000:])["acc"] == pytest.approx(clean, abs=0.01), c


def test_class_ids_need_not_be_0_to_c_minus_1():
    """Sparse class ids (y * 100 + 7: 4 classes) probe as 0..3 do, linearly and attentively, instead of counting
    308 classes and refusing the training split as too small for them."""
    from bwssl_core.attentive import attentive_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 24, generator=g)
    y = (x[:, :4] + 0.7 * torch.randn(600, 4, generator=g)).argmax(1)
    sparse = y * 100 + 7
    want = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert linear_probe(x[:400], sparse[:400], x[400:], sparse[400:])["acc"] == want["acc"] > 0.5
    tokens, kw = x.view(600, 3, 8), dict(epochs=2, batch_size=100, precision="fp32")
    assert attentive_probe(tokens[:400], sparse[:400], tokens[400:], sparse[400:], **kw)["acc"] == \
        attentive_probe(tokens[:400], y[:400], tokens[400:], y[400:], **kw)["acc"]


def test_non_finite_features_are_named():
    """One NaN or inf in the features: a ConfigError saying where and how many rows, not a failed eigh from the
    probe, nor a NaN clip that retrieval ranks first."""
    from bwssl_core.probe import nearest

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g)
    y = x[:, :4].argmax(1)
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[5, 3] = xb[7, 0] = bad
        with pytest.raises(ConfigError, match="training features: NaN or inf in 2 of 200 rows"):
            linear_probe(xb[:200], y[:200], xb[200:], y[200:])
        with pytest.raises(ConfigError, match="validation features: NaN or inf in 2 of 100 rows"):
            linear_probe(x[100:], y[100:], xb[:100], y[:100])
        with pytest.raises(ConfigError, match=r"gallery \(training\) features: NaN or inf in 2 of 200 rows"):
            nearest(xb[:200], x[200:], 1)
        with pytest.raises(ConfigError, match=r"query \(validation\) features: NaN or inf in 2 of 100 rows"):
            retrieval(x[100:], y[100:], xb[:100], y[:100], ks=(1,))
