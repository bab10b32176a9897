"""Arguments and device handling shared by the evaluation CLIs."""
import torch

from lib.utils.errors import UserInputError
from lib.utils.model_loading import default_device, parse_dtype


def add_device_arguments(parser):
    """--device and --dtype (defaults: cuda when available; float16 on cuda, float32 on cpu)."""
    parser.add_argument("--device", default=None,
                        help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="float16|bfloat16|float32 (default float16 on cuda, float32 on cpu)")


def resolve_device(name: str | None) -> str:
    """The --device value checked (default cuda when available), as a string."""
    name = name or default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserInputError(f"unknown --device {name!r} ({err}); use cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserInputError(
            f"--device {name} requested but CUDA is not available; use --device cpu")
    return name


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """--dtype, or float16 on cuda and float32 on cpu."""
    return parse_dtype(name or ("float16" if torch.device(device).type == "cuda" else "float32"))


def gpu_name(device: str) -> str | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.get_device_name(torch.device(device))
