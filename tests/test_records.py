"""The pipelines' records: a candidate's blocks name only their own kind's widths, its architecture the
widths it has."""

import dataclasses
import json

from compressor.budget import Budget
from compressor.config import MLP, MOE, OVERRIDABLE
from compressor.pipelines.ranking import candidate
from compressor.pipelines.records import SearchRecord, SourceInfo
from compressor.presets import get_preset
from compressor.target import Target

MOE_WIDTHS = ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")


def _per_block(source, widths: dict[int, int]) -> Target:
    """`source` kept whole but for the MLP blocks named in `widths` (source index: intermediate size)."""
    whole = Target.identity(source)
    blocks = tuple(
        dataclasses.replace(b, intermediate_size=widths[b.source]) if b.source in widths else b for b in whole.blocks
    )
    return Target(whole.hidden_size, blocks)


def _search_json(source, targets: list[Target]) -> dict:
    budget = Budget(params=10**12)
    candidates = [candidate(source, target, budget, index) for index, target in enumerate(targets)]
    record = SearchRecord(SourceInfo("model", "0" * 16, 1), budget, "minipuzzle", {}, {}, {}, "kl", candidates)
    written = json.loads(json.dumps(record.to_dict()))
    assert SearchRecord.from_dict(written) == record
    return written


def test_a_dense_search_record_names_no_moe_widths_and_each_block_its_own_kind():
    source = get_preset("tiny")
    assert not source.has_moe and source.count(MLP) >= 2
    mlp = [spec.index for spec in source.blocks if spec.kind == MLP]
    written = _search_json(source, [Target.identity(source), _per_block(source, {mlp[0]: 96})])
    for c in written["candidates"]:
        for block in c["target"]["blocks"]:
            assert set(block) == {"source", "kind", *OVERRIDABLE[block["kind"]]}, block
        assert not set(MOE_WIDTHS) & set(c["target"]["blocks"][0]) and "num_moe_experts" not in c["architecture"]


def test_the_architecture_of_a_per_block_candidate_lists_the_widths_that_differ():
    source = get_preset("tiny")
    mlp = [spec.index for spec in source.blocks if spec.kind == MLP]
    widths = {index: 96 - 32 * (position % 2) for position, index in enumerate(mlp)}  # 96, 64, 96, ...
    uniform, per_block = _search_json(source, [Target.identity(source), _per_block(source, widths)])["candidates"]
    assert uniform["architecture"]["uniform"] and uniform["architecture"]["ffn_hidden_size"] == source.intermediate_size
    assert not per_block["architecture"]["uniform"]
    assert per_block["architecture"]["ffn_hidden_size"] == [widths[index] for index in mlp]
    assert per_block["architecture"]["mamba_num_heads"] == source.mamba_num_heads  # the same in every block


def test_a_block_carries_only_its_kinds_widths_however_it_was_built():
    source = get_preset("tiny").replace(hybrid_override_pattern="M-E*", n_routed_experts=8, moe_intermediate_size=32)
    target = Target.identity(source)
    mlp = next(b for b in target.blocks if b.kind == MLP)
    moe = next(b for b in target.blocks if b.kind == MOE)
    assert mlp.n_routed_experts == mlp.moe_intermediate_size == 0 and mlp.intermediate_size > 0
    assert moe.intermediate_size == 0 and moe.n_routed_experts == 8
    # a record written when every block listed every kind's widths reads back to the same target
    dense = tuple(b for b in target.blocks if b.kind != MOE)
    earlier = {
        "hidden_size": target.hidden_size,
        "blocks": [{**dataclasses.asdict(b), "n_routed_experts": 7} for b in dense],
    }
    assert Target.from_dict(earlier).blocks == dense
