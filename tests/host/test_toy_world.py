"""The trained toy world (harness/toy_world.py) through the real host: an SD1.5 checkpoint whose words decide
which objects appear (never where), a VAE that speaks the world, and what Layout Guidance does to its images.

Every generation-level rate is over 16 samples (one batch of 16 noise draws from one seed, 20 euler steps, cfg 5)
and is compared with the unguided rate of the very same draws.
"""

from __future__ import annotations

import logging

import pytest
import torch

from harness import toy_measures, toy_world

PAIR = "a photo of a dog and a cat"
LEFT, RIGHT = toy_measures.LEFT, toy_measures.RIGHT


@pytest.fixture(scope="module")
def world(comfy, toy_ckpt):
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(toy_ckpt, output_vae=True, output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="module")
def runs(pack, world):
    """Raw latents of 16 noise draws (one seed), 20 euler steps, cfg 5; Layout Guidance at node defaults when
    boxes are given. Cached, so each guided run is compared with the unguided run of the same draws."""
    model, clip, _ = world
    return toy_measures.Sampler(pack, model, clip)


def test_checkpoint_is_sd15_eps_with_the_tiny_clip(world, toy_ckpt, tiny_ckpts):
    import comfy.model_base
    import comfy.supported_models
    from safetensors import safe_open

    model, clip, _ = world
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    assert set(clip.tokenize("a dog")) == {"l"}
    with safe_open(toy_ckpt, "pt") as ours, safe_open(tiny_ckpts["sd1"], "pt") as theirs:
        keys = sorted(k for k in ours.keys() if k.startswith("cond_stage_model."))
        assert keys and keys == sorted(k for k in theirs.keys() if k.startswith("cond_stage_model."))
        for k in keys:  # the tiny checkpoint's own CLIP-L, bit for bit
            assert torch.equal(ours.get_tensor(k), theirs.get_tensor(k)), k


def test_vae_encodes_pictures_to_the_world_latents_and_decodes_back(world):
    import nodes

    _, _, vae = world
    gen = torch.Generator().manual_seed(3)
    scenes = [toy_world.place(gen, [("dog", False), ("car", True)]), toy_world.place(gen, [("cat", True)])]
    pictures = torch.stack([toy_world.picture(s) for s in scenes])
    latents = nodes.VAEEncode().encode(vae, pictures)[0]["samples"]
    expected = torch.stack([toy_world.render(s) for s in scenes])
    assert latents.shape == (2, 4, 16, 16)
    assert (latents - expected).abs().max() < 1e-3
    decoded = nodes.VAEDecode().decode(vae, {"samples": expected})[0]
    assert (decoded - pictures).abs().max() < 1e-3
    # the objects are visible: each one's colour at its centre, the grey background elsewhere
    for scene, image in zip(scenes, decoded, strict=True):
        for name, _big, cy, cx in scene:
            pixel = image[int(cy * 8), int(cx * 8)]
            assert torch.allclose(pixel, torch.tensor(toy_world.object_colour(name)), atol=0.02), (name, pixel)
        found = toy_measures.find_all(nodes.VAEEncode().encode(vae, image[None])[0]["samples"][0])
        for name, big, cy, cx in scene:
            f = found[name]
            assert f.present and abs(f.cx * 16 - cx) < 0.3 and abs(f.cy * 16 - cy) < 0.3
            assert abs(f.radius - (toy_world.BIG_RADIUS if big else toy_world.RADIUS)) < 0.5
        assert sum(f.present for f in found.values()) == len(scene)


@pytest.mark.parametrize("prompt,objects", [("a photo of a dog", ["dog"]), ("a photo of a car", ["car"]),
                                            (PAIR, ["dog", "cat"])])
def test_prompted_objects_appear_and_unprompted_do_not(runs, prompt, objects):
    s = toy_measures.summarise(runs(prompt), objects)
    assert s["presence"] >= 0.9, s
    assert s["unprompted"] <= 0.05, s


def test_big_makes_the_object_big(runs):
    plain = toy_measures.summarise(runs("a photo of a dog"), ["dog"])
    big = toy_measures.summarise(runs("a photo of a big dog"), ["dog"])
    assert big["presence"] >= 0.9 and big["unprompted"] <= 0.05, big
    assert abs(plain["radius"]["dog"] - toy_world.RADIUS) < 0.6, plain["radius"]
    assert big["radius"]["dog"] > plain["radius"]["dog"] + 0.8, (plain["radius"], big["radius"])


def test_unguided_pairs_land_in_boxes_only_by_chance(runs):
    s = toy_measures.summarise(runs(PAIR), ["dog", "cat"], {"dog": LEFT, "cat": RIGHT})
    swapped = toy_measures.summarise(runs(PAIR), ["dog", "cat"], {"dog": RIGHT, "cat": LEFT})
    assert s["in_boxes"] <= 0.6 and swapped["in_boxes"] <= 0.6, (s["in_boxes"], swapped["in_boxes"])


@pytest.mark.parametrize("boxes", [{"dog": LEFT, "cat": RIGHT}, {"dog": RIGHT, "cat": LEFT}],
                         ids=["dog-left", "dog-right"])
def test_guidance_with_node_defaults_puts_both_subjects_in_their_boxes(runs, boxes):
    unguided = toy_measures.summarise(runs(PAIR), ["dog", "cat"], boxes)
    guided = toy_measures.summarise(runs(PAIR, boxes), ["dog", "cat"], boxes)
    assert guided["in_boxes"] >= 0.9, (guided["in_boxes"], unguided["in_boxes"])
    assert guided["in_boxes"] >= unguided["in_boxes"] + 0.3, (guided["in_boxes"], unguided["in_boxes"])
    assert guided["presence"] >= unguided["presence"] - 0.05 and guided["unprompted"] <= 0.05, guided


def test_guidance_weight_zero_samples_exactly_as_unguided(runs):
    plain = runs(PAIR)
    off = runs(PAIR, {"dog": LEFT, "cat": RIGHT}, guidance_weight=0.0, self_recurrence=True)  # no step re-taken
    assert torch.equal(plain, off)


# The samplers users reach for most; every other one either takes self-recurrence the same way as euler /
# euler_ancestral (nodes/guidance.STEPWISE_SAMPLERS) or is sampled without it, bit for bit as with it off
# (test_guidance.test_multistep_samplers_sample_without_self_recurrence_and_say_so). uni_pc is measured by
# bench/toy_world.py only: the host's uni_pc holds about 1.2 GB per sample of a batch on this model (19.5 GB for
# 16 draws, unguided too), more than a test process on the 23 GB CI machine can spare.
SAMPLERS = ["euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "lcm"]


@pytest.mark.parametrize("sampler, recurrence", [(s, None) for s in SAMPLERS] + [("euler_ancestral", True)],
                         ids=[*SAMPLERS, "euler_ancestral-self-recurrence"])
def test_guidance_with_each_common_sampler(runs, sampler, recurrence):
    """Node defaults (and self-recurrence, where asked, with a stochastic sampler) put both subjects in their boxes
    in at least 90% of the draws, never less often than the same draws unguided, without losing or adding
    objects. (With the same seed at every re-taken step, euler_ancestral drew every object everywhere.)"""
    boxes = {"dog": LEFT, "cat": RIGHT}
    unguided = toy_measures.summarise(runs(PAIR, sampler=sampler), ["dog", "cat"], boxes)
    extra = {} if recurrence is None else {"self_recurrence": recurrence}
    guided = toy_measures.summarise(runs(PAIR, boxes, sampler=sampler, **extra), ["dog", "cat"], boxes)
    assert guided["in_boxes"] >= 0.9 and guided["in_boxes"] >= unguided["in_boxes"], (guided, unguided)
    assert guided["presence"] >= unguided["presence"] - 0.05 and guided["unprompted"] <= 0.05, (guided, unguided)


def big_residual(pack, world, subject: str, picture_seed: int, **settings):
    """A residual trained from 6 pictures of big ``subject``s with the class word ``subject``, at the toy world's
    own 128 px (the size of its pictures); by default fast mode at the node's defaults (steps and learning rate
    automatic, batch 1)."""
    return toy_measures.train_big_residual(pack, *world, subject, picture_seed, **settings)


@pytest.fixture(scope="module")
def big_dog_residual(pack, world):
    return big_residual(pack, world, "dog", 7)


@pytest.fixture(scope="module")
def big_cat_residual(pack, world):  # the pictures' seed is bench/toy_training_effects.py's
    return big_residual(pack, world, "cat", 8)


@pytest.fixture(scope="module")
def paper_dog_residual(pack, world):
    """Paper mode (the private encoder fine-tuned, the residual taken over the 27 templates) in a CI-sized run:
    100 steps at lr 5e-5 (ten times the paper's) and without the preservation term. At the paper's settings
    paper mode learns too little on the toy world to test: there the attribute is worth almost nothing to the
    diffusion loss, and the term charges more for one step than any run gains (docs/training.md;
    bench/toy_training_effects.py --items curve balance)."""
    return big_residual(pack, world, "dog", 7, mode="paper", steps=100, learning_rate=5e-5,
                        preservation_weight_start=0.0, preservation_weight_rest=0.0)


@pytest.mark.parametrize("mode", ["fast", "paper"])
def test_a_trained_residual_makes_the_plain_class_word_carry_the_attribute(runs, request, mode):
    """Trained on big dogs, the residual makes plain "a photo of a dog" draw big dogs (same 16 draws), with every
    dog present and nothing unprompted; applied with the wrong sign, or at another word of the prompt, it does
    not (so the lift is the residual at the dog's tokens, not any change of the prompt). Fast mode at the node's
    defaults; paper mode as paper_dog_residual says."""
    big_dog_residual = request.getfixturevalue("big_dog_residual" if mode == "fast" else "paper_dog_residual")
    effects = toy_measures.residual_effects(runs, "a photo of a dog", big_dog_residual, "dog")
    trained = effects["trained"]
    r = {name: s["radius"]["dog"] for name, s in effects.items()}
    logging.getLogger(__name__).info("trained residual, dog radius: %s", r)
    assert trained["presence"] >= 0.9 and trained["unprompted"] <= 0.05, trained
    assert r["trained"] > r["plain"] + 0.5, r  # the "big dog" prompt itself lifts by about 1.7, the oracle 0.8
    # not bigger (NaN: no dog drawn at all; paper mode's residual flipped removes the dog from every draw)
    assert not r["flipped"] >= r["plain"] + 0.15, r
    assert r["elsewhere"] < r["plain"] + 0.15, r


def test_two_residuals_trained_separately_compose_in_one_prompt(runs, big_dog_residual, big_cat_residual):
    """The dog's and the cat's residuals, each trained alone (fast mode, node defaults, from pictures of big dogs
    and of big cats), applied together in "a photo of a dog and a cat": both objects still in every draw, both
    bigger than on the same draws without residuals. (Each residual alone shrinks the other subject: with the
    dog's alone the cat comes in 62% of the draws at radius 1.91; bench/toy_training_effects.py.)"""
    none = toy_measures.summarise(runs(PAIR), ["dog", "cat"])
    both = toy_measures.summarise(runs(PAIR, residuals=[big_dog_residual, big_cat_residual]), ["dog", "cat"])
    logging.getLogger(__name__).info("two residuals: radii %s -> %s", none["radius"], both["radius"])
    assert both["presence"] >= 0.9 and both["unprompted"] <= 0.05, both
    assert both["radius"]["dog"] > none["radius"]["dog"] + 0.5, (none["radius"], both["radius"])  # 1.91 -> 2.80
    assert both["radius"]["cat"] > none["radius"]["cat"] + 0.1, (none["radius"], both["radius"])  # 2.62 -> 2.82


# ---- where placement is hard (issue 27; bench/toy_hard.py has every sampler and setting) ------------------------
# Three subjects, dog and cat in the top quarters, car in the bottom half: the world's captions hold at most two
# objects, and unguided it (almost) never draws the third. Layout Guidance at node defaults draws and places all
# three in 15 of the 16 draws (one cat missing), with euler and with dpmpp_2m (the same with self-recurrence).
THREE_PROMPT, THREE_BOXES = toy_measures.HARD_CASES["three"]
THREE = ["dog", "cat", "car"]


def test_three_subjects_unguided_the_world_drops_the_third(runs):
    s = toy_measures.summarise(runs(THREE_PROMPT), THREE, THREE_BOXES)
    assert s["per_object"]["dog"] >= 0.9 and s["per_object"]["cat"] >= 0.9, s
    assert s["per_object"]["car"] <= 0.1 and s["in_boxes"] <= 0.1, s


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_three_subjects_each_in_its_box_with_node_defaults(runs, sampler):
    """16 draws in one sampling call; the unguided rates are euler's (test above; dpmpp_2m's: car in 6%)."""
    unguided = toy_measures.summarise(runs(THREE_PROMPT), THREE, THREE_BOXES)
    guided = toy_measures.summarise(runs(THREE_PROMPT, THREE_BOXES, sampler=sampler), THREE, THREE_BOXES)
    logging.getLogger(__name__).info("three subjects, %s: guided %s, in boxes %s", sampler, guided["per_object"],
                                     guided["in_boxes"])
    assert guided["in_boxes"] >= 0.9 and guided["in_boxes"] >= unguided["in_boxes"] + 0.8, (guided, unguided)
    assert guided["per_object"]["car"] >= 0.95 and guided["presence"] >= 0.9, guided
    assert guided["unprompted"] <= 0.05, guided


def test_three_subjects_with_self_recurrence(runs):
    """Self-recurrence on (every guided step re-taken, euler): all three still in their boxes in >= 90% of the
    draws, and the draws are not those of self-recurrence off (same rate, 94%, on other samples: re-taking
    the steps moves the objects), so a self-recurrence silently skipped fails here."""
    off = runs(THREE_PROMPT, THREE_BOXES)
    on = runs(THREE_PROMPT, THREE_BOXES, self_recurrence=True)
    s = toy_measures.summarise(on, THREE, THREE_BOXES)
    assert s["in_boxes"] >= 0.9 and s["per_object"]["car"] >= 0.95 and s["unprompted"] <= 0.05, s
    moved = (on - off).abs().amax(dim=(1, 2, 3))  # per draw, raw latent units (an object's signature: ~6.4)
    assert int((moved > 1.0).sum()) >= 8, moved


# Two small boxes side by side in the middle (dog x 0.2-0.5, cat x 0.5-0.8, both y 0.3-0.7): unguided, both land
# there in 3 of the 16 draws (the pair runs above: same prompt, same draws), the node's defaults in 12 of 16 (both
# always drawn; the misses are a centroid just outside its small box). Room to fail both ways: a bias removed or
# moved one token falls back towards 3 of 16; a change that costs a few draws of placement shows here.
ADJ_PROMPT, ADJ_BOXES = toy_measures.HARD_CASES["adjacent"]


def test_two_small_adjacent_boxes_with_node_defaults(runs):
    assert ADJ_PROMPT == PAIR  # shares the unguided run of the pair tests
    unguided = toy_measures.summarise(runs(PAIR), ["dog", "cat"], ADJ_BOXES)
    guided = toy_measures.summarise(runs(PAIR, ADJ_BOXES), ["dog", "cat"], ADJ_BOXES)
    logging.getLogger(__name__).info("adjacent boxes: unguided %s, guided %s", unguided["in_boxes"], guided["in_boxes"])
    assert unguided["in_boxes"] <= 0.35, unguided  # measured 19%
    assert guided["in_boxes"] >= 0.6 and guided["in_boxes"] >= unguided["in_boxes"] + 0.4, (guided, unguided)  # 75%
    # both always drawn; one guided draw of 16 also holds an object the prompt did not ask for (unguided: none)
    assert guided["presence"] >= unguided["presence"] - 0.05 and guided["unprompted"] <= 0.1, guided
