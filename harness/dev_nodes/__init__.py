"""Development-only ComfyUI custom node package: the tiny Flux, Wan, Qwen-Image and Chroma beds' text
encoder loaders, the tiny SD3.5 bed's checkpoint loader.

It exists only because the host's Flux text loader (DualCLIPLoader, type ``flux``) always builds the full
T5-XXL (``comfy/text_encoders/t5_config_xxl.json``, 4.7 B parameters), which no test machine here can hold.
The tiny bed's T5 keeps T5-XXL's width (4096, what Flux's ``txt_in`` reads) with a tiny rest; this loader
reads that small config off the file's tensor shapes and hands it to the host's own loader through the
host's own override, ``model_options["t5xxl_model_config"]`` (read by ``comfy.sd1_clip.SDClipModel``), so
everything else (tokenizers, the T5 and CLIP-L classes, the Flux CLIP object) is the host's.

Never part of the pack: ``harness.server.ComfyServer(dev_nodes=True)`` links this folder into the test
server's ``custom_nodes/`` next to the pack; the pack's own node list never names it.
"""

from __future__ import annotations

import re

T5_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def small_t5_config(sd: dict) -> dict:
    """The T5 config overrides that fit a T5 state dict (layers, heads, head width, feed-forward width)."""
    if T5_KEY not in sd or "shared.weight" not in sd:
        raise ValueError("this file is not a T5 encoder (no shared.weight / relative_attention_bias); connect "
                         "the tiny Flux bed's T5 file")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
    heads = int(sd[T5_KEY].shape[1])
    return {"num_layers": len(blocks), "num_heads": heads,
            "d_kv": int(sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads,
            "d_ff": int(sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"].shape[1]),
            "d_model": int(sd["shared.weight"].shape[1]), "vocab_size": int(sd["shared.weight"].shape[0])}


def load_tiny_flux_clip(clip_l_path: str, t5_path: str, embedding_directory=None):
    """The host's Flux CLIP (tokenizer keys {"l", "t5xxl"}) from a CLIP-L file and a small-T5 file, through
    ``comfy.sd.load_text_encoder_state_dicts(..., clip_type=CLIPType.FLUX)`` as DualCLIPLoader calls it, plus
    the small T5 config as the host's ``t5xxl_model_config`` override."""
    import comfy.sd
    import comfy.utils

    clip_l = comfy.utils.load_torch_file(clip_l_path, safe_load=True)
    t5 = comfy.utils.load_torch_file(t5_path, safe_load=True)
    return comfy.sd.load_text_encoder_state_dicts([clip_l, t5], embedding_directory=embedding_directory,
                                                  clip_type=comfy.sd.CLIPType.FLUX,
                                                  model_options={"t5xxl_model_config": small_t5_config(t5)})


def tiny_wan_clip(spiece_model, config: dict, embedding_directory=None):
    """The host's Wan CLIP (``comfy.text_encoders.wan``: WanT5Tokenizer, the umT5 model class, tokenizer key
    "umt5xxl") with ``config`` as the host's ``umt5xxl_model_config`` override and ``spiece_model`` (a uint8
    tensor, as real umT5 files carry it) as the tokenizer; weights left as the host's classes make them."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.wan
    import torch

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.wan.WanT5Tokenizer,
                                                    comfy.text_encoders.wan.te(dtype_t5=torch.float32))
    return comfy.sd.CLIP(target=target, embedding_directory=embedding_directory,
                         tokenizer_data={"spiece_model": spiece_model},
                         model_options={"umt5xxl_model_config": config})


def load_tiny_wan_clip(umt5_path: str, embedding_directory=None):
    """The tiny Wan bed's CLIP from its small-umT5 file: the host's Wan text encoder class and tokenizer
    (``tiny_wan_clip``) with the file's config read off its tensor shapes, its weights loaded by the host's
    ``CLIP.load_sd``. (CLIPLoader, type wan, reads a one-layer file as T5-base: the host's detection looks for
    block 23.)"""
    import comfy.utils

    sd = comfy.utils.load_torch_file(umt5_path, safe_load=True)
    spm = sd.pop("spiece_model", None)
    if spm is None:
        raise ValueError("this file has no 'spiece_model' tensor; connect the tiny Wan bed's umT5 file")
    clip = tiny_wan_clip(spm, small_t5_config(sd), embedding_directory=embedding_directory)
    clip.load_sd(sd)
    return clip

class Cones2DevTinyFluxCLIPLoader:
    """DualCLIPLoader (type flux) for the tiny bed's small T5; development only (see the module docstring)."""

    DESCRIPTION = ("Development only: loads the tiny Flux test bed's CLIP-L + small T5 (the host's Flux loader "
                   "always builds the full T5-XXL).")
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/cones2_dev"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"clip_l_name": (names, {"tooltip": "the bed's CLIP-L file"}),
                             "t5_name": (names, {"tooltip": "the bed's small T5 file"})}}

    def load(self, clip_l_name, t5_name):
        import folder_paths

        return (load_tiny_flux_clip(folder_paths.get_full_path_or_raise("text_encoders", clip_l_name),
                                    folder_paths.get_full_path_or_raise("text_encoders", t5_name),
                                    embedding_directory=folder_paths.get_folder_paths("embeddings")),)


SD3_TE_CONFIG_KEY = "cones2.te_model_options"  # the tiny SD3.5 bed's metadata: its text encoders' config overrides


def load_tiny_sd3_checkpoint(path: str, without=(), embedding_directory=None):
    """(MODEL, CLIP, VAE) of the tiny SD3.5 bed's checkpoint through the host's checkpoint loader (what
    CheckpointLoaderSimple calls), with the text encoder config overrides the file names in its metadata as the
    host's ``te_model_options``; ``without``: encoders ("clip_l", "clip_g", "t5xxl") left out of the state dict,
    as a checkpoint or loader without them gives the CLIP."""
    import json

    import comfy.sd
    import comfy.utils

    sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    if SD3_TE_CONFIG_KEY not in (metadata or {}):
        raise ValueError(f"{path} is not a tiny SD3.5 bed checkpoint (no {SD3_TE_CONFIG_KEY} metadata); connect "
                         "the bed's checkpoint")
    prefixes = tuple(f"text_encoders.{name}." for name in without)
    if prefixes:
        sd = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=True, output_clip=True, embedding_directory=embedding_directory,
        te_model_options=json.loads(metadata[SD3_TE_CONFIG_KEY]), metadata=metadata)
    return model, clip, vae


class Cones2DevTinySD3CheckpointLoader:
    """CheckpointLoaderSimple for the tiny SD3.5 bed (harness/tiny_sd3.py): the host's checkpoint loader with the
    text encoder config overrides the file names in its metadata; development only."""

    DESCRIPTION = ("Development only: loads the tiny SD3.5 test bed's checkpoint (the host's SD3 loader always builds "
                   "the full T5-XXL and CLIP-G).")
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/cones2_dev"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),
                                           {"tooltip": "the bed's checkpoint"})}}

    def load(self, ckpt_name):
        import folder_paths

        return load_tiny_sd3_checkpoint(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name),
                               embedding_directory=folder_paths.get_folder_paths("embeddings"))


class Cones2DevTinyWanCLIPLoader:
    """CLIPLoader (type wan) for the tiny Wan bed's small umT5; development only (see load_tiny_wan_clip)."""

    DESCRIPTION = ("Development only: loads the tiny Wan test bed's small umT5 (the host's loader reads a one-layer "
                   "umT5 as T5-base).")
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/cones2_dev"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"umt5_name": (names, {"tooltip": "the bed's small umT5 file"})}}

    def load(self, umt5_name):
        import folder_paths

        return (load_tiny_wan_clip(folder_paths.get_full_path_or_raise("text_encoders", umt5_name),
                                   embedding_directory=folder_paths.get_folder_paths("embeddings")),)

QWEN_EMBED_KEY = "model.embed_tokens.weight"


def small_qwen_config(sd: dict) -> dict:
    """The host's ``qwen25_7b_model_config`` overrides that fit a Qwen2.5 text model state dict (layers, heads,
    MLP width; hidden width and vocabulary from the embedding table)."""
    if QWEN_EMBED_KEY not in sd or "model.layers.0.self_attn.q_proj.weight" not in sd:
        raise ValueError("this file is not a Qwen2.5 text model (no model.embed_tokens / layers.0.self_attn); "
                         "connect the tiny Qwen-Image bed's LLM file")
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    head_dim = 128  # the host's Qwen25_7BVLI_Config.head_dim (a class constant, not overridable)
    return {"num_hidden_layers": len(layers), "vocab_size": int(sd[QWEN_EMBED_KEY].shape[0]),
            "hidden_size": int(sd[QWEN_EMBED_KEY].shape[1]),
            "num_attention_heads": int(sd["model.layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
            "num_key_value_heads": int(sd["model.layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
            "intermediate_size": int(sd["model.layers.0.mlp.gate_proj.weight"].shape[0])}


def load_tiny_qwen_clip(llm_path: str, embedding_directory=None):
    """The host's Qwen-Image CLIP (tokenizer key "qwen25_7b") from a small Qwen2.5-7B-wide LLM file, through
    ``comfy.sd.load_text_encoder_state_dicts(..., clip_type=CLIPType.QWEN_IMAGE)`` as CLIPLoader (type
    qwen_image) calls it, plus the small config as the host's ``qwen25_7b_model_config`` override."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(llm_path, safe_load=True)
    return comfy.sd.load_text_encoder_state_dicts([sd], embedding_directory=embedding_directory,
                                                  clip_type=comfy.sd.CLIPType.QWEN_IMAGE,
                                                  model_options={"qwen25_7b_model_config": small_qwen_config(sd)})


class Cones2DevTinyQwenImageCLIPLoader:
    """CLIPLoader (type qwen_image) for the tiny Qwen-Image bed's small LLM; development only."""

    DESCRIPTION = ("Development only: loads the tiny Qwen-Image test bed's small Qwen2.5 LLM (the host's loader "
                   "always builds the full 28-layer Qwen2.5-VL-7B).")
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/cones2_dev"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        names = folder_paths.get_filename_list("text_encoders")
        return {"required": {"llm_name": (names, {"tooltip": "the bed's small Qwen2.5 LLM file"})}}

    def load(self, llm_name):
        import folder_paths

        return (load_tiny_qwen_clip(folder_paths.get_full_path_or_raise("text_encoders", llm_name),
                                    embedding_directory=folder_paths.get_folder_paths("embeddings")),)


def load_tiny_chroma_clip(t5_path: str, embedding_directory=None):
    """The host's Chroma CLIP (tokenizer key {"t5xxl"}: the PixArt T5 text encoder) from a small-T5 file, through
    ``comfy.sd.load_text_encoder_state_dicts(..., clip_type=CLIPType.CHROMA)`` as CLIPLoader (type chroma) calls
    it, plus the small T5 config as the host's ``t5xxl_model_config`` override (the bed's T5 has 24 thin layers,
    so the host's detection takes its T5-XXL branch)."""
    import comfy.sd
    import comfy.utils

    t5 = comfy.utils.load_torch_file(t5_path, safe_load=True)
    return comfy.sd.load_text_encoder_state_dicts([t5], embedding_directory=embedding_directory,
                                                  clip_type=comfy.sd.CLIPType.CHROMA,
                                                  model_options={"t5xxl_model_config": small_t5_config(t5)})


class Cones2DevTinyChromaCLIPLoader:
    """CLIPLoader (type chroma) for the tiny Chroma bed's small T5; development only (see load_tiny_chroma_clip)."""

    DESCRIPTION = ("Development only: loads the tiny Chroma test bed's small T5 (the host's Chroma loader always "
                   "builds the full T5-XXL).")
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/cones2_dev"

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"t5_name": (folder_paths.get_filename_list("text_encoders"),
                                         {"tooltip": "the bed's small T5 file"})}}

    def load(self, t5_name):
        import folder_paths

        return (load_tiny_chroma_clip(folder_paths.get_full_path_or_raise("text_encoders", t5_name),
                                      embedding_directory=folder_paths.get_folder_paths("embeddings")),)


NODE_CLASS_MAPPINGS = {"Cones2DevTinyFluxCLIPLoader": Cones2DevTinyFluxCLIPLoader,
                       "Cones2DevTinySD3CheckpointLoader": Cones2DevTinySD3CheckpointLoader,
                       "Cones2DevTinyWanCLIPLoader": Cones2DevTinyWanCLIPLoader,
                       "Cones2DevTinyQwenImageCLIPLoader": Cones2DevTinyQwenImageCLIPLoader,
                       "Cones2DevTinyChromaCLIPLoader": Cones2DevTinyChromaCLIPLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"Cones2DevTinyFluxCLIPLoader": "Cones2 DEV Tiny Flux CLIP Loader",
                              "Cones2DevTinySD3CheckpointLoader": "Cones2 DEV Tiny SD3.5 Checkpoint Loader",
                              "Cones2DevTinyWanCLIPLoader": "Cones2 DEV Tiny Wan CLIP Loader",
                              "Cones2DevTinyQwenImageCLIPLoader": "Cones2 DEV Tiny Qwen-Image CLIP Loader",
                              "Cones2DevTinyChromaCLIPLoader": "Cones2 DEV Tiny Chroma CLIP Loader"}
