"""The pack's example workflows (workflows/*.json, UI format) against the live server: listed as templates,
every node, widget value and link valid for the real node definitions, and the layout workflows (plus the
ControlNet/LoRA one and training, shortened) run to completion on the tiny SD1.5 checkpoint. The files the
workflows name (tiny LoRA and ControlNet, demo residuals, input images) come from harness/tiny_extras.py.

The other families' workflows (Flux, SD3.5, Qwen-Image, Wan, ...) are rows of one table, ``FAMILY_WORKFLOWS``:
each names the real files a user downloads, and the row says which of its bed's files stands in for each, what
the graph must look like, which dev-only loader the run swaps in (the host's text loaders would build the full
T5-XXL / LLM around the beds' small encoders) and how the run is shortened. All of them are checked and run in
one server that has every bed installed (conftest ``beds_server``)."""

from __future__ import annotations

import copy
import glob
import json
import os
import urllib.request
from dataclasses import dataclass, field

import pytest
from PIL import Image

from harness import tiny_extras
from harness.client import ComfyClient
from harness.server import PACK_LINK_NAME
from harness.ui_to_api import WorkflowError, check_workflow, to_api

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOW_DIR = os.path.join(REPO, "workflows")
EXAMPLES = ["train_residual", "two_subjects_layout", "layout_only", "mixed_controlnet_lora"]
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


def run_and_check(client, server, name: str, info: dict, n_subjects: int, size: int | tuple = 64,
                  prompt: dict | None = None, timeout: float = 300, frames: int = 1, maps_frames: int = 1) -> dict:
    """Run the workflow (or ``prompt``, its API form as changed by the test); check that the image (``frames``
    files: a video's SaveImage writes each frame) and the maps (a video's panels: a strip of ``maps_frames``
    latent frames) were written at their sizes; return the history entry."""
    prompt = to_api(load(name), info) if prompt is None else prompt
    width, height = (size, size) if isinstance(size, int) else size
    saves = save_nodes(prompt)
    assert sorted(saves.values()) == ["image", "maps"], saves
    entry = client.run(prompt, timeout=timeout)
    for nid, kind in saves.items():
        files = client.output_files(entry, server.output_dir, node_id=nid)
        count = frames if kind == "image" else 1
        assert len(files) == count and all(map(os.path.isfile, files)), \
            f"{name}: {len(files)} {kind} files, not {count}: {entry['outputs']}"
        for path in files:
            with Image.open(path) as im:
                if kind == "image":
                    assert im.size == (width, height), f"{name}: image {im.size}"
                else:  # one PANEL-high panel per subject (a video's: one per latent frame, stacked), 4 px apart
                    pw = round(PANEL * width / height)
                    assert im.size == (n_subjects * pw + 4 * (n_subjects - 1), PANEL * maps_frames), \
                        f"{name}: maps {im.size}"
    return entry


def test_templates_are_listed_and_served(server, extras):
    on_disk = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
    # every workflow is tested: an SD one here, a family one as a row of FAMILY_WORKFLOWS
    assert sorted(EXAMPLES + [fw.name for fw in FAMILY_WORKFLOWS]) == on_disk
    assert len({fw.family for fw in FAMILY_WORKFLOWS}) == len(FAMILY_WORKFLOWS)
    listed = server.get_json("/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == on_disk, listed
    for name in on_disk:
        url = f"{server.url}/api/workflow_templates/{PACK_LINK_NAME}/{name}.json"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert json.loads(r.read()) == load(name), name


def by_class(prompt: dict, class_type: str) -> dict:
    """The inputs of the prompt's one node of ``class_type``."""
    found = [n["inputs"] for n in prompt.values() if n["class_type"] == class_type]
    assert len(found) == 1, f"{len(found)} {class_type} nodes"
    return found[0]


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
    assert (train["seed"], train["save_name"], train["mode"], train["subject"]) == (0, "my_dog", "fast", "dog")
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


# One row per family workflow, checked and run on the family's bed in ONE server (conftest ``beds_server``: every bed
# with its own builder installed, the dev-only loaders registered). A new family's workflow is one more row.
@dataclass(frozen=True)
class FamilyWorkflow:
    name: str  # workflows/<name>.json
    family: str  # its bed: harness/beds.py BEDS (and cones2_core.families) key
    # {file name the workflow names, what a user downloads: the bed's file put in its place (its builder's FILES key)}
    files: dict
    # {(class_type, input): value}: the workflow's own settings (real file names, loader type, CFG, sampler, size)
    facts: dict
    between: tuple = ()  # the class types between Apply Residuals and Layout Guidance's conditioning (FluxGuidance)
    # (loader, the dev-only loader the run puts in its place, {its input: the loader's input}): the host's loader
    # would build the full-size text encoders around the bed's small ones
    dev_loader: tuple = ()
    shorten: dict = field(default_factory=dict)  # {class_type: {input: value}} for the run on the bed
    size: tuple = (64, 64)  # (width, height) of the shortened run's latent node
    frames: int = 0  # a video's pixel frames in the shortened run (SaveImage writes one file per frame)

    @property
    def id(self) -> str:
        return self.family


SHORT_IMAGE = {"EmptySD3LatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2}}
FAMILY_WORKFLOWS = [
    FamilyWorkflow(
        "flux_two_subjects_layout", "flux",
        files={"flux1-dev.safetensors": "unet", "clip_l.safetensors": "clip_l", "t5xxl_fp16.safetensors": "t5",
               "ae.safetensors": "vae"},
        facts={("UNETLoader", "unet_name"): "flux1-dev.safetensors", ("DualCLIPLoader", "type"): "flux",
               ("DualCLIPLoader", "clip_name1"): "clip_l.safetensors",
               ("DualCLIPLoader", "clip_name2"): "t5xxl_fp16.safetensors", ("VAELoader", "vae_name"): "ae.safetensors",
               ("FluxGuidance", "guidance"): 3.5, ("KSampler", "cfg"): 1.0, ("KSampler", "sampler_name"): "euler",
               ("KSampler", "scheduler"): "simple", ("EmptySD3LatentImage", "width"): 1024},
        between=("FluxGuidance",),
        dev_loader=("DualCLIPLoader", "Cones2DevTinyFluxCLIPLoader", {"clip_l_name": "clip_name1", "t5_name": "clip_name2"}),
        shorten=SHORT_IMAGE),
    FamilyWorkflow(
        "sd3_two_subjects_layout", "sd3",
        files={"sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors": "ckpt"},
        facts={("CheckpointLoaderSimple", "ckpt_name"): "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors",
               ("KSampler", "cfg"): 4.5, ("KSampler", "sampler_name"): "euler", ("KSampler", "scheduler"): "sgm_uniform",
               ("EmptySD3LatentImage", "width"): 1024},
        dev_loader=("CheckpointLoaderSimple", "Cones2DevTinySD3CheckpointLoader", {"ckpt_name": "ckpt_name"}),
        shorten=SHORT_IMAGE),
    FamilyWorkflow(
        "qwen_image_two_subjects_layout", "qwen_image",
        files={"qwen_image_fp8_e4m3fn.safetensors": "unet", "qwen_2.5_vl_7b_fp8_scaled.safetensors": "llm",
               "qwen_image_vae.safetensors": "vae"},
        facts={("UNETLoader", "unet_name"): "qwen_image_fp8_e4m3fn.safetensors", ("CLIPLoader", "type"): "qwen_image",
               ("CLIPLoader", "clip_name"): "qwen_2.5_vl_7b_fp8_scaled.safetensors",
               ("VAELoader", "vae_name"): "qwen_image_vae.safetensors", ("KSampler", "cfg"): 2.5,
               ("EmptySD3LatentImage", "width"): 1328},
        dev_loader=("CLIPLoader", "Cones2DevTinyQwenImageCLIPLoader", {"llm_name": "clip_name"}),
        shorten=SHORT_IMAGE),
    FamilyWorkflow(
        "wan_two_subjects_crossing", "wan",
        files={"wan2.1_t2v_1.3B_fp16.safetensors": "unet", "umt5_xxl_fp8_e4m3fn_scaled.safetensors": "umt5",
               "wan_2.1_vae.safetensors": "vae"},
        facts={("UNETLoader", "unet_name"): "wan2.1_t2v_1.3B_fp16.safetensors", ("CLIPLoader", "type"): "wan",
               ("CLIPLoader", "clip_name"): "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
               ("VAELoader", "vae_name"): "wan_2.1_vae.safetensors", ("KSampler", "cfg"): 6.0,
               ("EmptyHunyuanLatentVideo", "width"): 832, ("EmptyHunyuanLatentVideo", "length"): 33},
        dev_loader=("CLIPLoader", "Cones2DevTinyWanCLIPLoader", {"umt5_name": "clip_name"}),
        shorten={"EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 9}, "KSampler": {"steps": 2}},
        frames=9),  # 3 latent frames: pixel frame 0, 1..4, 5..8
    FamilyWorkflow(
        "chroma_two_subjects_layout", "chroma",
        files={"Chroma1-HD.safetensors": "unet", "t5xxl_fp16.safetensors": "t5", "ae.safetensors": "vae"},
        facts={("UNETLoader", "unet_name"): "Chroma1-HD.safetensors", ("CLIPLoader", "type"): "chroma",
               ("CLIPLoader", "clip_name"): "t5xxl_fp16.safetensors", ("VAELoader", "vae_name"): "ae.safetensors",
               ("KSampler", "cfg"): 4.0, ("KSampler", "sampler_name"): "euler", ("EmptySD3LatentImage", "width"): 1024},
        dev_loader=("CLIPLoader", "Cones2DevTinyChromaCLIPLoader", {"t5_name": "clip_name"}),
        shorten=SHORT_IMAGE),
]


@pytest.fixture(scope="module")
def beds_client(beds_server) -> ComfyClient:
    return ComfyClient(beds_server.url)


@pytest.fixture(scope="module")
def beds_info(beds_client) -> dict:
    return beds_client.object_info()  # the server's loaders list every bed's files


def on_the_bed(fw: FamilyWorkflow, server) -> dict:
    """The workflow with the bed's files in place of the file names it gives (each name must be in it)."""
    wf = load(fw.name)
    bed = server.bed_files[fw.family]
    named = [v for n in wf["nodes"] for v in (n.get("widgets_values") or [])]
    assert sorted(v for v in named if v in fw.files) == sorted(fw.files), f"{fw.name} names other files: {named}"
    for node in wf["nodes"]:
        node["widgets_values"] = [bed[fw.files[v]] if isinstance(v, str) and v in fw.files else v
                                  for v in node.get("widgets_values") or []]
    return wf


@pytest.mark.parametrize("fw", FAMILY_WORKFLOWS, ids=lambda fw: fw.id)
def test_family_workflow_is_valid_for_the_live_nodes(fw, beds_server, beds_info):
    """Valid for the live node definitions once the bed's files stand in for the files it names; the graph as the
    family's users build it (its loaders, loader type, CFG, sampler and size: the row's facts); a note naming
    every file to download; Apply Residuals -> (FluxGuidance) -> Layout Guidance -> KSampler, recording the maps
    of the subjects dog and cat that Attention Maps reads after sampling."""
    from comfyui_cones2.cones2_core.families import FAMILIES

    assert fw.family in FAMILIES
    prompt = assert_valid(on_the_bed(fw, beds_server), beds_info)
    own = to_api(load(fw.name), beds_info)  # the workflow's own values (to_api does not check file names)
    for (class_type, name), value in fw.facts.items():
        assert by_class(own, class_type)[name] == value, f"{fw.name}: {class_type}.{name}"
    note = "\n".join(v for n in load(fw.name)["nodes"] if n["type"] == "Note" for v in n["widgets_values"])
    missing = [f for f in fw.files if os.path.splitext(f)[0] not in note]
    assert not missing, f"{fw.name}: the note does not name {missing}"
    layout = by_class(prompt, "Cones2LayoutGuidance")
    chain, node = [], prompt[layout["conditioning"][0]]
    while node["class_type"] != "Cones2ApplyResiduals":
        chain.append(node["class_type"])
        assert "conditioning" in node["inputs"], f"{fw.name}: no Apply Residuals before Layout Guidance: {chain}"
        node = prompt[node["inputs"]["conditioning"][0]]
    assert tuple(chain) == fw.between
    layout_id = next(nid for nid, n in prompt.items() if n["class_type"] == "Cones2LayoutGuidance")
    ks = by_class(prompt, "KSampler")
    assert (ks["model"], ks["positive"]) == ([layout_id, 0], [layout_id, 1])
    assert prompt[ks["negative"][0]]["class_type"] == "CLIPTextEncode"
    maps = by_class(prompt, "Cones2AttentionMaps")
    assert maps["model"] == [layout_id, 0] and prompt[maps["samples"][0]]["class_type"] == "KSampler"
    assert layout["record_maps"] is True
    assert [b["subject"] for b in json.loads(layout["layout"])["boxes"]] == ["dog", "cat"]


@pytest.mark.parametrize("fw", FAMILY_WORKFLOWS, ids=lambda fw: fw.id)
def test_family_workflow_runs_on_its_bed(fw, beds_server, beds_client, beds_info):
    """The workflow, shortened (64 px, 2 steps; a video 9 frames), runs on the family's bed with its text loader
    swapped for the dev-only loader of the same files: the image (every frame of a video) and the maps are written
    at their sizes, and the report has both subjects, guided: nearly all of each word's attention inside its box
    (a video's: in every latent frame, the boxes moving along their tracks)."""
    prompt = to_api(on_the_bed(fw, beds_server), beds_info)
    loader, dev, inputs = fw.dev_loader
    for node in prompt.values():
        if node["class_type"] == loader:
            node.update(class_type=dev, inputs={k: node["inputs"][v] for k, v in inputs.items()})
        node["inputs"].update(fw.shorten.get(node["class_type"], {}))
    assert sum(n["class_type"] == dev for n in prompt.values()) == 1
    latent_frames = (fw.frames - 1) // 4 + 1 if fw.frames else 1
    entry = run_and_check(beds_client, beds_server, fw.name, beds_info, n_subjects=2, size=fw.size, prompt=prompt,
                          timeout=600, frames=fw.frames or 1, maps_frames=latent_frames)
    maps_id = next(nid for nid, n in prompt.items() if n["class_type"] == "Cones2AttentionMaps")
    lines = "\n".join(entry["outputs"][maps_id]["text"]).splitlines()
    assert [line.split("\t")[0] for line in lines] == ["dog", "cat"], lines
    for line in lines:  # guided: the workflow's negative_weight (-1e8) keeps each word's attention in its box
        share = float(line.split("\tin-region share ")[1].split("\t")[0])
        frame_shares = [float(x) for x in line.split("\tper frame ")[1].split()] if fw.frames else []
        assert share > 0.9 and len(frame_shares) == (latent_frames if fw.frames else 0), line
        assert all(x > 0.9 for x in frame_shares), line


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
