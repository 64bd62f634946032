"""Response alignment of packed rows (teacher and student line up token for token)."""

from __future__ import annotations

import torch

from megatron_opcd.data.packing import gather_response, pack, pack_segments


def test_teacher_and_student_rows_align_on_response_tokens():
    # Student: [prompt; response]; teacher: [context; prompt; response]. A fake "model" whose
    # logits at position p encode the token at p+1 shows which position predicts which token.
    prompts = [[5, 6, 7], [8]]
    responses = [[20, 21], [30, 31, 32]]
    context = [90, 91, 92, 93]
    s = pack(prompts, responses, pad_id=0)
    t = pack([context + p for p in prompts], responses, pad_id=0)

    def oracle(packed):  # [b, S, V]: one-hot of the next token at every position
        nxt = torch.roll(packed.tokens, -1, dims=1)
        return torch.nn.functional.one_hot(nxt, 100).float()

    ls, lt = gather_response(oracle(s), s), gather_response(oracle(t), t)
    assert torch.equal(s.response_mask, t.response_mask)
    m = s.response_mask.bool()
    assert torch.equal(ls.argmax(-1)[m], s.response_tokens[m])
    assert torch.equal(lt.argmax(-1)[m], t.response_tokens[m])
    assert s.response_tokens[:, 1].tolist() == [30, 31, 32]
    assert s.response_mask[:, 0].tolist() == [1, 1, 0]


def test_segments_train_only_marked_turns():
    # A transcript: obs (env), action (student), obs, action.
    rows = [[([1, 2], False), ([10, 11], True), ([3], False), ([12], True)]]
    p = pack_segments(rows)
    assert p.response_tokens[:, 0].tolist() == [10, 11, 12]
    assert p.response_index[:, 0].tolist() == [1, 2, 4]
    with_context = pack_segments([[([7, 7, 7], False)] + rows[0]])
    assert with_context.response_tokens[:, 0].tolist() == [10, 11, 12]
    assert with_context.response_index[:, 0].tolist() == [4, 5, 7]


def test_padding_and_masks():
    p = pack([[1, 2, 3, 4], [5]], [[6], [7, 8]], pad_id=0, pad_to_multiple=4)
    assert p.tokens.shape == (2, 8)
    assert p.lengths.tolist() == [5, 3]
    m = p.attention_mask[1, 0]  # row 1 has 3 real tokens
    assert not m[2, :3].any() and m[2, 3:].all()  # attends to its 3 tokens, not the padding
    assert m[0, 1]  # causal
