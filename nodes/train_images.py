"""Train Residual's images: the IMAGE batch and folder inputs as RGB tensors, resized and VAE-encoded once."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..cones2_core.errors import Cones2Error

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The smallest training image, in pixels on its short side: 8 latent pixels of the SD VAE (4 x 4 tokens of Flux's
# patches). A smaller picture is upscaled to the training resolution (512 or more) into a blur that holds next to
# nothing of the subject, and a 1 x 1 image is a single colour.
MIN_SIDE = 64


def _check_size(img: torch.Tensor, what: str) -> torch.Tensor:
    """``img`` [H, W, 3] when its short side has at least MIN_SIDE pixels; else an error naming ``what``."""
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise Cones2Error(f"{what} is {w} x {h} pixels; training needs at least {MIN_SIDE} pixels on the short side "
                          f"({MIN_SIDE // 8} latent pixels: a smaller picture is upscaled to the training resolution "
                          "into a blur that holds nothing of the subject). Use a larger picture of the subject, or "
                          "leave this one out")
    return img


def _to_rgb(img: torch.Tensor) -> torch.Tensor:
    """[H, W, C] in 0..1 with C of 1 (grey), 2 (grey + alpha), 3 or 4 (RGBA) -> RGB, alpha composited on white."""
    img = img.float()
    c = img.shape[-1]
    if c in (2, 4):
        alpha = img[..., -1:].clamp(0, 1)
        img = img[..., :-1] * alpha + (1.0 - alpha)
        c -= 1
    if c == 1:
        img = img.expand(*img.shape[:-1], 3)
    elif c != 3:
        raise Cones2Error(f"an image has {img.shape[-1]} channels; connect RGB, RGBA or greyscale images")
    return img.clamp(0, 1)


def _folder_images(image_folder: str) -> list[torch.Tensor]:
    """The images in a folder under ComfyUI's input directory (sorted by name), as [H, W, 3] tensors."""
    import folder_paths
    from PIL import Image, ImageOps

    root = folder_paths.get_input_directory()
    name = image_folder.strip()
    hint = "image_folder must be a folder inside ComfyUI's input directory, e.g. 'my_dog'"
    if os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in name.replace("\\", "/").split("/"):
        raise Cones2Error(f"{hint}; {image_folder!r} is absolute or climbs out with '..'")
    real_root = os.path.realpath(root)
    folder = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([real_root, folder]) != real_root:
        raise Cones2Error(f"{hint}; {image_folder!r} resolves outside it (via a symlink?)")
    if not os.path.isdir(folder):
        raise Cones2Error(f"{hint}; there is no folder {image_folder!r} in {root}")
    out = []
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not entry.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
            continue
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            continue
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im = im.convert("RGBA" if ("A" in im.getbands() or "transparency" in im.info) else "RGB")
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except Image.DecompressionBombError as e:
            raise Cones2Error(f"the image {entry!r} in {image_folder!r} has more pixels than PIL opens safely (over "
                              f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,}: it refuses such files as possible decompression "
                              "bombs); resize it to a few thousand pixels on its long side (training crops are at "
                              "most 2048 pixels) or remove it") from e
        except OSError as e:
            raise Cones2Error(f"cannot read the image {entry!r} in {image_folder!r} ({e}); remove or re-save it") from e
        out.append(_check_size(_to_rgb(torch.from_numpy(arr.copy())), f"the image {entry!r} in {image_folder!r}"))
    if not out:
        raise Cones2Error(f"the folder {image_folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return out


def collect_images(images: torch.Tensor | None, image_folder: str = "") -> list[torch.Tensor]:
    """All training images as RGB [H, W, 3] float tensors (the IMAGE batch, then the folder's files)."""
    out = []
    if images is not None:
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
            raise Cones2Error("the images input must be an IMAGE batch [B, H, W, C]; connect e.g. Load Image")
        batch = images if images.ndim == 4 else images.unsqueeze(0)
        out += [_check_size(_to_rgb(img), f"image {i + 1} of the images input") for i, img in enumerate(batch)]
    if image_folder and image_folder.strip():
        out += _folder_images(image_folder)
    if not out:
        raise Cones2Error("no training images: connect 3-5 images of the subject to 'images' or name a folder of "
                          "them (inside ComfyUI's input directory) in 'image_folder'")
    return out


def _resize_for_training(img: torch.Tensor, resolution: int) -> torch.Tensor:
    """[H, W, 3] -> [h, w, 3] with the short side = resolution, the long side at most 2x, both multiples of 8."""
    h, w = img.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    x = img.permute(2, 0, 1).unsqueeze(0)
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    ch, cw = min(nh, 2 * resolution) // 8 * 8, min(nw, 2 * resolution) // 8 * 8
    top, left = (nh - ch) // 2, (nw - cw) // 2
    return x[0, :, top:top + ch, left:left + cw].permute(1, 2, 0).clamp(0, 1).contiguous()


def encode_latents(vae, model, images: list[torch.Tensor], resolution: int) -> list[torch.Tensor]:
    """Each image resized and VAE-encoded once, in the diffusion model's latent space: [C, h, w] each (a video
    VAE's single latent frame, as a still)."""
    out = []
    with torch.no_grad():
        for img in images:
            pixels = _resize_for_training(img, resolution).unsqueeze(0)
            lat = model.model.process_latent_in(vae.encode(pixels).float())
            if lat.ndim == 5:  # a video VAE (Wan) encodes one image as one latent frame [1, C, 1, h, w]
                lat = lat[:, :, 0]
            out.append(lat[0].detach().clone().cpu())
    return out
