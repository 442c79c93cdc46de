"""Runs stacked in one network (model.Net of G groups, train_group) against each run alone.

The references are the one-group network and, for one run, a loop written here by hand (the
loss of Eq. (1), SGD with L2 on the hidden fully connected weights), so the stacking and the
step are under test: each run's values, gradients and weights must be its own to float rounding
(fp32 on the CPU), whatever runs it is stacked with.
"""
import dataclasses

import numpy as np
import pytest
import torch

from iqals import distort, model, params as params_lib, train as train_lib
from iqals.mixture import epoch_draw, soft_targets
from iqals.params import DISTORTIONS
from iqals.seeds import derive_seed
from tests.conftest import close

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_arrays, params):
    (x, y), _ = tiny_arrays
    x, y = x[:100], y[:100]
    d = distort.distort_all(x, params.distort, 0, "train")
    scores = np.random.default_rng(0).uniform(0.3, 1.0, size=(len(DISTORTIONS), 3, len(y)))
    return x, y, d, scores


def small_params(raw_params, **train):
    raw_params["train"].update({"epochs": 2, "lr_decay_epochs": 1, "batch_size": 25, **train})
    return params_lib.parse(raw_params)


def nets(params, seeds=(0, 1, 2)):
    return [model.build(params.model, derive_seed(s, "init")) for s in seeds]


def same_losses(got, want, images):
    """Per-epoch mean losses of two fp32 code paths: each a sum over images x NUM_CLASSES squared
    terms (conftest.close). The weights they are taken at differ by rounding too, which moves a
    loss by a few eps of its own, far below that bound; a mixed-up run or target is O(1e-2) and more."""
    got, want = (torch.as_tensor(v, dtype=torch.float32) for v in (got, want))  # history rows: Python floats
    close(got, want, images * params_lib.NUM_CLASSES)


def loss_sum(logits, q):
    return train_lib.run_losses(logits, q, "squared").sum()


def close_after_training(got, want, init):
    """Weights after SGD steps in two fp32 code paths, compared by how far training moved them:
    ||got - want|| / ||want - init|| within the check's fp32 bound for weight updates
    (train.TOLERANCE). Rounding alone gives ~1e-5; it reaches ~3e-3 only when a 3x3 max pool's two
    largest inputs lie within rounding and the gradient takes the other one. A mixed-up run is O(1)."""
    rel = ((got - want).norm() / (want - init).norm().clamp_min(1e-30)).item()
    assert rel <= train_lib.TOLERANCE["fp32"]["updates"], rel


def test_stacked_logits_and_gradients_are_each_nets(params):
    singles = [n.double() for n in nets(params)]
    group = model.Net.stack(singles)
    x = model.standardize(torch.randint(0, 256, (3, 20, 3, 32, 32), dtype=torch.uint8).flatten(0, 1))
    x = x.unflatten(0, (3, 20)).double()
    q = torch.softmax(torch.randn(3, 20, 10, dtype=torch.float64), -1)
    logits = group(x)
    loss_sum(logits, q).backward()
    for g, net in enumerate(singles):
        ref = net(x[g])  # a one-group network takes (B, 3, H, W), as evaluation calls it
        loss_sum(ref, q[g]).backward()
        close(logits[g], ref, 5 * 5 * 64)  # conv2's sums
        for k, w in net.named_parameters():
            grad = dict(group.named_parameters())[k].grad.unflatten(0, (3, -1))[g]
            close(grad, w.grad, 20 * 32 * 32)  # conv1's weight gradient: batch x 32 x 32


def test_stacked_weights_after_sgd_steps_are_each_nets(params):
    singles = [n.double() for n in nets(params)]
    group = model.Net.stack(singles)
    cfg = params.train
    opts = [train_lib.make_sgd(n, cfg) for n in singles]
    opt = train_lib.make_sgd(group, cfg)
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, 10, 3, 32, 32, dtype=torch.float64)
        q = torch.softmax(torch.randn(3, 10, 10, dtype=torch.float64), -1)
        opt.zero_grad()
        loss_sum(group(x), q).backward()
        opt.step()
        for g, (net, o) in enumerate(zip(singles, opts)):
            o.zero_grad()
            loss_sum(net(x[g]), q[g]).backward()
            o.step()
    for g, net in enumerate(singles):
        for k, v in group.run_state(g).items():
            close(v, net.state_dict()[k], 3 * 10 * 32 * 32)
    assert not torch.equal(group.run_state(0)["fc1.weight"], nets(params)[0].state_dict()["fc1.weight"])


def test_run_state_and_load_run_round_trip(params):
    singles = nets(params)
    group = model.Net.stack(singles)
    for g, net in enumerate(singles):
        state = group.run_state(g)
        assert state.keys() == net.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    group.load_run(1, singles[2].state_dict())
    assert torch.equal(group.run_state(1)["conv2.weight"], singles[2].conv2.weight)
    assert torch.equal(group.run_state(0)["conv2.weight"], singles[0].conv2.weight)  # neighbours untouched


def prepared(tiny, p, runs):
    x, y, d, scores = tiny
    return train_lib.prepare_group([(p.strategies[s], k) for s, k in runs], x, y, d, scores, p, CPU)


def group_runs(tmp_path, tiny, p, runs, tag):
    data = prepared(tiny, p, runs)
    return [train_lib.Run(p.strategies[s], k, dt, tmp_path / tag / f"{s}_{k}.pt", tmp_path / tag / f"{s}_{k}.tsv",
                          tmp_path / tag / f"ck_{s}_{k}.pt") for (s, k), dt in zip(runs, data)]


def load(path):
    return torch.load(path, weights_only=False)


RUNS = [("S3", 0), ("S1", 1), ("S5", 0)]  # IQA-LS on blur, one-hot pristine, IQA-LS on noise


def test_train_group_equals_single_runs(tmp_path, tiny, raw_params):
    p = small_params(raw_params)
    histories = train_lib.train_group(group_runs(tmp_path, tiny, p, RUNS, "group"), p, CPU)
    x, y, d, scores = tiny
    for (s, k), hist in zip(RUNS, histories):
        st = p.strategies[s]
        data = train_lib.prepare(st, x, y, d, scores if st.needs_scores else None, p, k, CPU)
        ref = train_lib.train(st, k, data, p, CPU, tmp_path / "one" / "m.pt", tmp_path / "one" / "l.tsv",
                              tmp_path / "one" / f"ck_{s}{k}.pt")
        assert [r["epoch"] for r in hist] == [1, 2]
        same_losses([r["loss"] for r in hist], [r["loss"] for r in ref], len(y))
        for a, b in zip(hist, ref):
            assert a["train_acc"] == pytest.approx(b["train_acc"], abs=0.011)  # at most one image flips
        got, want = load(tmp_path / "group" / f"{s}_{k}.pt"), load(tmp_path / "one" / "m.pt")
        assert got.keys() == want.keys() and got["seed"] == k and got["strategy"]["name"] == s
        init = nets(p, [k])[0].state_dict()
        for name, v in want["model"].items():
            close_after_training(got["model"][name], v, init[name])
        model.Net().load_state_dict(got["model"])  # a plain Net state_dict (stages/evaluate.py)
        assert (tmp_path / "group" / f"{s}_{k}.tsv").read_text().splitlines()[0].startswith("epoch\tloss")


def test_single_run_equals_a_loop_written_by_hand(tmp_path, tiny, raw_params):
    """train() (a group of one) against the definition: the network, Eq. (1), and the SGD update
    w -= lr (grad + weight_decay w) with decay on fc1 and fc2's weights only, batch by batch."""
    p = small_params(raw_params, epochs=1)
    x, y, d, scores = tiny
    st = p.strategies["S3"]
    data = train_lib.prepare(st, x, y, d, scores, p, 0, CPU)
    hist = train_lib.train(st, 0, data, p, CPU, tmp_path / "m.pt", tmp_path / "l.tsv", tmp_path / "c.pt")
    copy, image = epoch_draw(len(y), st, p.mixture.shares, 0, 0)
    net, lr, bs, total = model.build(p.model, derive_seed(0, "init")), p.train.lr, p.train.batch_size, 0.0
    for i in range(0, len(y), bs):
        c, j = copy[i:i + bs], image[i:i + bs]
        q = soft_targets(data.labels[j], data.q_true[c, j])
        loss = ((net(model.standardize(data.pool[c, j])).softmax(-1) - q) ** 2).sum(-1).mean()
        grads = torch.autograd.grad(loss, list(net.parameters()))
        with torch.no_grad():
            for (name, w), g in zip(net.named_parameters(), grads):
                w -= lr * (g + (p.train.weight_decay * w if name in ("fc1.weight", "fc2.weight") else 0))
        total += loss.item() * len(j)
    same_losses(hist[0]["loss"], total / len(y), len(y))
    init = nets(p, [0])[0].state_dict()
    for k, v in net.state_dict().items():
        close_after_training(load(tmp_path / "m.pt")["model"][k], v, init[k])


def test_group_resume_is_exact_and_mixed_epochs_train_in_subgroups(tmp_path, tiny, raw_params, monkeypatch):
    p = small_params(raw_params, epochs=3, lr_decay_epochs=2)
    full = train_lib.train_group(group_runs(tmp_path, tiny, p, RUNS, "full"), p, CPU)
    cut = group_runs(tmp_path, tiny, p, RUNS, "cut")
    assert train_lib.train_group(cut, p, CPU, stop_after=1) == [None] * 3
    assert not any(r.model_out.exists() for r in cut) and all(r.checkpoint.exists() for r in cut)
    untimed = lambda hs: [[{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in h]
                          for h in hs]  # noqa: E731
    assert untimed(train_lib.train_group(cut, p, CPU)) == untimed(full)  # the same group resumed: bit for bit
    for r in cut:
        want = load(tmp_path / "full" / r.model_out.name)["model"]
        assert all(torch.equal(v, load(r.model_out)["model"][k]) for k, v in want.items())

    mixed = group_runs(tmp_path, tiny, p, RUNS, "mixed")
    train_lib.train_group(mixed[:1], p, CPU, stop_after=2)  # S3 seed 0 two epochs ahead
    calls = []
    real = train_lib._train_together
    monkeypatch.setattr(train_lib, "_train_together",
                        lambda runs, *a: calls.append([r.name for r in runs]) or real(runs, *a))
    hist = train_lib.train_group(mixed, p, CPU)
    assert calls == [["S1 seed 1", "S5 seed 0"], ["S3 seed 0"]]
    for a, b in zip(hist, full):
        same_losses([r["loss"] for r in a], [r["loss"] for r in b], len(tiny[1]))


def test_runs_of_a_group_share_one_pool(tmp_path, tiny, raw_params):
    p = small_params(raw_params)
    a = group_runs(tmp_path, tiny, p, RUNS[:1], "a")
    b = group_runs(tmp_path, tiny, p, RUNS[1:2], "b")
    with pytest.raises(train_lib.TrainingError, match="share one pool"):
        train_lib.train_group(a + b, p, CPU)
    with pytest.raises(train_lib.TrainingError, match="same run twice"):
        train_lib.train_group(group_runs(tmp_path, tiny, p, [("S1", 0), ("S1", 0)], "c"), p, CPU)


def test_graph_step_logic_uncaptured_equals_eager(tiny, raw_params):
    """train.step = graph without capture (CPU): counter-indexed static buffers, tensor lr, fused SGD."""
    p = small_params(raw_params)
    data = prepared(tiny, p, RUNS)
    g = torch.Generator().manual_seed(3)
    copy = torch.stack([torch.randint(0, 10, (100,), generator=g) for _ in RUNS])
    image = torch.stack([torch.randperm(100, generator=g) for _ in RUNS])
    eager, graph = model.Net.stack(nets(p)), model.Net.stack(nets(p))
    s_eager = train_lib.Step(eager, data, p.train, CPU)
    s_graph = train_lib.Step(graph, data, dataclasses.replace(p.train, step="graph"), CPU)
    for lr in (0.1, 0.01):
        a, b = s_eager.epoch(copy, image, lr), s_graph.epoch(copy, image, lr)
        close(b[0], a[0], 100 * params_lib.NUM_CLASSES)  # summed losses of 100 images
        assert torch.equal(a[1], b[1])
    close(s_graph.last_logits, s_eager.last_logits, 5 * 5 * 64)
    init = model.Net.stack(nets(p)).state_dict()
    for k, v in eager.state_dict().items():
        close_after_training(graph.state_dict()[k], v, init[k])


def test_compiled_step_traces_whole_and_equals_eager(tiny, raw_params):
    """What train.step = compile hands torch.compile, traced on the CPU by dynamo and AOTAutograd
    (backend aot_eager: no code generation, no CUDA graphs): one graph, eager's numbers."""
    import torch._dynamo
    p = small_params(raw_params)
    data = prepared(tiny, p, RUNS[:2])
    copy, image = torch.randint(0, 10, (2, 100)), torch.stack([torch.randperm(100), torch.randperm(100)])
    eager, traced = model.Net.stack(nets(p, [0, 1])), model.Net.stack(nets(p, [0, 1]))
    s_eager, s_traced = train_lib.Step(eager, data, p.train, CPU), train_lib.Step(traced, data, p.train, CPU)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s_traced.forward = torch.compile(s_traced.forward, backend="aot_eager")
    close(s_traced.epoch(copy, image, 0.1)[0], s_eager.epoch(copy, image, 0.1)[0], 100 * params_lib.NUM_CLASSES)
    assert not torch._dynamo.utils.counters["graph_break"]
    init = model.Net.stack(nets(p, [0, 1])).state_dict()
    for k, v in eager.state_dict().items():
        close_after_training(traced.state_dict()[k], v, init[k])


def test_gpu_steps_need_cuda_and_graph_needs_whole_batches(tiny, raw_params):
    data = prepared(tiny, small_params(raw_params), RUNS[:1])
    for key, value in (("step", "graph"), ("step", "compile"), ("precision", "tf32")):
        p = small_params(raw_params, **{key: value})
        with pytest.raises(train_lib.TrainingError, match=f"train.{key} = '{value}' needs a GPU"):
            train_lib.choose_step(p, CPU, 1)
    p = small_params(raw_params, batch_size=30, step="graph")
    with pytest.raises(train_lib.TrainingError, match=r"train.batch_size \(30\) to divide"):
        train_lib.Step(model.Net.stack(nets(p, [0])), data, p.train, CPU)


def test_check_of_the_cpu_group_passes_with_rounding_only(raw_params):
    p = small_params(raw_params, batch_size=20)
    r = train_lib.check_step(p, CPU, p.train, 3)
    assert r["ok"] and r["tolerance"] == train_lib.TOLERANCE["fp32"] and r["group"] == 3
    # ok: within TOLERANCE (gradients and updates allow a max pool's near-tie routed apart); the
    # logits and losses within fp32 rounding of conv2's 1,600-term sums, as close() bounds it
    rounding = 8 * torch.finfo(torch.float32).eps * (5 * 5 * 64) ** 0.5
    assert r["logits_rel"] < rounding and r["loss_rel"] < rounding, r


def test_check_fails_a_stacked_step_that_takes_the_wrong_batch(raw_params, monkeypatch):
    p = small_params(raw_params, batch_size=20)
    real = train_lib.Step.batch  # broken for stacked runs only: the one-run CPU reference is right
    monkeypatch.setattr(train_lib.Step, "batch",
                        lambda self, c, j: real(self, c, j.roll(1, dims=1) if self.net.groups > 1 else j))
    r = train_lib.check_step(p, CPU, p.train, 2)
    assert not r["ok"] and r["logits_rel"] > 0.01 and r["gradients_rel"] > train_lib.TOLERANCE["bf16"]["gradients"]


def test_a_variant_that_fails_its_check_is_not_used_and_the_log_says_why(raw_params, monkeypatch, caplog):
    p = small_params(raw_params, precision="bf16", step="graph")
    gpu = torch.device("cuda")  # never reached: the check is replaced
    monkeypatch.setattr(train_lib, "check_step", lambda *a: {"ok": False, "logits_rel": 0.5, "gradients_rel": 2.0,
                                                             "tolerance": train_lib.TOLERANCE["bf16"]})
    with caplog.at_level("INFO", logger="iqals.train"):
        cfg = train_lib.choose_step(p, gpu, 3)
    assert (cfg.precision, cfg.step) == ("fp32", "eager") and cfg.epochs == p.train.epochs
    assert "bf16 graph x3 FAILED its check" in caplog.text and "gradients 2.0e+00" in caplog.text
    monkeypatch.setattr(train_lib, "check_step", lambda *a: 1 / 0)  # a variant that cannot even run
    assert train_lib.choose_step(p, gpu, 3).step == "eager" and "ZeroDivisionError" in caplog.text
    monkeypatch.setattr(train_lib, "check_step", lambda *a: {"ok": True, "logits_rel": 1e-3, "gradients_rel": 0.1,
                                                             "tolerance": train_lib.TOLERANCE["bf16"]})
    assert train_lib.choose_step(p, gpu, 3) == p.train


def test_params_reject_gpu_steps_on_cpu(raw_params):
    raw_params["train"].update(device="cpu", step="graph")
    with pytest.raises(params_lib.ParamError, match="train.step = 'graph'"):
        params_lib.parse(raw_params)
    raw_params["train"].update(device="auto", step="fast")
    with pytest.raises(params_lib.ParamError, match=r"train.step = 'fast': expected one of \['eager'"):
        params_lib.parse(raw_params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU steps run only there)")
@pytest.mark.parametrize("step,precision", [("eager", "fp32"), ("graph", "fp32"), ("graph", "tf32"),
                                            ("graph", "bf16"), ("compile", "tf32")])
def test_gpu_group_training_matches_cpu(tmp_path, tiny, raw_params, step, precision):
    p = small_params(raw_params, step=step, precision=precision)
    p_cpu = small_params(raw_params, step="eager", precision="fp32")
    ref = train_lib.train_group(group_runs(tmp_path, tiny, p_cpu, RUNS, "cpu"), p_cpu, CPU)
    x, y, d, scores = tiny
    data = train_lib.prepare_group([(p.strategies[s], k) for s, k in RUNS], x, y, d, scores, p, torch.device("cuda"))
    runs = [train_lib.Run(p.strategies[s], k, dt, tmp_path / "gpu" / f"{s}_{k}.pt", tmp_path / "gpu" / f"{s}_{k}.tsv",
                          tmp_path / "gpu" / f"ck{s}{k}.pt") for (s, k), dt in zip(RUNS, data)]
    got = train_lib.train_group(runs, p, torch.device("cuda"))
    # per-epoch losses after 8 steps drift apart more than one step's loss (train.TOLERANCE);
    # set from the CPU bf16 measurements there, not yet measured on a GPU
    rel = {"fp32": 1e-3, "tf32": 1e-2, "bf16": 5e-2}[precision]
    for a, b in zip(got, ref):
        assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=rel)


def cli_args(*argv) -> dict:
    """The train stage's options as parse_runs takes them."""
    out = {"strategy": [], "seed": None, "run": [], "scores": None}
    for k, v in argv:
        out[k] = out[k] + [v] if k in ("run", "strategy") else v
    return out


def test_cli_runs_are_checked_against_params_and_scores(params):
    from stages.train import parse_runs
    runs = parse_runs(**cli_args(("run", "S1:0"), ("run", "S3:0"), ("scores", "data/scores")), p=params)
    assert [(s.name, k) for s, k in runs] == [("S1", 0), ("S3", 0)]  # one-hot beside IQA-LS: --scores once
    assert [(s.name, k) for s, k in parse_runs(**cli_args(("strategy", "S2"), ("seed", "0")), p=params)] == [("S2", 0)]
    seeds = params.train.seeds
    both = parse_runs(**cli_args(("strategy", "S2"), ("strategy", "S3"), ("scores", "s")), p=params)
    assert [(s.name, k) for s, k in both] == [("S2", k) for k in seeds] + [("S3", k) for k in seeds]
    for argv, match in [([("run", "S1:0")], None), ([("strategy", "S1")], None),
                        ([("run", "S3:0")], "S3 .* needs --scores"),
                        ([("run", "S1:0"), ("scores", "s")], "S1 .* must not read scores"),
                        ([("run", "S1:7")], r"S1:7: seed not in params.yaml train.seeds"),
                        ([("run", "Q9:0")], "strategy 'Q9': not in params.yaml"),
                        ([("run", "S1:0"), ("run", "S1:0")], "run S1:0 given twice"),
                        ([("strategy", "S1"), ("strategy", "S1")], "run S1:0 given twice"),
                        ([("run", "S1:0"), ("strategy", "S1"), ("seed", "0")], "give --strategy"),
                        ([("strategy", "S1"), ("strategy", "S2"), ("seed", "0")], "give --strategy"),
                        ([("seed", "0")], "give --strategy"),
                        ([("strategy", "S1"), ("seed", "x")], "S1:x: seed not"),
                        ([], "give --strategy")]:
        if match is None:
            parse_runs(**cli_args(*argv), p=params)
        else:
            with pytest.raises(ValueError, match=match):
                parse_runs(**cli_args(*argv), p=params)


@pytest.mark.slow
def test_cli_trains_runs_together_as_the_single_form_would(tmp_path, repo_root, tiny_cifar):
    """`stages.train --run S1:0 --run S2:0` writes what `--strategy S2 --seed 0` writes, to rounding."""
    import subprocess
    import sys
    from test_pipeline import make_project, sh
    env = make_project(tmp_path, repo_root)
    env["CIFAR10_LOCAL"] = str(tiny_cifar)
    py = [sys.executable, "-m"]
    sh(py + ["stages.download"], tmp_path, env)
    sh(py + ["stages.distort"], tmp_path, env)
    sh(py + ["stages.train", "--strategy", "S2", "--seed", "0", "--models", "one", "--logs", "one_logs",
            "--checkpoints", "one_ck"], tmp_path, env)
    out = sh(py + ["stages.train", "--run", "S1:0", "--run", "S2:0"], tmp_path, env)
    assert "S1 seed 0 epoch 2/2" in out and "S2 seed 0 epoch 2/2" in out
    one, grouped = load(tmp_path / "one" / "S2" / "seed0.pt"), load(tmp_path / "models" / "S2" / "seed0.pt")
    assert one.keys() == grouped.keys() and one["params"] == grouped["params"]
    p = params_lib.load(tmp_path / "params.yaml")
    init = model.build(p.model, derive_seed(0, "init")).state_dict()
    for k, v in one["model"].items():
        close_after_training(grouped["model"][k], v, init[k])
    same_losses([r["loss"] for r in grouped["history"]], [r["loss"] for r in one["history"]], p.base.train_size)
    assert (tmp_path / "models" / "S1" / "seed0.pt").exists() and (tmp_path / "logs" / "S1" / "seed0.tsv").exists()
    # evaluate likewise: several strategies in one call write what one-strategy calls write
    sh(py + ["stages.corrupt"], tmp_path, env)
    sh(py + ["stages.evaluate", "--strategy", "S1", "--strategy", "S2"], tmp_path, env)
    sh(py + ["stages.evaluate", "--strategy", "S2", "--metrics", "one_m", "--predictions", "one_p"], tmp_path, env)
    assert (tmp_path / "metrics" / "S2.json").read_text() == (tmp_path / "one_m" / "S2.json").read_text()
    with np.load(tmp_path / "data/predictions/S2.npz") as a, np.load(tmp_path / "one_p/S2.npz") as b:
        assert np.array_equal(a["probs"], b["probs"])
    assert (tmp_path / "metrics" / "S1.json").is_file() and not (tmp_path / "one_m" / "S1.json").exists()
    # no --strategy: every strategy of params.yaml, in its order (S3 has no model here)
    r = subprocess.run(py + ["stages.evaluate", "--metrics", "all_m", "--predictions", "all_p"], cwd=tmp_path,
                       env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "models/S3/seed0.pt: no trained model" in r.stderr, r.stderr
    assert sorted(f.name for f in (tmp_path / "all_m").iterdir()) == ["S1.json", "S2.json"]
    r = subprocess.run(py + ["stages.train", "--run", "S1:0", "--run", "S3:0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "S3 (labels iqa_ls) needs --scores" in r.stderr
