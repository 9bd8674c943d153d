"""The ``cones2_residuals`` model folder (``models/cones2_residuals/`` and ``extra_model_paths.yaml``)."""

from __future__ import annotations

import os

import folder_paths

FOLDER = "cones2_residuals"
EXTENSIONS = {".safetensors", ".pt", ".pth", ".bin"}


def register_model_folder() -> None:
    """Add models/cones2_residuals as the default residuals folder, keeping any paths that
    extra_model_paths.yaml already gave under the same name."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER]
        if default not in paths:
            paths.insert(0, default)
        folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    else:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))


def residual_folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER)


def default_residual_folder() -> str:
    folder = residual_folders()[0]
    os.makedirs(folder, exist_ok=True)
    return folder
