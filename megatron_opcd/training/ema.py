"""`teacher.mode: ema`: the teacher is an exponential moving average of the student.

    teacher_0 = student_0                                    (the student's initial weights)
    teacher_n = d * teacher_{n-1} + (1 - d) * student_n      after each applied optimizer step n

with d = `teacher.ema_decay` (SDFT's EMA teacher; d = 0 is the live student, d -> 1 the frozen
initial weights). A skipped step (NaN/inf) updates nothing.

Sharding. The average is a second GPTModel built on the student's process groups, so each rank
holds exactly its model-parallel shard (TP columns/rows, PP stage) of the average, updated locally
from its shard of the student: no communication. It is *not* split further over data-parallel
ranks with the distributed optimizer, for a precise reason: every DP rank scores its own rollouts
with the teacher, so each needs the full model-parallel shard of the average during scoring,
which at PP = 1 runs inside the update's forward steps (the whole update). A DP-sharded average
would need an all-gather of the teacher's weights every step to score and would free that copy
only between updates; the full shard costs one fp32 model-parallel copy per rank (the same as a
frozen teacher of the student's size) and the update is a local axpy. After the optimizer step
the student's parameters are identical on every DP rank (the distributed optimizer all-gathers
them), so every DP replica computes the same average.

Precision. The average is kept, and the teacher scores, in fp32 whatever the student's dtype: in
bf16, `(1 - d) * (student - teacher)` with d = 0.99 is below bf16's relative resolution (2^-8) for
most weights and would round away; an fp32 model is 4 bytes a parameter, less than a bf16
teacher plus an fp32 shadow (6).

Checkpoints hold it as `teacher_ema/model/` (dist_checkpointing, like the student's model/), so a
resume restores it bit for bit (tests/test_teacher_ema.py).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_opcd.checkpointing import unwrap


def ema_model_config(model_config):
    """The student's architecture with fp32 parameters (see Precision above)."""
    return dataclasses.replace(model_config, params_dtype="fp32")


class EMATeacher:
    """Keeps `teacher`'s parameters the moving average of `student`'s (both this rank's shards)."""

    def __init__(self, student, teacher, decay: float):
        self.decay = float(decay)
        self.teacher = teacher
        s, t = dict(unwrap(student).named_parameters()), dict(teacher.named_parameters())
        if s.keys() != t.keys():
            raise RuntimeError(f"the EMA teacher's parameters differ from the student's: {sorted(s.keys() ^ t.keys())[:3]}")
        self.pairs = [(t[name], s[name]) for name in s]
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """teacher <- student (the start of the average)."""
        for t, s in self.pairs:
            t.copy_(s.detach())  # in place: the teacher's own parameter storage, its dtype

    @torch.no_grad()
    def update(self) -> None:
        """teacher <- d teacher + (1 - d) student, in fp32, after an applied optimizer step."""
        d = self.decay
        for t, s in self.pairs:
            t.mul_(d).add_(s.detach().to(t.dtype), alpha=1.0 - d)  # in place: the average is the teacher's weights
