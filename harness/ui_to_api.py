"""Convert a UI-format workflow (what the ComfyUI frontend saves) to an API-format prompt, using the live
server's /object_info for the input order, as the frontend's graphToPrompt does. Used by the workflow tests
and the demo; validates the graph on the way (unknown node types, bad links, missing values)."""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


class WorkflowError(ValueError):
    pass


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    """Whether the frontend puts a "control after generate" selector (fixed/randomize/...) after this widget in
    widgets_values: when the input asks for one, or (legacy convention, kept by frontend 1.27) when it is an
    INT named seed or noise_seed and does not say control_after_generate: false."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    flag = opts.get("control_after_generate")
    if flag is None:
        return spec[0] == "INT" and name in ("seed", "noise_seed")
    return bool(flag)


def input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the frontend lays out its widgets."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def _types_match(out_type, in_type) -> bool:
    """The host's rule (comfy_execution.validation): '*' matches anything, else comma-separated type sets
    must intersect; a combo input takes a COMBO output."""
    if isinstance(in_type, list):
        return out_type == "COMBO"
    if not isinstance(out_type, str) or not isinstance(in_type, str):
        return False
    if "*" in (out_type, in_type) or out_type == in_type:
        return True
    return bool(set(out_type.split(",")) & set(in_type.split(",")))


def to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) in (2, 4):
            raise WorkflowError(f"node {node['id']} ({ntype}) is muted or bypassed; this converter runs every node")
        info = object_info.get(ntype)
        if info is None:
            raise WorkflowError(f"node {node['id']}: unknown node type {ntype!r} (is its pack installed?)")
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in input_specs(info):
            if name in linked:
                link = links.get(linked[name])
                if link is None:
                    raise WorkflowError(f"node {node['id']} ({ntype}).{name}: link {linked[name]} is not in the links")
                inputs[name] = [str(link[1]), link[2]]
                if _is_widget(spec) and values:  # a widget converted to an input keeps its slot in widgets_values
                    values.pop(0)
                    if _has_control(name, spec) and values:
                        values.pop(0)
                continue
            if not _is_widget(spec):
                continue
            if not values:
                raise WorkflowError(f"node {node['id']} ({ntype}): no value for widget {name!r}")
            inputs[name] = values.pop(0)
            if _has_control(name, spec) and values:
                values.pop(0)  # the "fixed"/"randomize" selector after a seed
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs}
    return prompt


def check_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems of a UI workflow against the live node definitions: unknown types, invalid widget values,
    links whose types disagree. Returns a list of messages (empty when valid)."""
    problems = []
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow.get("links", []):
        lid, src, src_slot, dst, dst_slot, ltype = link[:6]
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid} joins missing nodes {src} -> {dst}")
            continue
        s_info, d_info = object_info.get(nodes[src]["type"]), object_info.get(nodes[dst]["type"])
        if s_info is None or d_info is None:
            continue
        dst_inputs = nodes[dst].get("inputs") or []
        if not 0 <= src_slot < len(s_info["output"]) or not 0 <= dst_slot < len(dst_inputs):
            problems.append(f"link {lid}: slot {src_slot} of {nodes[src]['type']} or slot {dst_slot} of "
                            f"{nodes[dst]['type']} does not exist")
            continue
        out_type = s_info["output"][src_slot]
        in_name = dst_inputs[dst_slot]["name"]
        specs = dict(input_specs(d_info))
        if in_name not in specs:
            problems.append(f"link {lid}: {nodes[dst]['type']} has no input {in_name!r}")
            continue
        in_type = specs[in_name][0]
        if not _types_match(out_type, in_type):
            problems.append(f"link {lid}: {nodes[src]['type']} output {out_type} -> {nodes[dst]['type']}.{in_name} "
                            f"({in_type})")
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if node["type"] in FRONTEND_ONLY:
            continue
        if info is None:
            problems.append(f"node {node['id']}: unknown type {node['type']}")
            continue
        try:
            api = to_api({"nodes": [node], "links": workflow.get("links", [])}, object_info)[str(node["id"])]
        except WorkflowError as e:
            problems.append(str(e))
            continue
        specs = dict(input_specs(info))
        required = (info.get("input_order") or {}).get("required") or list(info["input"].get("required", {}))
        for name in required:
            if name not in api["inputs"]:
                problems.append(f"node {node['id']} ({node['type']}): required input {name!r} is not connected")
        for name, value in api["inputs"].items():
            if isinstance(value, list):
                continue
            kind, opts = specs[name][0], (specs[name][1] if len(specs[name]) > 1 else {})
            choices = kind if isinstance(kind, list) else opts.get("options") if kind == "COMBO" else None
            if choices is not None and value not in choices:
                problems.append(f"node {node['id']} ({node['type']}).{name}: {value!r} is not one of the options")
            elif kind in ("INT", "FLOAT"):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    problems.append(f"node {node['id']}.{name}: {value!r} is not a number")
                elif ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
                    problems.append(f"node {node['id']}.{name}: {value} outside {opts.get('min')}..{opts.get('max')}")
            elif kind == "BOOLEAN" and not isinstance(value, bool):
                problems.append(f"node {node['id']}.{name}: {value!r} is not a boolean")
            elif kind == "STRING" and not isinstance(value, str):
                problems.append(f"node {node['id']}.{name}: {value!r} is not text")
    return problems
