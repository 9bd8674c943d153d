"""The pack's example workflows (workflows/*.json, UI format) against the live server: listed as templates,
every node, widget value and link valid for the real node definitions, and the layout workflows (plus the
ControlNet/LoRA one and training, shortened) run to completion on the tiny SD1.5 checkpoint. The files the
workflows name (tiny LoRA and ControlNet, demo residuals, input images) come from harness/tiny_extras.py.

The Flux workflow is checked against a server with the tiny Flux bed (``flux_server``: the loaders list the
bed's files) and run there shortened, with its DualCLIPLoader swapped for the dev-only tiny loader (the
host's Flux text loader always builds the full T5-XXL); the Qwen-Image workflow likewise (``qwen_image_server``,
its CLIPLoader swapped for the dev-only tiny Qwen-Image loader)."""

from __future__ import annotations

import copy
import glob
import json
import os
import urllib.request

import pytest
from PIL import Image

from harness import tiny_extras
from harness.client import ComfyClient
from harness.server import PACK_LINK_NAME
from harness.ui_to_api import WorkflowError, check_workflow, to_api

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOW_DIR = os.path.join(REPO, "workflows")
EXAMPLES = ["train_residual", "two_subjects_layout", "layout_only", "mixed_controlnet_lora"]
FLUX_EXAMPLE = "flux_two_subjects_layout"
QWEN_EXAMPLE = "qwen_image_two_subjects_layout"
CHROMA_EXAMPLE = "chroma_two_subjects_layout"
PANEL = 256  # the workflows' Cones2AttentionMaps panel_size
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, f"{name}.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def extras(server, extras_files) -> dict[str, str]:
    """The tiny extras as installed in the session server's folders (see tests/conftest.py)."""
    return tiny_extras.install(extras_files, server)


@pytest.fixture(scope="module")
def info(client, extras) -> dict:
    return client.object_info()  # after the extras are installed, so the combos list them


def save_nodes(prompt: dict) -> dict[str, str]:
    """{SaveImage id: 'image' | 'maps'} by what feeds it."""
    out = {}
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            src = prompt[node["inputs"]["images"][0]]["class_type"]
            out[nid] = "maps" if src == "Cones2AttentionMaps" else "image"
    return out


def run_and_check(client, server, name: str, info: dict, n_subjects: int, size: int = 64,
                  prompt: dict | None = None, timeout: float = 300) -> dict:
    """Run the workflow (or ``prompt``, its API form as changed by the test); check that the image and the maps
    were written at their sizes; return the history entry."""
    prompt = to_api(load(name), info) if prompt is None else prompt
    saves = save_nodes(prompt)
    assert sorted(saves.values()) == ["image", "maps"], saves
    entry = client.run(prompt, timeout=timeout)
    for nid, kind in saves.items():
        files = client.output_files(entry, server.output_dir, node_id=nid)
        assert len(files) == 1 and os.path.isfile(files[0]), f"{name}: {kind} not written: {entry['outputs']}"
        with Image.open(files[0]) as im:
            if kind == "image":
                assert im.size == (size, size)
            else:  # one PANEL-high panel per subject, 4 px apart
                assert im.size == (n_subjects * PANEL + 4 * (n_subjects - 1), PANEL), f"{name}: maps {im.size}"
    return entry


def test_templates_are_listed_and_served(server, extras):
    on_disk = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
    assert set(EXAMPLES) | {FLUX_EXAMPLE, QWEN_EXAMPLE, CHROMA_EXAMPLE} <= set(on_disk)
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == on_disk, listed
    url = f"{server.url}/api/workflow_templates/{PACK_LINK_NAME}/two_subjects_layout.json"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert json.loads(r.read()) == load("two_subjects_layout")


def assert_valid(wf: dict, info: dict) -> dict:
    """Every node, widget value and link valid for the live node definitions; returns the API prompt."""
    types = {n["type"] for n in wf["nodes"]} - {"Note", "MarkdownNote"}
    assert types <= set(info), f"unknown node types: {types - set(info)}"
    assert all(n.get("mode", 0) == 0 for n in wf["nodes"]), "a node is muted or bypassed"
    assert check_workflow(wf, info) == []
    prompt = to_api(wf, info)
    assert {n["class_type"] for n in prompt.values()} == types
    return prompt


@pytest.mark.parametrize("name", EXAMPLES)
def test_workflow_is_valid_for_the_live_nodes(name, info):
    assert_valid(load(name), info)


def test_api_conversion_skips_seed_controls(info):
    """The frontend puts a fixed/randomize selector after every seed (also on nodes that do not ask for one,
    by the name 'seed'); the converter must skip it, or every later value shifts by one."""
    prompt = to_api(load("train_residual"), info)
    train = next(n["inputs"] for n in prompt.values() if n["class_type"] == "Cones2TrainResidual")
    assert (train["seed"], train["save_name"], train["mode"], train["subject"]) == (0, "my_dog", "paper", "dog")
    assert train["images"][1] == 0 and "image_folder" in train
    ks = next(n["inputs"] for n in to_api(load("two_subjects_layout"), info).values()
              if n["class_type"] == "KSampler")
    assert (ks["seed"], ks["steps"], ks["sampler_name"], ks["denoise"]) == (1, 3, "euler", 1)
    ks_ui = next(n for n in load("two_subjects_layout")["nodes"] if n["type"] == "KSampler")
    assert ks_ui["widgets_values"][1] == "fixed"  # the seed stays put, so tests and the demo are reproducible


def test_two_subjects_layout_runs(client, server, info):
    run_and_check(client, server, "two_subjects_layout", info, n_subjects=2)


def test_layout_only_runs(client, server, info):
    run_and_check(client, server, "layout_only", info, n_subjects=2)


def test_mixed_controlnet_lora_runs_and_applies_the_lora(client, server, info):
    before = server.log_text().count("lora key not loaded")
    run_and_check(client, server, "mixed_controlnet_lora", info, n_subjects=3)
    log = server.log_text()
    assert log.count("lora key not loaded") == before, "the host did not map every key of the tiny LoRA"
    assert "missing controlnet keys" not in log and "could not detect control model" not in log


def test_train_residual_runs_shortened(client, server, info):
    if "Cones2TrainResidual" not in info:  # a host without the training node's needs; never acceptable in CI
        (pytest.fail if IN_CI else pytest.skip)("Cones2TrainResidual is not registered")
    prompt = to_api(load("train_residual"), info)
    save_name = "cones2_wf_test_dog"
    target = os.path.join(server.models_dir("cones2_residuals"), f"{save_name}.safetensors")
    if os.path.exists(target):
        os.remove(target)
    for node in prompt.values():
        if node["class_type"] == "Cones2TrainResidual":
            # 'paper' mode copies and fine-tunes the full-size text encoder (about a minute on 2 CPU cores even
            # for 2 steps); 'fast' runs the same graph, images and saving in a few seconds.
            node["inputs"].update(steps=2, resolution=64, mode="fast", save_name=save_name)
    entry = client.run(prompt, timeout=300)
    assert os.path.isfile(target), f"no residual written: {entry['outputs']}"
    curve = client.output_files(entry, os.path.join(server.base, "temp"))  # PreviewImage writes to temp/
    assert len(curve) == 1 and os.path.isfile(curve[0])


@pytest.fixture(scope="module")
def flux_client(flux_server) -> ComfyClient:
    return ComfyClient(flux_server.url)


@pytest.fixture(scope="module")
def flux_info(flux_client) -> dict:
    return flux_client.object_info()  # the Flux server's loaders list the tiny bed's files


def by_class(prompt: dict, class_type: str) -> dict:
    """The inputs of the prompt's one node of ``class_type``."""
    found = [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"{len(found)} {class_type} nodes"
    return found[0]


def test_flux_workflow_is_valid_for_the_live_nodes(flux_server, flux_info):
    """Valid for the live node definitions, and a Flux graph as Flux users build it: UNETLoader with the
    transformer, DualCLIPLoader type flux (clip_l, t5xxl), 16-channel empty latents, FluxGuidance between
    Apply Residuals and Layout Guidance, KSampler at cfg 1; the loaders name the bed's files."""
    prompt = assert_valid(load(FLUX_EXAMPLE), flux_info)
    files = flux_server.flux_files
    assert by_class(prompt, "UNETLoader")["unet_name"] == files["unet"]
    clip = by_class(prompt, "DualCLIPLoader")
    assert (clip["clip_name1"], clip["clip_name2"], clip["type"]) == (files["clip_l"], files["t5"], "flux")
    assert by_class(prompt, "VAELoader")["vae_name"] == files["vae"]
    ks = by_class(prompt, "KSampler")
    assert (ks["cfg"], ks["sampler_name"], ks["scheduler"]) == (1.0, "euler", "simple")
    assert prompt[ks["latent_image"][0]]["class_type"] == "EmptySD3LatentImage"
    layout = by_class(prompt, "Cones2LayoutGuidance")
    flux_guidance = prompt[layout["conditioning"][0]]
    assert flux_guidance["class_type"] == "FluxGuidance"
    assert prompt[flux_guidance["inputs"]["conditioning"][0]]["class_type"] == "Cones2ApplyResiduals"
    assert layout["record_maps"] is True
    assert [b["subject"] for b in json.loads(layout["layout"])["boxes"]] == ["dog", "cat"]


def test_flux_two_subjects_layout_runs_on_the_tiny_bed(flux_server, flux_client, flux_info):
    """The Flux workflow, shortened (64x64, 2 steps), runs on the tiny bed: the image and the maps are written
    and the maps report names both subjects. The host's DualCLIPLoader would build the full T5-XXL for the
    bed's small T5, so this run swaps it for the dev-only loader of the same two files."""
    prompt = to_api(load(FLUX_EXAMPLE), flux_info)
    files = flux_server.flux_files
    for node in prompt.values():
        if node["class_type"] == "DualCLIPLoader":
            node.update(class_type="Cones2DevTinyFluxCLIPLoader",
                        inputs={"clip_l_name": node["inputs"]["clip_name1"], "t5_name": node["inputs"]["clip_name2"]})
            assert node["inputs"] == {"clip_l_name": files["clip_l"], "t5_name": files["t5"]}
        elif node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = run_and_check(flux_client, flux_server, FLUX_EXAMPLE, flux_info, n_subjects=2, prompt=prompt, timeout=600)
    maps_id = next(nid for nid, n in prompt.items() if n["class_type"] == "Cones2AttentionMaps")
    report = "\n".join(entry["outputs"][maps_id]["text"])
    subjects = [line.split("\t")[0] for line in report.splitlines()]
    assert subjects == ["dog", "cat"], report


@pytest.fixture(scope="module")
def qwen_client(qwen_image_server) -> ComfyClient:
    return ComfyClient(qwen_image_server.url)


@pytest.fixture(scope="module")
def qwen_info(qwen_client) -> dict:
    return qwen_client.object_info()  # the server's loaders list the tiny Qwen-Image bed's files


def test_qwen_image_workflow_is_valid_for_the_live_nodes(qwen_image_server, qwen_info):
    """Valid for the live node definitions, and a Qwen-Image graph as its users build it: UNETLoader, CLIPLoader
    type qwen_image, Apply Residuals straight into Layout Guidance (no FluxGuidance), a negative prompt, KSampler
    at real CFG; the loaders name the bed's files."""
    prompt = assert_valid(load(QWEN_EXAMPLE), qwen_info)
    files = qwen_image_server.qwen_image_files
    assert by_class(prompt, "UNETLoader")["unet_name"] == files["unet"]
    clip = by_class(prompt, "CLIPLoader")
    assert (clip["clip_name"], clip["type"]) == (files["llm"], "qwen_image")
    assert by_class(prompt, "VAELoader")["vae_name"] == files["vae"]
    ks = by_class(prompt, "KSampler")
    assert ks["cfg"] > 1 and prompt[ks["negative"][0]]["class_type"] == "CLIPTextEncode"
    layout = by_class(prompt, "Cones2LayoutGuidance")
    assert prompt[layout["conditioning"][0]]["class_type"] == "Cones2ApplyResiduals"
    assert not [n for n in prompt.values() if n["class_type"] == "FluxGuidance"]
    assert layout["record_maps"] is True
    assert [b["subject"] for b in json.loads(layout["layout"])["boxes"]] == ["dog", "cat"]


def test_qwen_image_two_subjects_layout_runs_on_the_tiny_bed(qwen_image_server, qwen_client, qwen_info):
    """The Qwen-Image workflow, shortened (64x64, 2 steps), runs on the tiny bed with its CLIPLoader swapped for
    the dev-only loader of the same file (CLIPLoader would build the full 28-layer LLM): the image and the maps
    are written and the maps report names both subjects."""
    prompt = to_api(load(QWEN_EXAMPLE), qwen_info)
    files = qwen_image_server.qwen_image_files
    for node in prompt.values():
        if node["class_type"] == "CLIPLoader":
            node.update(class_type="Cones2DevTinyQwenImageCLIPLoader", inputs={"llm_name": node["inputs"]["clip_name"]})
            assert node["inputs"] == {"llm_name": files["llm"]}
        elif node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = run_and_check(qwen_client, qwen_image_server, QWEN_EXAMPLE, qwen_info, n_subjects=2, prompt=prompt,
                          timeout=600)
    maps_id = next(nid for nid, n in prompt.items() if n["class_type"] == "Cones2AttentionMaps")
    report = "\n".join(entry["outputs"][maps_id]["text"])
    subjects = [line.split("\t")[0] for line in report.splitlines()]
    assert subjects == ["dog", "cat"], report


@pytest.fixture(scope="module")
def chroma_files(host_dir, flux_server) -> dict[str, str]:
    """The tiny Chroma bed (harness/tiny_chroma.py), built once, linked into the Flux server's model folders (one
    server with the dev nodes for both joint-attention beds); {name: file name as the loaders list it}."""
    from harness import tiny_chroma
    from harness.host import build

    return tiny_chroma.install(build(tiny_chroma.__file__, host_dir, out=tiny_chroma.default_cache_dir(),
                                     timeout=1200), flux_server)


@pytest.fixture(scope="module")
def chroma_info(flux_client, chroma_files) -> dict:
    return flux_client.object_info()  # after the Chroma files are linked, so the loaders list them


def test_chroma_workflow_is_valid_for_the_live_nodes(chroma_files, chroma_info):
    """Valid for the live node definitions, and a Chroma graph as Chroma users build it: UNETLoader, CLIPLoader
    type chroma (one T5-XXL file), no FluxGuidance (Apply Residuals straight into Layout Guidance), a negative
    prompt and real CFG; the loaders name the bed's files."""
    prompt = assert_valid(load(CHROMA_EXAMPLE), chroma_info)
    assert by_class(prompt, "UNETLoader")["unet_name"] == chroma_files["unet"]
    clip = by_class(prompt, "CLIPLoader")
    assert (clip["clip_name"], clip["type"]) == (chroma_files["t5"], "chroma")
    assert by_class(prompt, "VAELoader")["vae_name"] == chroma_files["vae"]
    assert not [n for n in prompt.values() if n["class_type"] == "FluxGuidance"]
    ks = by_class(prompt, "KSampler")
    assert ks["cfg"] > 1.0 and by_class(prompt, "CLIPTextEncode")["text"].strip()
    layout = by_class(prompt, "Cones2LayoutGuidance")
    assert prompt[layout["conditioning"][0]]["class_type"] == "Cones2ApplyResiduals"
    assert layout["record_maps"] is True
    assert [b["subject"] for b in json.loads(layout["layout"])["boxes"]] == ["dog", "cat"]


def test_chroma_two_subjects_layout_runs_on_the_tiny_bed(flux_server, flux_client, chroma_files, chroma_info):
    """The Chroma workflow, shortened (64x64, 2 steps), runs on the tiny bed with the maps of both subjects. The
    host's CLIPLoader would build the full T5-XXL around the bed's thin T5: swapped for the dev-only loader."""
    prompt = to_api(load(CHROMA_EXAMPLE), chroma_info)
    for node in prompt.values():
        if node["class_type"] == "CLIPLoader":
            node.update(class_type="Cones2DevTinyChromaCLIPLoader", inputs={"t5_name": node["inputs"]["clip_name"]})
            assert node["inputs"] == {"t5_name": chroma_files["t5"]}
        elif node["class_type"] == "EmptySD3LatentImage":
            node["inputs"].update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    entry = run_and_check(flux_client, flux_server, CHROMA_EXAMPLE, chroma_info, n_subjects=2, prompt=prompt,
                          timeout=900)
    maps_id = next(nid for nid, n in prompt.items() if n["class_type"] == "Cones2AttentionMaps")
    report = "\n".join(entry["outputs"][maps_id]["text"])
    assert [line.split("\t")[0] for line in report.splitlines()] == ["dog", "cat"], report


def test_checker_reports_broken_workflows(info):
    good = load("two_subjects_layout")
    assert check_workflow(good, info) == []
    by_type = {n["type"]: n for n in good["nodes"]}

    def broken(mutate):
        wf = copy.deepcopy(good)
        mutate(wf, {n["type"]: n for n in wf["nodes"]})
        return check_workflow(wf, info)

    def clip_into_model(wf, nodes):  # CheckpointLoader's CLIP output into KSampler.model
        ks = nodes["KSampler"]
        slot = next(i for i, inp in enumerate(ks["inputs"]) if inp["name"] == "model")
        link = next(lk for lk in wf["links"] if lk[3] == ks["id"] and lk[4] == slot)
        link[1], link[2], link[5] = nodes["CheckpointLoaderSimple"]["id"], 1, "CLIP"
    problems = broken(clip_into_model)
    assert any("CLIP" in p and "KSampler.model" in p for p in problems), problems

    problems = broken(lambda wf, nodes: nodes["VAEDecode"].update(type="NoSuchCones2Node"))
    assert any("unknown type NoSuchCones2Node" in p for p in problems), problems
    with pytest.raises(WorkflowError, match="unknown node type"):
        wf = copy.deepcopy(good)
        next(n for n in wf["nodes"] if n["type"] == "VAEDecode")["type"] = "NoSuchCones2Node"
        to_api(wf, info)

    problems = broken(lambda wf, nodes: nodes["CheckpointLoaderSimple"].update(widgets_values=["missing.safetensors"]))
    assert any("missing.safetensors" in p and "not one of the options" in p for p in problems), problems

    problems = broken(lambda wf, nodes: nodes["Cones2LoadResidual"]["widgets_values"].__setitem__(0, "nope.safetensors"))
    assert any("nope.safetensors" in p for p in problems), problems

    layout_id = by_type["Cones2LayoutGuidance"]["id"]
    problems = broken(lambda wf, nodes: nodes["Cones2LayoutGuidance"]["widgets_values"].__setitem__(1, 5.0))
    assert any(f"node {layout_id}.guidance_weight" in p for p in problems), problems

    def unplug_vae(wf, nodes):
        dec = nodes["VAEDecode"]
        slot = next(i for i, inp in enumerate(dec["inputs"]) if inp["name"] == "vae")
        lid = dec["inputs"][slot]["link"]
        dec["inputs"][slot]["link"] = None
        wf["links"] = [lk for lk in wf["links"] if lk[0] != lid]
    problems = broken(unplug_vae)
    assert any("'vae' is not connected" in p for p in problems), problems
