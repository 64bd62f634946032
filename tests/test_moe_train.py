"""The trainer with mixture-of-experts models (issue 23): one OPCD step with an MoE teacher and
a dense student at EP2 equals EP1; an MoE student step at EP2 x DP2 (4 ranks) equals one process
(losses, load-balance metrics, updated weights, 1e-5); an MoE student with `teacher: self` and
`teacher: ema` at EP2 equals one process; a checkpoint at EP2 resumes exactly; the router's auxiliary loss is on for a student that
asks for it (it changes the update) and off for a frozen teacher.

Greedy rollouts (sampling seeds depend on the DP rank), fp32, Adam, one step, micro-batches of one
row (so the 4-rank run's micro-batches are the one process's).
"""

from __future__ import annotations

import pytest
import yaml

from _moe_ranks import join_weights, moe_train_steps
from _numerics import assert_f32_close
from _train_fixtures import make_run

MOE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
           vocab_size=200, make_vocab_size_divisible_by=32, max_position_embeddings=128, qk_layernorm=True,
           tie_embeddings=False, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=16)
DENSE = {k: v for k, v in MOE.items() if not k.startswith(("num_experts", "moe_"))}
EP2 = ["parallel.expert_model_parallel_size=2"]
SELF, EMA = ["teacher=self"], ["teacher={mode: ema, ema_decay: 0.5}"]
AUX = ["model.moe_aux_loss_coeff=0.01"]
MOE_METRICS = ("moe_aux_loss", "moe_expert_share_max", "moe_expert_share_min", "moe_expert_share_cv")


def _config(root, common: dict, model: dict, teacher: dict) -> str:
    path = make_run(root, steps=1, extra=common)
    cfg = yaml.safe_load(path.read_text())
    cfg["model"], cfg["teacher"] = model, teacher
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def runs(run_ranks, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    common = {"generation.greedy": True, "checkpoint.save": None, "logging.dir": str(root / "logs"),
              "schedule.micro_batch_size": 1, "optimizer.clip_grad": 100.0, "optimizer.adam_eps": 1e-6}
    # A frozen MoE teacher (its config asks for an aux loss: the builder turns it off) and a dense student
    moe_teacher = _config(root / "a", common, DENSE, {"model": dict(MOE, moe_aux_loss_coeff=0.01), "seed": 99})
    moe_student = _config(root / "b", common, MOE, {"model": dict(DENSE, hidden_size=48), "seed": 99})
    one = run_ranks(moe_train_steps, 1, [(moe_teacher, []), (moe_student, []), (moe_student, AUX),
                                         (moe_student, SELF), (moe_student, EMA)], timeout=400)[0]
    ckpt, two_steps = str(root / "ckpt_ep2"), ["schedule.steps=2"]
    two = run_ranks(moe_train_steps, 2, [(moe_teacher, EP2), (moe_student, EP2 + SELF), (moe_student, EP2 + EMA),
                                         (moe_student, EP2 + two_steps + [f"checkpoint.save={ckpt}"], 1),
                                         (moe_student, EP2 + two_steps + [f"checkpoint.load={ckpt}"], 1),
                                         (moe_student, EP2 + two_steps, 2)], timeout=400)
    four = run_ranks(moe_train_steps, 4, [(moe_student, EP2)], timeout=500)

    def case(ranks, i):
        return {"metrics": ranks[0][i]["metrics"], "weights": join_weights([r[i] for r in ranks]),
                "teacher_aux": ranks[0][i]["teacher_aux"], "student_aux": ranks[0][i]["student_aux"]}

    return {
        "teacher_ep1": case([one], 0), "student_ep1": case([one], 1), "student_aux": case([one], 2),
        "self_ep1": case([one], 3), "ema_ep1": case([one], 4),
        "teacher_ep2": case(two, 0), "self_ep2": case(two, 1), "ema_ep2": case(two, 2),
        "resumed_ep2": case(two, 4), "uninterrupted_ep2": case(two, 5),
        "student_ep2dp2": case(four, 0),
    }


def _assert_same(run: dict, ref: dict, metrics=("loss", "grad_norm")):
    for key in metrics:
        assert run["metrics"][0][key] == pytest.approx(ref["metrics"][0][key], rel=1e-5, abs=1e-7), key
    assert set(run["weights"]) == set(ref["weights"])
    for name, w in ref["weights"].items():
        assert_f32_close(run["weights"][name], w, msg=f"updated {name}")


@pytest.mark.parametrize("layout,ref", [("teacher_ep2", "teacher_ep1"), ("self_ep2", "self_ep1"),
                                        ("ema_ep2", "ema_ep1")])
def test_moe_step_at_ep2_equals_ep1(runs, layout, ref):
    """An MoE teacher (dense student), and an MoE student as its own or EMA teacher, at EP2."""
    _assert_same(runs[layout], runs[ref])


def test_moe_student_at_ep2_dp2_equals_one_process(runs):
    """4 ranks: EP2 x expert-DP2 (dense DP4): loss, grad norm, load-balance metrics and every
    updated weight, experts included, equal one process's."""
    ref = runs["student_ep1"]
    _assert_same(runs["student_ep2dp2"], ref, metrics=("loss", "grad_norm") + MOE_METRICS)
    experts = [n for n in ref["weights"] if ".local_experts." in n]
    assert len(experts) == 2 * 8 * 2


def test_moe_metrics_and_aux_loss(runs):
    """A student logs its routers' load balance; the aux loss is on where asked (the update
    changes: the router's weights move differently) and off for a frozen teacher."""
    m = runs["student_ep1"]["metrics"][0]
    assert set(MOE_METRICS) <= set(m)
    assert m["moe_aux_loss"] >= 1.0 - 1e-9  # E/(k T^2) sum P_i n_i is 1 when balanced, above otherwise
    assert 0.0 <= m["moe_expert_share_min"] <= 1 / 8 <= m["moe_expert_share_max"] <= 1.0
    assert "moe_aux_loss" not in runs["teacher_ep1"]["metrics"][0]  # a dense student: nothing to log
    assert runs["teacher_ep1"]["teacher_aux"] == 0.0 and runs["student_aux"]["student_aux"] == 0.01
    router = "decoder.layers.0.mlp.router.weight"
    moved = (runs["student_aux"]["weights"][router] - runs["student_ep1"]["weights"][router]).abs().max()
    assert moved > 1e-6, "the aux loss did not reach the router's update"
    assert runs["student_aux"]["metrics"][0]["loss"] == pytest.approx(m["loss"], rel=1e-6)  # logged loss: the distillation loss


def test_expert_lockstep_refuses_what_would_hang(tmp_path):
    """Under EP an MoE model's ranks must make the same forwards: per-row contexts, games and an
    evaluation that does not split over DP are one-line ConfigErrors (a dense model, or EP 1, passes)."""
    from megatron_opcd.errors import ConfigError
    from megatron_opcd.training.config import load_train_config
    from megatron_opcd.training.preflight import check_expert_lockstep

    cfg = load_train_config(str(make_run(tmp_path, steps=1)), ["evaluation.interval=1"])
    check_expert_lockstep(cfg, dp_size=2, ep_size=2, moe=True, num_eval=4)
    check_expert_lockstep(cfg, dp_size=2, ep_size=2, moe=False, num_eval=3)
    check_expert_lockstep(cfg, dp_size=2, ep_size=1, moe=True, num_eval=3)
    with pytest.raises(ConfigError, match="set evaluation.num_prompts to a multiple of 2"):
        check_expert_lockstep(cfg, dp_size=2, ep_size=2, moe=True, num_eval=3)
    cfg.context.selection = "random"
    with pytest.raises(ConfigError, match="needs context.selection=fixed"):
        check_expert_lockstep(cfg, dp_size=2, ep_size=2, moe=True, num_eval=4)


def test_moe_student_resumes_at_ep2(runs):
    """A trainer checkpoint of an MoE student at EP2 (weights, Adam state of every expert, the
    schedule) resumes: step 2 after a resume equals step 2 of an uninterrupted run."""
    resumed, full = runs["resumed_ep2"], runs["uninterrupted_ep2"]
    assert resumed["metrics"][0]["loss"] == pytest.approx(full["metrics"][1]["loss"], rel=1e-6)
    assert set(resumed["weights"]) == set(full["weights"])
    for name, w in full["weights"].items():
        assert_f32_close(resumed["weights"][name], w, msg=f"{name} after the resumed step")
