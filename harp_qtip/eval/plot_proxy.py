"""Plot the per-layer proxy loss of quantization runs (e.g. had vs harp) to a PNG.

    python -m eval.plot_proxy had=runs/x/had_2bit harp=runs/x/harp_2bit --output proxy.png

One panel per site (qkv, o, up, down): the LDLQ proxy loss tr(D H D^T) / tr(W H W^T)
of every layer, one line per run (read from the runs' layer_*.json logs). A last
panel shows the ratio of each run to the first one, per layer and site.
"""
import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lib.utils.errors import UserInputError, run_cli  # noqa: E402
from lib.utils.hessian import SITES  # noqa: E402
from lib.utils.io import read_json  # noqa: E402


def proxy_by_site(quant_dir):
    """{site: {layer: proxy loss}} from a run's layer logs."""
    paths = sorted(Path(quant_dir).glob("layer_*.json"))
    if not paths:
        raise UserInputError(f"no layer_*.json logs in {quant_dir}; is it a quantize_finetune_llama folder?")
    out = {site: {} for site in SITES}
    for path in paths:
        log = read_json(path)
        for site, stats in log["sites"].items():
            out[site][log["layer_idx"]] = stats["proxy_loss"]
    return out


def plot(runs, output):
    fig, axes = plt.subplots(1, len(SITES) + 1, figsize=(4 * (len(SITES) + 1), 3.6))
    base_label, base = runs[0]
    for ax, site in zip(axes, SITES):
        for label, data in runs:
            layers = sorted(data[site])
            ax.plot(layers, [data[site][i] for i in layers], marker=".", label=label)
        ax.set_title(f"{site}: proxy loss")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
    ratio_ax = axes[-1]
    for label, data in runs[1:]:
        for site in SITES:
            layers = sorted(set(data[site]) & set(base[site]))
            ratio_ax.plot(layers, [data[site][i] / base[site][i] for i in layers], marker=".",
                          label=f"{label} {site}")
    ratio_ax.axhline(1.0, color="black", linewidth=0.8)
    ratio_ax.set_title(f"ratio to {base_label}")
    ratio_ax.set_xlabel("layer")
    axes[0].legend()
    if len(runs) > 1:
        ratio_ax.legend(fontsize=7)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=QUANT_DIR (the first is the reference of the ratios)")
    p.add_argument("--output", required=True, help="PNG file")
    args = p.parse_args(argv)
    runs = []
    for entry in args.runs:
        if "=" not in entry:
            raise UserInputError(f"{entry!r} is not LABEL=QUANT_DIR")
        label, path = entry.split("=", 1)
        runs.append((label, proxy_by_site(path)))
    plot(runs, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
