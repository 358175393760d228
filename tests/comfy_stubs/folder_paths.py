"""Stand-in for ComfyUI folder_paths.py (a125cd8)."""

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # L12
folder_names_and_paths = {}  # L14: name -> (list of paths, set of extensions)
models_dir = os.environ.get("DIFFSR_TEST_MODELS", "/nonexistent-models")  # L22
folder_names_and_paths["checkpoints"] = ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions)
folder_names_and_paths["configs"] = ([os.path.join(models_dir, "configs")], [".yaml"])  # L24
folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], ["folder"])  # L33


def get_folder_paths(folder_name):  # L232
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):  # L351: relative file names with an allowed extension, sorted
    paths, exts = folder_names_and_paths.get(folder_name, ([], set()))
    out = []
    for root in paths:
        if os.path.isdir(root):
            for dirpath, _, names in os.walk(root, followlinks=True):
                for n in names:
                    if not exts or os.path.splitext(n)[1].lower() in exts:
                        out.append(os.path.relpath(os.path.join(dirpath, n), root))
    return sorted(out)


def get_full_path(folder_name, filename):  # L282: None when no folder has the file
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root in get_folder_paths(folder_name):
        path = os.path.join(root, filename)
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name, filename):  # L302
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path
