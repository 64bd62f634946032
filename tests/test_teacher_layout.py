"""`teacher.parallel`: a frozen teacher on its own TP/PP layout in the same job
(megatron_opcd/parallel.py `teacher_groups`, training/teacher_route.py).

The reference is the same run with the teacher in the student's layout: the same student and
teacher weights (layout-invariant initialisation), the same batch and rollouts (rollout seeds
depend on the student's DP rank only). Two train steps and an evaluation per case in one 2-rank
launch. Tolerance: both runs are float32 and differ only in the teacher's reduction order across
its TP ranks (and the routing, which copies); 1e-5 of the compared magnitudes bounds that, as the
issue asks.
"""

from __future__ import annotations

import pytest
import torch

from _train_fixtures import make_run
from _train_ranks import teacher_layouts
from megatron_opcd.errors import ConfigError
from megatron_opcd.training.config import load_train_config
from megatron_opcd.training.teacher_route import Layouts, blocks

TP2 = "teacher.parallel.tensor_model_parallel_size=2"
CASES = {
    # student TP=1 x DP=2: teacher shared (TP=1 x DP=2), at TP=2, at PP=2
    "s_dp2": ["parallel.tensor_model_parallel_size=1"],
    "s_dp2_t_tp2": ["parallel.tensor_model_parallel_size=1", TP2],
    "s_dp2_t_pp2": ["parallel.tensor_model_parallel_size=1", "teacher.parallel.pipeline_model_parallel_size=2"],
    # student TP=2: teacher shared (TP=2), at TP=1 x DP=2
    "s_tp2": ["parallel.tensor_model_parallel_size=2"],
    "s_tp2_t_dp2": ["parallel.tensor_model_parallel_size=2", "teacher.parallel.tensor_model_parallel_size=1"],
}
AGAINST = {"s_dp2_t_tp2": "s_dp2", "s_dp2_t_pp2": "s_dp2", "s_tp2_t_dp2": "s_tp2"}


def _off(a, b) -> float:
    """|a - b| relative to the magnitude compared (at least 1: weights of order 0.02 compare absolutely)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def test_teacher_on_its_own_layout_equals_the_shared_layout(run_ranks, tmp_path):
    cfg = str(make_run(tmp_path, steps=2, extra={"checkpoint.save": None}))
    per_rank = run_ranks(teacher_layouts, 2, cfg, list(CASES.values()), timeout=600)
    # A layout that does not divide the world: one line (checked in the same launch).
    assert [r["error"] for r in per_rank] == ["the teacher's layout TP x PP = 4 x 1 does not divide the world of 2 "
                                              "ranks; set teacher.parallel sizes whose product divides 2"] * 2
    runs = {name: [r["runs"][i] for r in per_rank] for i, name in enumerate(CASES)}
    bad = []  # every case's every failure, so a wrong route names all the layouts it breaks
    for case, ref_name in AGAINST.items():
        for g, r in zip(runs[case], runs[ref_name]):  # rank by rank: the same student layout
            pairs = [("loss", torch.tensor(g["loss"]), torch.tensor(r["loss"])),
                     ("eval KL", torch.tensor(g["eval_kl"]), torch.tensor(r["eval_kl"]))]
            pairs += [(n, g["weights"][n], w) for n, w in r["weights"].items()]
            bad += [(case, what, _off(a, b)) for what, a, b in pairs if _off(a, b) > 1e-5]
    assert not bad, bad


def _layouts(s_tp, s_dp, t_tp, t_dp, t_pp, v=200, s_pad=224, t_pad=256):
    coords = []
    for g in range(s_tp * s_dp):
        t, d, p = g % t_tp, (g // t_tp) % t_dp, g // (t_tp * t_dp)
        coords.append((g // s_tp, g % s_tp, d, t, p))
    return Layouts(tuple(coords), s_tp, s_dp, t_tp, t_dp, t_pp, s_pad // s_tp, t_pad // t_tp, v)


@pytest.mark.parametrize("sizes", [(1, 2, 2, 1, 1), (2, 1, 1, 2, 1), (1, 2, 1, 1, 2), (2, 2, 1, 4, 1),
                                   (1, 4, 2, 1, 2), (4, 1, 2, 2, 1)])
def test_routing_blocks_cover_every_student_slice_once(sizes):
    """Every (row, real column) of every student rank comes from exactly one teacher last stage
    whose share holds the row and whose slice holds the column; padded columns come from nobody."""
    lay = _layouts(*sizes)
    counts = [3, 2, 4, 1][:lay.s_dp]
    lengths = [5, 1, 3, 7, 2, 2, 6, 4, 1, 3][:sum(counts)]
    cover = {}
    for b in blocks(lay, counts, lengths):
        _, _, e, k, p = lay.coords[b.src]
        d, j = lay.coords[b.dst][:2]
        assert p == lay.t_pp - 1 and b.r == max(lengths[b.row0:b.row1])
        for row in range(b.row0, b.row1):
            for col in range(b.col0, b.col1):
                assert k * lay.t_part <= col < (k + 1) * lay.t_part and j * lay.s_part <= col < (j + 1) * lay.s_part
                key = (b.dst, row, col)
                assert key not in cover
                cover[key] = b.src
    starts = [sum(counts[:d]) for d in range(lay.s_dp)]
    for dst, (d, j, *_) in enumerate(lay.coords):
        want = {(dst, r, c) for r in range(starts[d], starts[d] + counts[d])
                for c in range(j * lay.s_part, min((j + 1) * lay.s_part, lay.vocab_size))}
        assert want == {k for k in cover if k[0] == dst}


def test_teacher_layout_config_errors(tmp_path):
    cfg = str(make_run(tmp_path))
    assert load_train_config(cfg, [TP2]).teacher_parallel.tensor_model_parallel_size == 2
    cases = {
        "teacher.parallel is for a frozen teacher": ["teacher.mode=self", TP2],
        "needs a student at parallel.pipeline_model_parallel_size=1": [TP2, "parallel.pipeline_model_parallel_size=2"],
        "set parallel.sequence_parallel=false": [TP2, "parallel.tensor_model_parallel_size=2",
                                                 "teacher.parallel.tensor_model_parallel_size=1",
                                                 "parallel.sequence_parallel=true"],
        "is for algorithm.name=opcd": [TP2, "algorithm.name=seqkd"],
        "teacher.parallel.tensor_model_parallel_size=3": ["teacher.parallel.tensor_model_parallel_size=3"],
        "must be >= 1": ["teacher.parallel.pipeline_model_parallel_size=0"],
    }
    for needle, overrides in cases.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
            load_train_config(cfg, overrides)


def test_shared_layout_is_the_students_own_config():
    from megatron_opcd.config import ParallelConfig
    from megatron_opcd.training.config import TeacherConfig, TeacherParallelConfig

    student = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    same = TeacherConfig(model=None, checkpoint="x", parallel=TeacherParallelConfig(tensor_model_parallel_size=2))
    assert same.layout(student) is student and not same.own_layout(student)
    own = TeacherConfig(checkpoint="x", parallel=TeacherParallelConfig(pipeline_model_parallel_size=2))
    layout = own.layout(student)
    assert own.own_layout(student) and (layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size,
                                        layout.sequence_parallel) == (2, 2, False)
