"""Shared fixtures: the real ComfyUI host (never a mock), tiny checkpoints, a running server.

Host tests need ComfyUI: found by COMFYUI_DIR, the pack's grandparent in ComfyUI/custom_nodes/, or
~/ComfyUI. Without it they skip, except under CI=true, where a missing host fails the run.
"""

from __future__ import annotations

import os
import sys

import pytest

from harness import tiny_checkpoints, tiny_extras, toy_dit, toy_world
from harness import tiny_flux as flux_bed
from harness import tiny_qwen_image as qwen_image_bed
from harness.host import PACK_NAME, BuildFailed, HostNotFound, build, find_host, pack_package

# One name for the pack: tests import its maths as comfyui_cones2.cones2_core (no host needed), the same modules that
# the ``pack`` fixture's nodes use, so Cones2Error and the family records are one class each.
pack_package()

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TESTS = os.path.dirname(os.path.abspath(__file__))
# The tier of each folder under tests/ (docs/testing.md); `pytest tests -m core` runs one tier.
TIERS = {"core": ("core",), "js": ("core", "js"), "host": ("host",), "browser": ("browser",)}
# Tests that took over 60 s each on the shared two-core machine (pytest --durations, setup included where a test
# builds its own fixture), by node id without parameters: marked ``slow`` (docs/testing.md has the numbers). Kept
# here rather than on the tests, so that files can move; an entry that matches nothing in a collected file stops
# the run, so a renamed test is not silently unmarked.
SLOW = {  # seconds measured (2 cores, load 5 to 11 from other work), the slowest parameter where there are several
    "host/test_train.py::test_paper_diffusion_objective_lowers_the_loss_step_by_step": 229,
    "host/test_train.py::test_a_float16_unet_trains_in_float16_like_the_float32_one": 197,
    "host/test_train.py::test_fast_mode_lowers_the_loss_like_paper_mode": 110,
    "host/test_train.py::test_sd2_v_prediction_paper_mode": 87,
    "host/test_train.py::test_same_seed_same_residual": 66,
    "host/test_train.py::test_paper_mode_matches_a_naive_full_encoder_loop": 64,
    # the unedited reference trainer beside paper mode, 4 steps each (the diffusers export built once per cache)
    "host/test_reference_parity.py::test_paper_mode_matches_the_reference_trainer": 487,
}
# Module fixtures over 60 s: every test that uses one is slow (else `-m "not slow"` would still build it).
SLOW_FIXTURES = {"paper_sd15": 99}  # test_train.py's 8-step paper-mode run


# Each session-scoped ComfyUI server stops after the last collected test that uses it, not at the session's end:
# the three servers hold several GB, and the suite's memory peak comes late (test_train.py). Per server, the
# fixtures through which a test reaches it (``ui`` asks for its server with request.getfixturevalue). The fixtures
# register what they start in harness.server.SESSION_SERVERS.
SERVER_USERS = {"server": ("server", "ui"), "beds_server": ("beds_server",), "newest_server": ("newest_server", "ui")}
_LAST_USER: dict[str, str] = {}  # server fixture -> node id of the last collected test that uses it


def pytest_collection_finish(session):
    if "cones2_core" in sys.modules:  # the repo root is on sys.path (pythonpath = ..), so this would import
        raise pytest.UsageError(f"a test imported the top-level cones2_core, a second copy of the pack's classes; "
                                f"import {PACK_NAME}.cones2_core instead")
    _LAST_USER.clear()
    for item in session.items:
        for name, users in SERVER_USERS.items():
            if set(users) & set(item.fixturenames):
                _LAST_USER[name] = item.nodeid


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stops a session server once its last user has run (see SERVER_USERS)."""
    from harness.server import SESSION_SERVERS

    for name, last in _LAST_USER.items():
        if last == item.nodeid and name in SESSION_SERVERS:
            SESSION_SERVERS.pop(name).stop()


def pytest_collection_modifyitems(config, items):
    """Applies the tiers declared in pytest.ini: by folder (TIERS), ``toy`` to every test that uses the toy world
    (fixtures toy_ckpt, toy_dit_files, toy_dit_attribute_files), ``slow`` to the tests in SLOW and those that use a fixture in SLOW_FIXTURES."""
    for item in items:
        folder = os.path.relpath(str(item.path), TESTS).split(os.sep)[0]
        if folder not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: tests/{folder}/ has no tier; add it to TIERS in tests/conftest.py")
        for tier in TIERS[folder]:
            item.add_marker(tier)
        if {"toy_ckpt", "toy_dit_files", "toy_dit_attribute_files"} & set(item.fixturenames):
            item.add_marker("toy")
        base = item.nodeid.split("[")[0]
        if base in SLOW or SLOW_FIXTURES.keys() & set(item.fixturenames):
            item.add_marker("slow")
    if any("::" in arg for arg in config.args):
        return  # single tests named: their files' other tests are not collected
    files = {item.nodeid.split("::")[0] for item in items}
    found = {item.nodeid.split("[")[0] for item in items}
    stale = sorted(n for n in SLOW if n.split("::")[0] in files and n not in found)
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names tests that do not exist (renamed?): {stale}")


def _build(builder, host_dir: str, *args: str, **kw) -> dict[str, str]:
    """harness.host.build of a builder module; a failed build fails the test with the builder's output."""
    try:
        return build(builder.__file__, host_dir, *args, **kw)
    except BuildFailed as e:
        pytest.fail(f"building {builder.__name__} failed: {e}")


@pytest.fixture(scope="session")
def host_dir() -> str:
    try:
        return find_host()
    except HostNotFound as e:
        if IN_CI:
            pytest.fail(f"CI=true and no ComfyUI host: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tiny_ckpts(host_dir) -> dict[str, str]:
    """{family: path} for 'sd1', 'sd2', 'sdxl', built once into the versioned cache (a subprocess, so
    the host parses its own CPU arguments there)."""
    out = os.environ.get("CONES2_CKPT_DIR") or tiny_checkpoints.default_cache_dir()
    paths = _build(tiny_checkpoints, host_dir, out=out, timeout=1200)
    assert set(paths) == set(tiny_checkpoints.FAMILIES)
    return paths


@pytest.fixture(scope="session")
def toy_ckpt(host_dir) -> str:
    """The trained toy world's checkpoint (harness/toy_world.py), built once into its versioned cache (about ten
    minutes on two cores, with a progress line every 25 training steps on stderr)."""
    out = toy_world.default_cache_dir()  # CONES2_TOY_DIR overrides
    path = _build(toy_world, host_dir, out=out, timeout=2400, show_log=True)["toy"]
    assert os.path.isfile(path)
    return path


@pytest.fixture(scope="session")
def toy_dit_files(host_dir) -> dict[str, str]:
    """{"toydit", "t5"}: the trained toy joint-attention world (harness/toy_dit.py: a small Chroma and its T5),
    built once into its versioned cache (a few minutes on two cores, a progress line every 40 steps on stderr)."""
    paths = _build(toy_dit, host_dir, out=toy_dit.default_cache_dir(), timeout=1800, show_log=True)
    assert set(paths) == {"toydit", "t5"} and all(os.path.isfile(p) for p in paths.values())
    return paths


@pytest.fixture(scope="session")
def toy_dit_attribute_files(host_dir, toy_dit_files) -> dict[str, str]:
    """{"toydit", "t5"}: the toy Chroma's attribute world (harness/toy_dit.py --long: the same recipe trained three
    times as long, which binds "big"; about 7 minutes on two cores), beside the 480-step world and sharing its T5."""
    paths = _build(toy_dit, host_dir, "--long", out=toy_dit.default_cache_dir(), timeout=2400, show_log=True)
    assert paths["t5"] == toy_dit_files["t5"] and os.path.isfile(paths["toydit"])
    return paths


@pytest.fixture(scope="session")
def tiny_flux(host_dir) -> dict[str, str]:
    """{"unet", "t5", "clip_l", "vae"}: paths of the tiny Flux bed (harness/tiny_flux.py), built once into its
    versioned cache (about 30 s, 1.8 GB; CONES2_FLUX_DIR overrides the folder)."""
    paths = _build(flux_bed, host_dir, out=flux_bed.default_cache_dir(), timeout=1200)
    assert set(paths) == set(flux_bed.FILES)
    return paths


@pytest.fixture(scope="session")
def flux(comfy, tiny_flux):
    """(MODEL, CLIP, VAE) of the tiny Flux bed through the host's loaders (harness.tiny_flux.load), once per
    session; tests clone what they patch. The CLIP pads T5 to 256 tokens, as the host's Flux tokenizer does:
    ``clip.clone()`` + ``set_tokenizer_option("t5xxl_min_length", n)`` (T5TokenizerOptions) shortens it."""
    return flux_bed.load(tiny_flux)


@pytest.fixture(scope="session")
def extras_files(host_dir) -> dict[str, str]:
    """{name: path} of the tiny LoRA, ControlNet, demo residuals and input images (built once, cached)."""
    out = os.environ.get("CONES2_EXTRAS_DIR") or tiny_extras.default_cache_dir()
    return _build(tiny_extras, host_dir, out=out, timeout=600)


@pytest.fixture(scope="session")
def comfy(host_dir):
    """The host imported in-process (CPU), for fast tests that call nodes and models directly."""
    from harness.host import import_host

    import_host(host_dir)
    import comfy.model_management  # noqa: F401  (initialises the CPU device)

    return host_dir


@pytest.fixture(scope="module")
def res_dir(comfy, tmp_path_factory):
    """A fresh ``cones2_residuals`` folder for one test module (the host's folder_paths entry points at it)."""
    import folder_paths

    folder = tmp_path_factory.mktemp("cones2_residuals")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(folder_paths.folder_names_and_paths, "cones2_residuals", ([str(folder)], {".safetensors"}))
        yield folder


@pytest.fixture(scope="session")
def pack(comfy):
    """This pack imported in-process as ComfyUI imports it (package ``comfyui_cones2``)."""
    from harness.host import load_pack

    return load_pack()


@pytest.fixture(scope="session")
def loaded(comfy, tiny_ckpts):
    """loaded(family) -> (MODEL, CLIP) of a tiny checkpoint through the host's loader, once per session (tests
    clone what they patch, so the shared objects stay as loaded)."""
    import comfy.sd

    cache = {}

    def get(fam):
        if fam not in cache:
            model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(tiny_ckpts[fam], output_vae=False,
                                                                       output_clip=True)
            cache[fam] = (model, clip)
        return cache[fam]

    return get


@pytest.fixture(scope="session")
def server(host_dir, tiny_ckpts, extras_files, tmp_path_factory):
    """A real ComfyUI server with this pack, the tiny checkpoints and the tiny extras (LoRA, ControlNet, demo
    residuals, input images that the example workflows name), on a free loopback port."""
    from harness.server import SESSION_SERVERS, ComfyServer

    srv = ComfyServer(checkpoints=tiny_ckpts, base_dir=str(tmp_path_factory.mktemp("comfy-base")), host=host_dir)
    tiny_extras.install(extras_files, srv)
    SESSION_SERVERS["server"] = srv.start()
    yield srv
    SESSION_SERVERS.pop("server", None)
    srv.stop()
    if os.environ.get("CONES2_KEEP_LOG"):
        sys.stderr.write(srv.log_text())


@pytest.fixture(scope="session")
def beds_server(host_dir, tiny_flux, tmp_path_factory):
    """ONE real ComfyUI server for every bed with its own builder (harness/beds.py BEDS: Flux, Wan, SD3.5,
    Qwen-Image, ...; the SD checkpoints are ``server``'s): this pack, the dev-only nodes (harness/dev_nodes: the
    beds' text encoder and checkpoint loaders) and each bed's files in its model folders, linked by the bed's
    builder (``install``). ``srv.bed_files[family]``: {name: file name as the loaders list it}. A bed declared in
    BEDS is installed here with no other change; the family workflows (tests/host/test_workflows.py) and the
    server tests of Flux and Qwen-Image share it, so a session starts one server for all of them."""
    from harness.beds import BEDS
    from harness.server import SESSION_SERVERS, ComfyServer

    srv = ComfyServer(base_dir=str(tmp_path_factory.mktemp("comfy-beds")), host=host_dir, dev_nodes=True)
    srv.bed_files = {}
    for family, bed in sorted(BEDS.items()):
        if bed.builder == "tiny_checkpoints":
            continue
        builder = bed.builder_module()
        paths = tiny_flux if family == "flux" else _build(builder, host_dir, out=builder.default_cache_dir(),
                                                          timeout=1200)
        srv.bed_files[family] = builder.install(paths, srv)
    SESSION_SERVERS["beds_server"] = srv.start()
    yield srv
    SESSION_SERVERS.pop("beds_server", None)
    srv.stop()
    if os.environ.get("CONES2_KEEP_LOG"):
        sys.stderr.write(srv.log_text())


@pytest.fixture(scope="session")
def flux_server(beds_server):
    """The server with the tiny Flux bed (``beds_server``); ``flux_files``: the bed's file names as listed."""
    beds_server.flux_files = beds_server.bed_files["flux"]
    return beds_server


@pytest.fixture(scope="session")
def tiny_qwen_image(host_dir) -> dict[str, str]:
    """{"unet", "llm", "vae"}: paths of the tiny Qwen-Image bed (harness/tiny_qwen_image.py), built once into its
    versioned cache (about 80 s, 1.6 GB; CONES2_QWEN_IMAGE_DIR overrides the folder)."""
    paths = _build(qwen_image_bed, host_dir, out=qwen_image_bed.default_cache_dir(), timeout=1200)
    assert set(paths) == set(qwen_image_bed.FILES)
    return paths


@pytest.fixture(scope="session")
def qwen_image_server(beds_server):
    """The server with the tiny Qwen-Image bed (``beds_server``); ``qwen_image_files``: its file names as listed."""
    beds_server.qwen_image_files = beds_server.bed_files["qwen_image"]
    return beds_server


@pytest.fixture(scope="session")
def client(server):
    from harness.client import ComfyClient

    return ComfyClient(server.url)
