"""The toy world's VAE: the host's SD VAE class with analytic weights (a linear block-colour codec).

Pictures of the world (``toy_world.picture``) encode to its latents exactly and decoded samples show the
objects; ``toy_world.latent_of_picture`` is the same encoder without the host. Part of the toy checkpoint's
cache key (``toy_world.BUILD_FILES``).
"""

from __future__ import annotations

import math

from harness.toy_world import VAE_GAIN

VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
CARRIER = 1000.0  # the constant channel pair that keeps every GroupNorm linear
SILU_SHIFT = 20.0  # inputs to the last SiLUs are shifted up by this, where silu(x) = x to 1e-8


def build_vae():
    """The SD VAE (host class, SD1.5's configuration) with analytic weights: linear block-colour codec.

    Signal layout in both halves: for colour c, channel 4c carries the colour, 4c+1 its negative and 4c+2 / 4c+3
    the carriers +CARRIER / -CARRIER, so every GroupNorm group that holds signal has mean 0 and a standard
    deviation fixed by the carriers (the colour changes it by under 1e-6). Residual branches (conv2, the
    attention's proj_out) are zero, channel changes are identity shortcuts, downsampling averages 2x2, upsampling
    is nearest. The encoder maps the mean colour of each 8x8 block (in [-1, 1]) to VAE_GAIN times it in latent
    channels 0..2; the decoder inverts that."""
    import comfy.ldm.models.autoencoder
    import torch

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
    sd = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in vae.state_dict().items()}
    for k in sd:
        if (".norm" in k or k.endswith(("norm1.weight", "norm2.weight"))) and k.endswith(".weight"):
            sd[k].fill_(1.0)

    def eye_conv(key, n=12):
        w = sd[key]
        kh, kw = w.shape[-2:]
        for c in range(n):
            w[c, c, kh // 2, kw // 2] = 1.0

    def codec_in(prefix, weights):  # weights[c] = (input channel, gain) for colour c
        w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
        kh, kw = w.shape[-2:]
        for c, (src, gain) in enumerate(weights):
            w[4 * c, src, kh // 2, kw // 2] = gain
            w[4 * c + 1, src, kh // 2, kw // 2] = -gain
            b[4 * c + 2], b[4 * c + 3] = CARRIER, -CARRIER

    def norm_out(prefix, group_size):
        # var of a signal group = carriers' share (+ under 1e-6 from the signal): CARRIER^2 * (pairs * 2 / size)
        pairs = 3 if group_size >= 12 else 1
        std = CARRIER * math.sqrt(2 * pairs / group_size)
        for c in range(3):
            sd[prefix + ".weight"][4 * c] = std
            sd[prefix + ".bias"][4 * c] = SILU_SHIFT
        for c in range(sd[prefix + ".weight"].shape[0]):
            if c % 4 or c >= 12:
                sd[prefix + ".weight"][c] = 0.0

    def codec_out(prefix, gain, outputs):
        w, b = sd[prefix + ".weight"], sd[prefix + ".bias"]
        kh, kw = w.shape[-2:]
        for c in range(outputs):
            w[c, 4 * c, kh // 2, kw // 2] = gain
            b[c] = -gain * SILU_SHIFT

    for k in sd:
        if k.endswith(("nin_shortcut.weight", "upsample.conv.weight")):
            eye_conv(k)
        elif k.endswith("downsample.conv.weight"):
            for c in range(12):
                sd[k][c, c, 0:2, 0:2] = 0.25
    codec_in("encoder.conv_in", [(c, 1.0) for c in range(3)])
    norm_out("encoder.norm_out", sd["encoder.norm_out.weight"].shape[0] // 32)
    codec_out("encoder.conv_out", VAE_GAIN, 3)
    eye_conv("quant_conv.weight", 8)
    eye_conv("post_quant_conv.weight", 4)
    codec_in("decoder.conv_in", [(c, 1.0 / VAE_GAIN) for c in range(3)])
    norm_out("decoder.norm_out", sd["decoder.norm_out.weight"].shape[0] // 32)
    codec_out("decoder.conv_out", 1.0, 3)
    vae.load_state_dict(sd)
    return vae
