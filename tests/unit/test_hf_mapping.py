"""HF <-> Megatron tensor layouts, checked against layouts written out by hand."""

import pytest
import torch

from megacredit.megatron.hf_mapping import (
    AttentionShape,
    fuse_qkv,
    mapping_for,
    shard_for_rank,
    split_qkv,
    unshard,
)

SHAPE = AttentionShape(num_heads=4, num_query_groups=2, head_dim=3)
HIDDEN = 5


def _qkv():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(4 * 3, HIDDEN, generator=generator)
    k = torch.randn(2 * 3, HIDDEN, generator=generator)
    v = torch.randn(2 * 3, HIDDEN, generator=generator)
    return q, k, v


def test_fused_qkv_is_interleaved_per_query_group():
    q, k, v = _qkv()
    # Group g holds its 2 query heads, then its key head, then its value head.
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(fuse_qkv(q, k, v, SHAPE), expected)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(expected, SHAPE), (q, k, v)))


def test_qkv_bias_uses_the_same_layout():
    q, k, v = (t[:, 0].contiguous() for t in _qkv())
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(fuse_qkv(q, k, v, SHAPE), expected)


def test_tp_ranks_hold_whole_query_groups():
    q, k, v = _qkv()
    mapping = mapping_for("decoder.layers.0.self_attention.linear_qkv.weight", tied_embeddings=False)
    rank1 = shard_for_rank(mapping, [q, k, v], tp_rank=1, tp_size=2, padded_vocab=0, shape=SHAPE)
    assert torch.equal(rank1, torch.cat([q[6:12], k[3:6], v[3:6]]))


def test_gated_fc1_rank_holds_its_gate_then_its_up_slice():
    gate, up = torch.arange(8.0).reshape(4, 2), 100 + torch.arange(8.0).reshape(4, 2)
    mapping = mapping_for("decoder.layers.2.mlp.linear_fc1.weight", tied_embeddings=False)
    assert mapping.hf_names == ("model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight")
    shards = [shard_for_rank(mapping, [gate, up], r, 2, 0, SHAPE) for r in range(2)]
    assert torch.equal(shards[0], torch.cat([gate[:2], up[:2]]))
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))
    (_, gate_back), (_, up_back) = unshard(mapping, shards, vocab_size=0, shape=SHAPE)
    assert torch.equal(gate_back, gate) and torch.equal(up_back, up)


def test_vocab_rows_are_zero_padded_then_split_and_unpadded_on_export():
    table = torch.randn(5, 3)
    mapping = mapping_for("embedding.word_embeddings.weight", tied_embeddings=False)
    shards = [shard_for_rank(mapping, [table], r, 2, padded_vocab=8, shape=SHAPE) for r in range(2)]
    assert torch.equal(shards[0], table[:4])
    assert torch.equal(shards[1], torch.cat([table[4:], torch.zeros(3, 3)]))
    ((name, back),) = unshard(mapping, shards, vocab_size=5, shape=SHAPE)
    assert name == "model.embed_tokens.weight" and torch.equal(back, table)


def test_row_parallel_splits_input_columns():
    weight = torch.randn(4, 6)
    mapping = mapping_for("decoder.layers.1.self_attention.linear_proj.weight", tied_embeddings=False)
    assert mapping.hf_names == ("model.layers.1.self_attn.o_proj.weight",)
    assert torch.equal(shard_for_rank(mapping, [weight], 1, 2, 0, SHAPE), weight[:, 3:])


def test_tied_output_layer_reads_the_input_embedding():
    assert mapping_for("output_layer.weight", tied_embeddings=True).hf_names == ("model.embed_tokens.weight",)
    assert mapping_for("output_layer.weight", tied_embeddings=False).hf_names == ("lm_head.weight",)


def test_unknown_parameter_is_named():
    with pytest.raises(KeyError, match="decoder.layers.0.mlp.router.weight"):
        mapping_for("decoder.layers.0.mlp.router.weight", tied_embeddings=False)


def test_olmo3_post_norms_and_tp_sharded_qk_norms():
    post = mapping_for("decoder.layers.3.self_attention.linear_proj.post_layernorm.weight", False, "olmo3")
    assert post.hf_names == ("model.layers.3.post_attention_layernorm.weight",) and post.layout == "replicated"
    ffn = mapping_for("decoder.layers.3.mlp.linear_fc2.post_layernorm.weight", False, "olmo3")
    assert ffn.hf_names == ("model.layers.3.post_feedforward_layernorm.weight",)
    q_norm = mapping_for("decoder.layers.0.self_attention.q_layernorm.weight", False, "olmo3")
    weight = torch.arange(8.0)  # 4 query heads x head_dim 2: TP rank 1 holds heads 2 and 3
    assert q_norm.hf_names == ("model.layers.0.self_attn.q_norm.weight",)
    assert torch.equal(shard_for_rank(q_norm, [weight], 1, 2, 0, SHAPE), weight[4:])
    # Qwen3's per-head norm of the same name is replicated; OLMo-3 has no pre-norms at all.
    assert mapping_for("decoder.layers.0.self_attention.q_layernorm.weight", False, "qwen3").layout == "replicated"
    with pytest.raises(KeyError, match="of a olmo3 model"):
        mapping_for("decoder.layers.0.pre_mlp_layernorm.weight", False, "olmo3")
