"""Fine-tuning after quantization (QuIP# fact sheet, section 7).

Codes (and fused scales folded into SV) stay fixed; what trains is chosen by
`trainable_groups`: the quantized linears' sign/scale vectors SU, SV (`susv_lr`),
HARP's rotation parameters (`harp_lr`, only when > 0), and every other parameter of
the module that is not frozen by the caller (`lr`: unquantized linears, norms, head).
`finetune` runs Adam with gradient accumulation, float16 autocast and a grad scaler on
CUDA, a validation pass before training and after every epoch, keeps the best state
(the initial one included) and stops after `early_stop` epochs without improvement.
"""
import math
from dataclasses import dataclass

import torch

from lib.linear.quantized_linear import QuantizedLinear
from lib.utils.errors import UserInputError


@dataclass
class FinetuneOptions:
    epochs: int = 5
    lr: float = 5e-5
    susv_lr: float = 5e-4
    harp_lr: float = 5e-7
    bs: int = 4
    update_freq: int = 2
    valid_size: int = 128
    early_stop: int = 3
    train_mode: bool = False

    def check(self, devset_size):
        for name in ("epochs", "bs", "update_freq", "early_stop"):
            if getattr(self, name) < 1:
                raise UserInputError(f"--ft_{name} must be >= 1 when fine-tuning, got {getattr(self, name)}")
        for name in ("lr", "susv_lr", "harp_lr"):
            if getattr(self, name) < 0:
                raise UserInputError(f"--ft_{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.valid_size < devset_size:
            raise UserInputError(f"--ft_valid_size {self.valid_size} must be between 1 and "
                                 f"--devset_size - 1 = {devset_size - 1}")


def trainable_groups(module, opts):
    """Adam parameter groups of `module`: SU/SV of its quantized linears, HARP theta (if
    harp_lr > 0), and its other parameters that require grad. Marks them trainable."""
    susv, theta, quantized_params = [], [], set()
    for linear in (m for m in module.modules() if isinstance(m, QuantizedLinear)):
        for name in ("SU", "SV"):
            buffer = getattr(linear.processor, name)
            buffer.requires_grad_(True)
            susv.append(buffer)
        for param in linear.parameters():
            quantized_params.add(param)
            param.requires_grad_(opts.harp_lr > 0)
            if opts.harp_lr > 0:
                theta.append(param)
    rest = [p for p in module.parameters() if p.requires_grad and p not in quantized_params]
    groups = [{"params": rest, "lr": opts.lr}, {"params": susv, "lr": opts.susv_lr}]
    if theta:
        groups.append({"params": theta, "lr": opts.harp_lr})
    return [g for g in groups if g["params"]]


def _snapshot(groups):
    return [t.detach().clone() for g in groups for t in g["params"]]


@torch.no_grad()
def _restore(groups, snapshot):
    for tensor, value in zip((t for g in groups for t in g["params"]), snapshot):
        tensor.copy_(value)


def _mean_loss(loss_fn, batches, device):
    with torch.no_grad(), _autocast(device):
        losses = [loss_fn(batch).float().item() for batch in batches]
    return sum(losses) / len(losses)


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.float16) if torch.device(device).type == "cuda" \
        else torch.autocast("cpu", enabled=False)


def finetune(module, loss_fn, train_batches, valid_batches, opts, device):
    """Train `module` (its `trainable_groups`) on `loss_fn(batch)` over the train batches;
    returns {"valid_start", "valid_best", "epochs_run", "best_epoch"}. The module ends in
    its best-validation state with nothing left trainable."""
    groups = trainable_groups(module, opts)
    optimizer = torch.optim.Adam(groups)
    scaler = torch.amp.GradScaler("cuda", enabled=torch.device(device).type == "cuda")
    best = _mean_loss(loss_fn, valid_batches, device)
    result = {"valid_start": best, "valid_best": best, "epochs_run": 0, "best_epoch": 0}
    best_state, stale = _snapshot(groups), 0
    for epoch in range(1, opts.epochs + 1):
        optimizer.zero_grad(set_to_none=True)
        for step, batch in enumerate(train_batches, 1):
            with _autocast(device):
                loss = loss_fn(batch) / opts.update_freq
            if not math.isfinite(loss.item()):
                raise RuntimeError("fine-tuning loss is not finite; lower --ft_lr / --ft_susv_lr")
            scaler.scale(loss).backward()
            if step % opts.update_freq == 0 or step == len(train_batches):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
        valid = _mean_loss(loss_fn, valid_batches, device)
        result["epochs_run"] = epoch
        if valid < result["valid_best"]:
            result.update(valid_best=valid, best_epoch=epoch)
            best_state, stale = _snapshot(groups), 0
        else:
            stale += 1
            if stale >= opts.early_stop:
                break
    _restore(groups, best_state)
    for tensor in (t for g in groups for t in g["params"]):
        tensor.requires_grad_(False)
    return result


def split_batches(n, bs, valid_size):
    """(train index batches, valid index batches): the last `valid_size` sequences validate."""
    train = torch.arange(n - valid_size).split(bs)
    valid = torch.arange(n - valid_size, n).split(bs)
    return list(train), list(valid)
