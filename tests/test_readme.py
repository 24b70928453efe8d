"""The README's node reference matches the nodes' schemas (regenerate: python -m tools.node_docs.node_reference)."""
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_node_reference_is_current(comfy):
    from tools.node_docs.node_reference import current_reference, updated_readme

    text = (REPO / "README.md").read_text()
    reference = current_reference()
    assert reference.strip(), "no nodes to document"
    assert updated_readme(text, reference) == text, (
        "README.md's node reference is stale: run `.venv/bin/python -m tools.node_docs.node_reference`")


def test_every_node_has_a_help_page_and_a_readme_section(comfy):
    from plugkit.nodes.extension import all_nodes

    text = (REPO / "README.md").read_text()
    for node in all_nodes():
        node_id = node.GET_SCHEMA().node_id
        assert (REPO / "js" / "docs" / f"{node_id}.md").is_file(), node_id
        assert f"(`{node_id}`)" in text, node_id
