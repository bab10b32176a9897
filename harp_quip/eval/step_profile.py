"""Where the time of one decode step goes: torch.profiler over a few eager steps.

eval_speed --profile N records, for every timed model, the N operators with the most
self time per step: device (CUDA kernel) time on a GPU, CPU time on the CPU. The steps
run eagerly (the timed CUDA-graph replays hide their kernels from the profiler), so
launch overheads are not in these numbers, only the time the kernels themselves take.
"""
import torch
from torch.profiler import ProfilerActivity, profile


def _self_time_us(event, on_device):
    """Self time of a profiler average in µs (device time of its kernels on CUDA)."""
    return event.self_device_time_total if on_device else event.self_cpu_time_total


@torch.no_grad()
def profile_steps(step, device, steps, top):
    """Run `step()` (already warm) `steps` times under the profiler and summarize the
    average step:
    {"steps", "self_us_per_step" (all operators), "top": [{"name", "calls_per_step",
    "us_per_step", "us_per_call", "share"}, ...] sorted by self time, `top` entries}."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if _self_time_us(e, on_device) > 0]
    events.sort(key=lambda e: _self_time_us(e, on_device), reverse=True)
    total = sum(_self_time_us(e, on_device) for e in events)
    rows = [{"name": e.key, "calls_per_step": e.count / steps,
             "us_per_step": _self_time_us(e, on_device) / steps,
             "us_per_call": _self_time_us(e, on_device) / e.count,
             "share": _self_time_us(e, on_device) / total} for e in events[:top]]
    return {"steps": steps, "time": "device" if on_device else "cpu",
            "self_us_per_step": total / steps, "top": rows}


def profile_table(label, summary):
    """The summary as text lines, the largest share first."""
    lines = [f"{label}: {summary['self_us_per_step']:.1f} µs of {summary['time']} time per step "
             f"(eager, {summary['steps']} steps)",
             f"  {'share':>6} {'µs/step':>9} {'calls':>6} {'µs/call':>8}  operator"]
    lines += [f"  {row['share']:>6.1%} {row['us_per_step']:>9.1f} {row['calls_per_step']:>6.1f} "
              f"{row['us_per_call']:>8.2f}  {row['name'][:90]}" for row in summary["top"]]
    return "\n".join(lines)
