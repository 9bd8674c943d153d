"""The nodes' help pages (the frontend's node docs panel reads WEB_DIRECTORY/docs/<node id>.md): one page per node
the pack registers, naming every input of its schema, no page for a node it does not register, and the pages
served by the running host under /extensions/<the pack's folder>/docs/."""

from __future__ import annotations

import os
import urllib.request

import pytest

from harness.host import PACK_DIR
from harness.server import PACK_LINK_NAME


def docs_dir(pack) -> str:
    return os.path.join(PACK_DIR, os.path.normpath(pack.WEB_DIRECTORY), "docs")


def read_page(pack, node_id: str) -> str:
    with open(os.path.join(docs_dir(pack), f"{node_id}.md"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def schemas(pack) -> dict:
    """{node_id: io.Schema} of every node the pack registers (the NODES lists that Cones2Extension returns)."""
    out = {}
    for module in pack.nodes._node_modules():
        for cls in module.NODES:
            schema = cls.define_schema()
            assert schema.node_id not in out, f"{schema.node_id} is registered twice"
            out[schema.node_id] = schema
    assert out, "the pack registers no nodes"
    return out


def test_every_node_has_a_page_naming_its_inputs(pack, schemas):
    problems = []
    for node_id, schema in sorted(schemas.items()):
        path = os.path.join(docs_dir(pack), f"{node_id}.md")
        if not os.path.isfile(path):
            problems.append(f"{node_id}: no page {os.path.relpath(path, PACK_DIR)}")
            continue
        text = read_page(pack, node_id)
        if not text.startswith(f"# {schema.display_name}\n"):
            problems.append(f"{node_id}: the page does not start with '# {schema.display_name}'")
        missing = [i.id for i in schema.inputs if f"`{i.id}`" not in text]
        if missing:
            problems.append(f"{node_id}: inputs not mentioned as `name`: {', '.join(missing)}")
    assert not problems, "\n".join(problems)


def test_no_page_for_an_unregistered_node(pack, schemas):
    # a page is <node id>.md, or a folder <node id>/ of per-locale pages (en.md, zh.md, ...)
    entries = os.listdir(docs_dir(pack))
    ids = {os.path.splitext(e)[0] for e in entries if e.endswith(".md")}
    ids |= {e for e in entries if os.path.isdir(os.path.join(docs_dir(pack), e))}
    assert ids - set(schemas) == set(), f"pages for nodes the pack does not register: {sorted(ids - set(schemas))}"


def test_host_serves_the_pages(server, pack, schemas):
    info = server.get_json("/object_info")
    served = {k for k, v in info.items() if str(v.get("python_module", "")).endswith(PACK_LINK_NAME)}
    assert served == set(schemas), "the server registers other nodes of the pack than the in-process import"
    for node_id in ("Cones2LayoutGuidance", *sorted(set(schemas) - {"Cones2LayoutGuidance"})):
        url = f"{server.url}/extensions/{PACK_LINK_NAME}/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200, url
            assert r.read().decode("utf-8") == read_page(pack, node_id), url
