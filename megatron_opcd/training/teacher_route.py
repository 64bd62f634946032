"""A frozen teacher on its own TP/PP layout (`teacher.parallel`): rows to its ranks, logits back.

The student runs at TP_s x DP_s (PP = 1), the teacher on its own groups at TP_t x PP_t x DP_t
over the same world (`parallel.teacher_groups`). One micro-batch is scored in three moves, on
every rank together (inside the student's forward step, as the shared layout's scoring is):

    1. rows    every student DP replica's teacher rows (token ids, contexts: a few KB) are
               all-gathered as objects; in replica order they form the micro-batch's global row
               list, and teacher DP replica e scores the e-th contiguous share of it (`dp_share`)
    2. score   the teacher ranks run `generation.score` on their share (its shared prefix
               prefilled once, `TeacherPrefix` on the teacher's groups): the one scoring path
    3. logits  each last-stage teacher rank (e, k) holds `[R_e, b_e, V_t/TP_t]`, rows of its share
               and vocabulary columns of its TP rank; it sends every student rank (d, j) the block
               of rows in both its share and replica d and columns in both its slice and the
               student's slice j (point-to-point, posted all at once). No rank ever holds more
               than its own vocabulary slice: student rank (d, j) ends with `[R_d, b, V_s/TP_s]`,
               the student's sharding, and the loss runs unchanged.

Rows past a response's end are not sent (junk in either layout: the mask hides them) and columns
past the real vocabulary (each layout pads it to its own multiple) are zero: the loss masks both.
The plan of step 3 (`blocks`) is a pure function of the layouts and the response lengths, which
every rank knows after step 1, so no shapes travel.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_opcd.parallel import ParallelGroups, dp_share


@dataclass(frozen=True)
class Block:
    """One message: rows [row0, row1) of the global row list, vocabulary columns [col0, col1),
    response positions [0, r), from global rank `src` (a teacher last stage) to `dst`."""

    src: int
    dst: int
    row0: int
    row1: int
    col0: int
    col1: int
    r: int


@dataclass(frozen=True)
class Layouts:
    """Where every global rank sits in both layouts (`coords[g] = (s_dp, s_tp, t_dp, t_tp, t_pp)`)
    and each layout's (padded) vocabulary slice width."""

    coords: tuple
    s_tp: int
    s_dp: int
    t_tp: int
    t_dp: int
    t_pp: int
    s_part: int
    t_part: int
    vocab_size: int


def blocks(lay: Layouts, rows_per_replica: list[int], response_lengths: list[int]) -> list[Block]:
    """The messages of one micro-batch (step 3 of the module docstring). `rows_per_replica[d]`
    rows come from student replica d, in replica order; `response_lengths` per global row."""
    n = sum(rows_per_replica)
    starts = [sum(rows_per_replica[:d]) for d in range(lay.s_dp)]
    out = []
    for src, (_, _, e, k, p) in enumerate(lay.coords):
        if p != lay.t_pp - 1:
            continue  # only the teacher's last stage has logits
        share = dp_share(n, e, lay.t_dp)
        t0, t1 = k * lay.t_part, min((k + 1) * lay.t_part, lay.vocab_size)
        for dst, (d, j, _, _, _) in enumerate(lay.coords):
            row0, row1 = max(share.start, starts[d]), min(share.stop, starts[d] + rows_per_replica[d])
            col0, col1 = max(t0, j * lay.s_part), min(t1, (j + 1) * lay.s_part, lay.vocab_size)
            if row0 >= row1 or col0 >= col1:
                continue
            out.append(Block(src, dst, row0, row1, col0, col1, max(1, max(response_lengths[row0:row1]))))
    return out


def _concat(views: list):
    """One TeacherRows of several (the fields that are lists are joined; None stays None)."""
    first = views[0]
    joined = {}
    for f in dataclasses.fields(first):
        values = [getattr(v, f.name) for v in views]
        joined[f.name] = None if values[0] is None else [x for v in values for x in v]
    return type(first)(**joined)


def _take(view, rows: slice):
    return type(view)(**{f.name: (None if getattr(view, f.name) is None else getattr(view, f.name)[rows])
                         for f in dataclasses.fields(view)})


class RoutedTeacher:
    """Scores TeacherRows of the student's micro-batches with a teacher on its own groups; call on
    every rank of the world with this rank's view, get this student rank's `[R, b, V_s/TP_s]`."""

    def __init__(self, model, *, student: ParallelGroups, teacher: ParallelGroups, prefixes,
                 vocab_size: int, student_padded: int, teacher_padded: int, pad_id: int, dtype: torch.dtype):
        self.model = model
        self.student, self.teacher = student, teacher
        self.prefixes = prefixes  # a TeacherPrefix on the teacher's groups
        self.vocab_size, self.pad_id, self.dtype = vocab_size, pad_id, dtype
        mine = torch.tensor([student.dp_rank, student.tp_rank, teacher.dp_rank, teacher.tp_rank, teacher.pp_rank])
        table = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(table, mine)  # once: every rank's place in both layouts
        self.layouts = Layouts(
            coords=tuple(tuple(int(x) for x in c) for c in table), s_tp=student.tp_size, s_dp=student.dp_size,
            t_tp=teacher.tp_size, t_dp=teacher.dp_size, t_pp=teacher.pp_size,
            s_part=student_padded // student.tp_size, t_part=teacher_padded // teacher.tp_size,
            vocab_size=vocab_size,
        )

    def __call__(self, view) -> torch.Tensor:
        from megatron_opcd.generation import score

        lay, me = self.layouts, dist.get_rank()
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, view if self.student.tp_rank == 0 else None)  # 1. rows
        first = {d: g for g, (d, j, *_) in reversed(list(enumerate(lay.coords))) if j == 0}
        views = [gathered[first[d]] for d in range(lay.s_dp)]
        counts = [len(v.responses) for v in views]
        rows = _concat(views)
        lengths = [len(r) for r in rows.responses]
        n = len(lengths)
        share = dp_share(n, self.teacher.dp_rank, self.teacher.dp_size)

        logits = None  # 2. score: [R_e, b_e, V_t/TP_t] on the teacher's last stage
        if share.stop > share.start:
            part = _take(rows, share)
            prefix = self.prefixes.tokens(part.starts, part.contexts)
            logits = score(self.model, **part.without_prefix(len(prefix)), groups=self.teacher,
                           prefix=self.prefixes.cache(self.model, prefix), vocab_size=self.vocab_size,
                           pad_id=self.pad_id).logits

        # 3. logits: this student rank's rows x its vocabulary slice, assembled from the blocks.
        d, j = lay.coords[me][0], lay.coords[me][1]
        device = next(self.model.parameters()).device
        start = sum(counts[:d])
        out = torch.zeros(max(1, max(lengths[start:start + counts[d]], default=1)), counts[d], lay.s_part,
                          dtype=self.dtype, device=device)  # [R_d, b, V_s/TP_s]; padded columns stay 0
        plan = blocks(lay, counts, lengths)
        k0 = lay.coords[me][3] * lay.t_part
        ops, placed = [], []
        for b in plan:
            if b.dst == me and b.src != me:
                buf = torch.empty(b.r, b.row1 - b.row0, b.col1 - b.col0, dtype=self.dtype, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, b.src))
                placed.append((b, buf))
            elif b.src == me:
                piece = logits[:b.r, b.row0 - share.start:b.row1 - share.start, b.col0 - k0:b.col1 - k0]
                if b.dst == me:
                    placed.append((b, piece))
                else:
                    ops.append(dist.P2POp(dist.isend, piece.contiguous(), b.dst))
        # One batch of every send and receive (NCCL runs them as one group call: no ordering deadlock).
        for work in (dist.batch_isend_irecv(ops) if ops else []):
            work.wait()
        for b, buf in placed:
            out[:b.r, b.row0 - start:b.row1 - start, b.col0 - j * lay.s_part:b.col1 - j * lay.s_part] = buf
        return out

