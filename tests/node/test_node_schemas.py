"""House rules for every node of the pack: ids, categories, tooltips, descriptions."""

from __future__ import annotations


def test_every_node_follows_the_house_rules(pack):
    from frozentune.nodes import NODE_CLASSES

    assert NODE_CLASSES, "the pack registers no node"
    ids = set()
    for cls in NODE_CLASSES:
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("FrozenTune"), schema.node_id
        assert schema.node_id not in ids, f"duplicate node id {schema.node_id}"
        ids.add(schema.node_id)
        assert schema.category.split("/")[0] == "FrozenTune", (schema.node_id, schema.category)
        assert schema.display_name and schema.description, schema.node_id
        for inp in schema.inputs:
            assert inp.tooltip, f"{schema.node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{schema.node_id} output {out.display_name} has no tooltip"
