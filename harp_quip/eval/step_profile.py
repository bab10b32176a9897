"""Where the time of one decode step goes: torch.profiler over a few eager steps.

eval_speed --profile N records, for every timed model, the N entries with the most self
time per step: CUDA kernels and their device time on a GPU (each kernel once, not also
through the operator that launched it), operators and their CPU time on the CPU. The steps
run eagerly (the timed CUDA-graph replays hide their kernels from the profiler), so
launch overheads are not in these numbers, only the time the kernels themselves take.
"""
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _timed_events(prof, on_device):
    """(profiler average, its self time in µs) of the kernels (on a GPU) or the operators
    (on the CPU) that took time."""
    if on_device:
        pairs = [(e, e.self_device_time_total) for e in prof.key_averages()
                 if e.device_type == DeviceType.CUDA]
    else:
        pairs = [(e, e.self_cpu_time_total) for e in prof.key_averages()]
    return [(e, us) for e, us in pairs if us > 0]


@torch.no_grad()
def profile_steps(step, device, steps, top):
    """Run `step()` (already warm) `steps` times under the profiler and summarize the
    average step (kernels on CUDA, operators on the CPU; see the module docstring):
    {"steps", "time", "self_us_per_step" (all entries), "top": [{"name", "calls_per_step",
    "us_per_step", "us_per_call", "share"}, ...] sorted by self time, `top` entries}."""
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if on_device:
            torch.cuda.synchronize(device)
    events = sorted(_timed_events(prof, on_device), key=lambda pair: pair[1], reverse=True)
    total = sum(us for _, us in events)
    rows = [{"name": e.key, "calls_per_step": e.count / steps, "us_per_step": us / steps,
             "us_per_call": us / e.count, "share": us / total} for e, us in events[:top]]
    return {"steps": steps, "time": "device" if on_device else "cpu",
            "self_us_per_step": total / steps, "top": rows}


def profile_table(label, summary):
    """The summary as text lines, the largest share first."""
    lines = [f"{label}: {summary['self_us_per_step']:.1f} µs of {summary['time']} time per step "
             f"(eager, {summary['steps']} steps)",
             f"  {'share':>6} {'µs/step':>9} {'calls':>6} {'µs/call':>8}  "
             f"{'kernel' if summary['time'] == 'device' else 'operator'}"]
    lines += [f"  {row['share']:>6.1%} {row['us_per_step']:>9.1f} {row['calls_per_step']:>6.1f} "
              f"{row['us_per_call']:>8.2f}  {row['name'][:90]}" for row in summary["top"]]
    return "\n".join(lines)
