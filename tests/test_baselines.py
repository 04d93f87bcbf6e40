"""Lifelong-learning baselines on sklearn digits: 5 two-class tasks, 64-D pixels as the "features"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from skill_edge.firmware_sim.baselines import (
    BASELINES,
    EWC,
    BaselineResult,
    ClassBalancedMemory,
    DERpp,
    GrowingLinearHead,
    MacMeter,
    Naive,
    ReservoirBuffer,
    TaskData,
    run_baseline,
)

EPOCHS = 10
DIM = 64
CPU = torch.device("cpu")


def digit_tasks() -> list[TaskData]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    tasks = []
    for t in range(5):
        digits = [2 * t, 2 * t + 1]
        tr, te = np.isin(y_tr, digits), np.isin(y_te, digits)
        tasks.append(
            TaskData(f"digits{digits[0]}{digits[1]}", x_tr[tr], y_tr[tr] - 2 * t, x_te[te], y_te[te] - 2 * t,
                     tuple(str(d) for d in digits))
        )
    return tasks


@pytest.fixture(scope="module")
def tasks() -> list[TaskData]:
    return digit_tasks()


@pytest.fixture(scope="module")
def results(tasks: list[TaskData]):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls; threads only add contention on a shared 2-core box
    yield {name: run_baseline(name, tasks, epochs=EPOCHS, lr=0.05, batch_size=32, seed=0) for name in BASELINES}
    torch.set_num_threads(threads)


def test_registry_has_the_requested_baselines() -> None:
    assert {"naive", "ewc", "er_10pc", "er_10k", "derpp"} <= set(BASELINES)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_result_shapes_and_eval_bookkeeping(name: str, results: dict[str, BaselineResult], tasks: list[TaskData]) -> None:
    r = results[name]
    assert [len(row) for row in r.acc_matrix] == [1, 2, 3, 4, 5]
    assert [len(row) for row in r.oracle_acc_matrix] == [1, 2, 3, 4, 5]
    for per_task in (r.train_macs, r.eval_macs, r.samples_processed, r.eval_samples, r.buffer_samples,
                     r.train_seconds, r.eval_seconds):
        assert len(per_task) == 5
    assert all(0.0 <= a <= 1.0 for row in r.acc_matrix for a in row)
    # every task is learned: right after task t, its own accuracy is high
    assert min(r.acc_matrix[t][t] for t in range(5)) > 0.85
    for t in range(5):
        n_test = sum(len(task.test_y) for task in tasks[: t + 1])
        assert r.eval_samples[t] == n_test
        assert r.eval_macs[t] == n_test * DIM * 2 * (t + 1)  # one forward through a head of 2(t+1) outputs
    assert r.final_mean_acc == pytest.approx(np.mean(r.acc_matrix[-1]))
    assert r.first_task_curve == [row[0] for row in r.acc_matrix]
    json.dumps(r.to_dict())  # the fleet report stores it as JSON


def test_naive_fine_tuning_forgets(results: dict[str, BaselineResult]) -> None:
    r = results["naive"]
    assert r.acc_matrix[0][0] > 0.95
    assert r.acc_matrix[-1][0] < 0.1  # task 0 is gone after four more tasks
    assert r.forgetting > 0.9
    assert r.final_mean_acc < 0.25  # only the last task survives
    # with a task oracle the old outputs still rank their own classes: the forgetting is the
    # new outputs outscoring old ones, i.e. class-incremental interference
    assert r.oracle_acc_matrix[-1][0] > 0.9


@pytest.mark.parametrize("name", ["er_10pc", "er_10k", "derpp"])
def test_rehearsal_forgets_much_less_than_naive(name: str, results: dict[str, BaselineResult]) -> None:
    naive, r = results["naive"], results[name]
    assert r.final_mean_acc > naive.final_mean_acc + 0.4
    assert r.acc_matrix[-1][0] > naive.acc_matrix[-1][0] + 0.5
    assert r.forgetting < naive.forgetting - 0.5


def test_buffers_hold_what_they_promise(results: dict[str, BaselineResult], tasks: list[TaskData]) -> None:
    assert results["er_10pc"].buffer_samples == [20, 40, 60, 80, 100]  # 10 per class, 2 classes per task
    seen = np.cumsum([len(t.train_y) for t in tasks])
    for name in ("er_10k", "derpp"):  # digits is small: the 10k reservoir keeps every sample seen
        assert results[name].buffer_samples == [min(10_000, int(n)) for n in seen]
    assert results["naive"].buffer_samples == [0] * 5


def test_joint_training_is_the_ceiling(results: dict[str, BaselineResult]) -> None:
    joint = results["joint"]
    assert joint.final_mean_acc > 0.9
    assert all(joint.final_mean_acc >= r.final_mean_acc for r in results.values())


def test_ewc_runs_and_differs_from_naive(results: dict[str, BaselineResult], tasks: list[TaskData]) -> None:
    ewc, naive = results["ewc"], results["naive"]
    assert ewc.hyperparameters["ewc_lambda"] == 100.0
    assert ewc.acc_matrix != naive.acc_matrix
    assert ewc.final_mean_acc > naive.final_mean_acc
    # exact cost on task 1: SGD as naive, + the penalty on 2 anchored outputs per step, + the Fisher pass
    n1, width = len(tasks[1].train_y), 4
    steps = EPOCHS * -(-n1 // 32)
    penalty = steps * 3 * 2 * (DIM + 1)
    fisher = n1 * DIM * width + n1 * DIM + n1 * DIM * width  # forward, x^2, g2^T x^2
    assert ewc.train_macs[1] == naive.train_macs[1] + penalty + fisher
    assert ewc.samples_processed[1] == naive.samples_processed[1] + n1


def _fit(head: GrowingLinearHead, strategy, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(head.parameters(), lr=lr)
    meter = MacMeter(head.dim)
    for _ in range(steps):
        loss = strategy.loss(head, x, y, meter)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_ewc_penalty_anchors_old_outputs(tasks: list[TaskData]) -> None:
    """Old outputs' weights drift far less under EWC than under naive fine-tuning."""
    drift = {}
    for name, strategy in {
        "naive": Naive(device=CPU, dim=DIM, rng=np.random.default_rng(0)),
        "ewc": EWC(ewc_lambda=100.0, device=CPU, dim=DIM, rng=np.random.default_rng(0)),
    }.items():
        gen = torch.Generator().manual_seed(0)
        head = GrowingLinearHead(DIM, CPU)
        head.grow(2, gen)
        x0, y0 = torch.from_numpy(tasks[0].train_x), torch.from_numpy(tasks[0].train_y)
        _fit(head, strategy, x0, y0, steps=100)
        strategy.end_task(head, x0, y0, MacMeter(DIM))
        before = head.weight[:2].detach().clone()
        head.grow(2, gen)
        x1, y1 = torch.from_numpy(tasks[1].train_x), torch.from_numpy(tasks[1].train_y) + 2
        _fit(head, strategy, x1, y1, steps=100)
        drift[name] = float((head.weight[:2].detach() - before).norm())
    assert drift["ewc"] < 0.5 * drift["naive"]


@pytest.mark.parametrize("fisher", ["empirical", "true"])
def test_ewc_fisher_matches_per_sample_gradients(fisher: str, tasks: list[TaskData]) -> None:
    """The closed-form diagonal Fisher equals the mean of squared per-sample log-likelihood gradients."""
    gen = torch.Generator().manual_seed(3)
    head = GrowingLinearHead(DIM, CPU)
    head.grow(4, gen)
    x = torch.from_numpy(tasks[0].train_x[:40])
    y = torch.from_numpy(tasks[0].train_y[:40])
    ewc = EWC(fisher=fisher, device=CPU, dim=DIM, rng=np.random.default_rng(0))
    ewc.end_task(head, x, y, MacMeter(DIM))

    expected_w = torch.zeros(4, DIM)
    expected_b = torch.zeros(4)
    for i in range(len(x)):
        log_p = F.log_softmax(head(x[i : i + 1]), dim=1)[0]
        labels = [(int(y[i]), 1.0)] if fisher == "empirical" else [(k, float(log_p[k].detach().exp())) for k in range(4)]
        for label, weight in labels:
            gw, gb = torch.autograd.grad(log_p[label], [head.weight, head.bias], retain_graph=True)
            expected_w += weight * gw**2
            expected_b += weight * gb**2
    torch.testing.assert_close(ewc.fisher_w, expected_w / len(x), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ewc.fisher_b, expected_b / len(x), rtol=1e-4, atol=1e-7)


def test_a_stiff_ewc_penalty_stays_stable_and_holds_the_old_task(tasks: list[TaskData]) -> None:
    """lr * lambda * F far above 2 diverges under SGD; Adam's bounded step keeps it finite."""
    stiff = run_baseline("ewc", tasks[:2], epochs=2, lr=0.05, ewc_lambda=10_000.0)
    naive = run_baseline("naive", tasks[:2], epochs=2, lr=0.05)
    # task 0's outputs stay pinned: its oracle accuracy survives task 1, at least as well as naive's
    assert stiff.oracle_acc_matrix[1][0] >= max(0.9, naive.oracle_acc_matrix[1][0])
    assert stiff.oracle_acc_matrix[1][1] > 0.9, "and the new task is still learned"


def test_derpp_logit_loss_uses_only_columns_that_existed_when_stored() -> None:
    gen = torch.Generator().manual_seed(0)
    head = GrowingLinearHead(8, CPU)
    head.grow(2, gen)
    x_old, x_new = torch.rand(16, 8, generator=gen), torch.rand(16, 8, generator=gen)
    y = torch.randint(0, 2, (16,), generator=gen)
    der = DERpp(alpha=0.7, beta=0.0, buffer_size=100, replay_batch_size=32, device=CPU, dim=8,
                rng=np.random.default_rng(0))
    with torch.no_grad():
        der.memory.offer(x_old, y, head(x_old))  # stored while the head had 2 outputs
        head.grow(3, gen)
        der.memory.offer(x_new, y, head(x_new))  # stored with all 5 outputs
    assert sorted(der.memory.logit_width[:32].tolist()) == [2] * 16 + [5] * 16

    def replay_term() -> float:  # the alpha * MSE part of the loss; beta = 0, so the rest is plain CE
        with torch.no_grad():
            return float(der.loss(head, x_new, y, MacMeter(8)) - F.cross_entropy(head(x_new), y))

    assert replay_term() == pytest.approx(0.0, abs=1e-6)
    delta = 0.5
    with torch.no_grad():
        head.bias[2:] += delta  # columns 2..4 have targets only in the 16 five-wide entries
    compared = 16 * 2 + 16 * 5  # logit entries that existed when stored
    assert replay_term() == pytest.approx(0.7 * 16 * 3 * delta**2 / compared, rel=1e-5)


def test_reservoir_buffer_is_uniform_and_keeps_logit_widths() -> None:
    buf = ReservoirBuffer(1000, 1, np.random.default_rng(0), store_logits=True)
    stream = torch.arange(10_000, dtype=torch.float32)[:, None]
    for start in range(0, 10_000, 37):
        chunk = stream[start : start + 37]
        width = 2 if start < 5000 else 4
        buf.offer(chunk, chunk[:, 0].long(), chunk.repeat(1, width))
    assert len(buf) == 1000 and buf.offered == 10_000
    kept = buf.x[:, 0].long()
    assert len(set(kept.tolist())) == 1000  # each offered sample at most once
    # every sample kept with probability 1000/10000: the first half holds ~500 of them (sd ~16)
    assert abs(int((kept < 5000).sum()) - 500) < 80
    widths = buf.logit_width
    # chunks starting before 5000 (the last one is 4995..5031) were offered with 2 logits, later ones with 4
    assert bool(((widths == 2) == (kept < 5032)).all()) and set(widths.tolist()) == {2, 4}
    assert bool((buf.logits[widths == 2, 2:] == 0).all())  # narrow entries are zero-padded


def test_class_balanced_memory_keeps_per_class_samples() -> None:
    mem = ClassBalancedMemory(10, 3, np.random.default_rng(0))
    mem.add_task(torch.rand(100, 3), torch.tensor([0] * 60 + [1] * 40))
    mem.add_task(torch.rand(25, 3), torch.tensor([2] * 20 + [3] * 5))
    assert len(mem) == 35
    assert torch.bincount(mem.y).tolist() == [10, 10, 10, 5]  # a class with 5 samples keeps all 5


def test_runs_are_deterministic_given_a_seed(tasks: list[TaskData]) -> None:
    a = run_baseline("derpp", tasks[:3], epochs=3, seed=7)
    b = run_baseline("derpp", tasks[:3], epochs=3, seed=7)
    c = run_baseline("derpp", tasks[:3], epochs=3, seed=8)
    assert a.acc_matrix == b.acc_matrix and a.train_macs == b.train_macs
    assert a.samples_processed == b.samples_processed
    assert a.acc_matrix != c.acc_matrix


def test_mac_counts(results: dict[str, BaselineResult], tasks: list[TaskData]) -> None:
    naive = results["naive"]
    for t, task in enumerate(tasks):
        n = len(task.train_y)
        assert naive.samples_processed[t] == EPOCHS * n
        assert naive.train_macs[t] == EPOCHS * n * 2 * DIM * 2 * (t + 1)  # forward + weight gradient
    # replay: from task 1 on, every minibatch brings a replay minibatch of its own size, or the
    # whole memory while it is smaller (20 samples after task 0)
    er = results["er_10pc"]
    steps1 = EPOCHS * -(-len(tasks[1].train_y) // 32)
    assert er.samples_processed[0] == naive.samples_processed[0]
    assert er.samples_processed[1] == naive.samples_processed[1] + steps1 * 20
    assert er.samples_processed[2] == 2 * naive.samples_processed[2]  # memory (40) >= any minibatch
    assert er.train_macs[2] == er.samples_processed[2] * 2 * DIM * 6
    # DER++ draws two buffer minibatches per step
    derpp = results["derpp"]
    assert derpp.samples_processed[1] == 3 * naive.samples_processed[1]
    # backbone MACs are charged once per sample forwarded through the head
    with_bb = run_baseline("er_10pc", tasks[:2], epochs=2, seed=0, backbone_macs_per_image=1_000)
    without = run_baseline("er_10pc", tasks[:2], epochs=2, seed=0)
    for t in range(2):
        assert with_bb.train_macs[t] - without.train_macs[t] == 1_000 * without.samples_processed[t]
        assert with_bb.eval_macs[t] - without.eval_macs[t] == 1_000 * without.eval_samples[t]


def test_bad_inputs_raise_clear_errors(tasks: list[TaskData]) -> None:
    t0 = tasks[0]
    with pytest.raises(ValueError, match="local indices"):
        TaskData("bad", t0.train_x, t0.train_y + 5, t0.test_x, t0.test_y, t0.classes)
    with pytest.raises(ValueError, match="one label per row"):
        TaskData("bad", t0.train_x, t0.train_y[:-1], t0.test_x, t0.test_y, t0.classes)
    with pytest.raises(ValueError, match="NaN"):
        TaskData("bad", np.full_like(t0.train_x, np.nan), t0.train_y, t0.test_x, t0.test_y, t0.classes)
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baseline("icarl", tasks)
    with pytest.raises(ValueError, match="rejected hyperparameters"):
        run_baseline("naive", tasks, ewc_lambda=3.0)
    narrow = TaskData("narrow", t0.train_x[:, :10], t0.train_y, t0.test_x[:, :10], t0.test_y, t0.classes)
    with pytest.raises(ValueError, match="10-D features"):
        run_baseline("naive", [t0, narrow])
