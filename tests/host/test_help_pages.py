"""The nodes' help pages (the frontend's node docs panel reads WEB_DIRECTORY/docs/<node id>.md): one page per node
the pack registers, naming every input of its schema and every model family the node supports, no page for a
node it does not register, and the pages served by the running host under /extensions/<the pack's folder>/docs/.

Which families a node supports it declares itself (``SUPPORTED_FAMILIES``, keys of cones2_core.families.FAMILIES);
its description and tooltips must agree with that declaration, so neither can fall behind the other."""

from __future__ import annotations

import os
import re
import urllib.request

import pytest

from comfyui_cones2.cones2_core.families import FAMILIES
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


@pytest.fixture(scope="module")
def node_classes(pack) -> dict:
    return {cls.define_schema().node_id: cls for module in pack.nodes._node_modules() for cls in module.NODES}


def families_named(text: str) -> set[str]:
    """The keys of the families whose display name ('SD1.5', 'SD2.x', 'SDXL', 'Flux') stands in ``text`` as a word
    of its own ('Flux's' counts, 'FluxGuidance' does not)."""
    return {key for key, f in FAMILIES.items()
            if re.search(rf"(?<![\w.]){re.escape(f.name)}(?![\w]|\.\w)", text)}


def schema_text(schema) -> str:
    """The node's description and every input's and output's tooltip: what ComfyUI shows of the node."""
    parts = [schema.description or ""]
    parts += [getattr(i, "tooltip", None) or "" for i in schema.inputs]
    parts += [getattr(o, "tooltip", None) or "" for o in schema.outputs]
    return "\n".join(parts)


def family_problems(node_id: str, declared, page: str, schema) -> list[str]:
    """What a page and a schema get wrong about the families a node declares it supports."""
    problems = []
    unknown = sorted(set(declared) - set(FAMILIES))
    if unknown:
        problems.append(f"{node_id}: SUPPORTED_FAMILIES names unknown families {unknown}; use keys of "
                        f"cones2_core.families.FAMILIES {sorted(FAMILIES)}")
    missing = [FAMILIES[k].name for k in declared if k in FAMILIES and k not in families_named(page)]
    if missing:
        problems.append(f"{node_id}: the help page does not name the supported families {missing}")
    named = families_named(schema_text(schema))
    if named - set(declared):
        problems.append(f"{node_id}: the tooltips name {sorted(named - set(declared))}, which SUPPORTED_FAMILIES "
                        "does not declare")
    if named and set(declared) - named:
        problems.append(f"{node_id}: the tooltips list families but not {sorted(set(declared) - named)}")
    return problems


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


def test_every_page_names_the_families_its_node_supports(pack, schemas, node_classes):
    problems = []
    for node_id, schema in sorted(schemas.items()):
        declared = getattr(node_classes[node_id], "SUPPORTED_FAMILIES", None)
        if not declared:
            problems.append(f"{node_id}: the node class declares no SUPPORTED_FAMILIES")
            continue
        problems += family_problems(node_id, declared, read_page(pack, node_id), schema)
    assert not problems, "\n".join(problems)


def test_a_page_or_tooltip_that_omits_a_family_is_caught(pack, schemas, node_classes):
    """The check above fails on the pages as they were before Flux was added to them, and on a declaration that
    lags behind the tooltips."""
    schema = schemas["Cones2LayoutGuidance"]
    declared = node_classes["Cones2LayoutGuidance"].SUPPORTED_FAMILIES
    page = read_page(pack, "Cones2LayoutGuidance")
    assert family_problems("g", declared, page, schema) == []
    no_flux = re.sub(r"Flux(?!Guidance)", "F-l-u-x", page)
    assert family_problems("g", declared, no_flux, schema) == ["g: the help page does not name the supported "
                                                               "families ['Flux']"]
    assert family_problems("g", ("sd1", "sd2", "sdxl"), page, schema) == [
        f"g: the tooltips name {sorted(set(FAMILIES) - {'sd1', 'sd2', 'sdxl'})}, which SUPPORTED_FAMILIES does not "
        "declare"]
    assert family_problems("g", (*declared, "sd9"), page, schema)[0].startswith("g: SUPPORTED_FAMILIES names unknown")
    assert families_named("FluxGuidance and SD1.5's CLIP, SD2.xl") == {"sd1"}


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
