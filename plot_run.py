"""A run's train and val loss curves as a PNG, read from its TensorBoard events.

    python plot_run.py --rundir=runs/shakespeare_char --out=loss.png

Reads the events with TensorBoard's own reader (tensorboard is in requirements.txt). Plotting
needs matplotlib, which this script alone uses: `pip install matplotlib`.
"""

import sys
from pathlib import Path

from cli import ArgumentParser, UserError, run_cli


def read_scalars(rundir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{tag: (steps, values)} for every scalar the run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(rundir.glob("events.out.tfevents.*")):
        raise UserError(f"{rundir} has no TensorBoard events: is it a run directory of launch.py?")
    events = EventAccumulator(str(rundir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: ([e.step for e in events.Scalars(tag)], [e.value for e in events.Scalars(tag)])
            for tag in events.Tags()["scalars"]}


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rundir", required=True, help="a run directory made by launch.py")
    parser.add_argument("--out", default="loss.png", help="the PNG to write (default loss.png)")
    parser.add_argument("--title", help="the plot's title (default: the run directory's name)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plot_run.py needs matplotlib: pip install matplotlib") from None

    from matplotlib.backend_bases import FigureCanvasBase

    out, formats = Path(args.out), FigureCanvasBase.get_supported_filetypes()
    if out.suffix.lstrip(".").lower() not in formats:
        raise UserError(f"--out={out}: the name must end in a format matplotlib writes "
                        f"({', '.join('.' + f for f in sorted(formats))}), e.g. loss.png")
    if not out.parent.is_dir():
        raise UserError(f"--out={out}: the directory {out.parent} does not exist: create it first")
    rundir = Path(args.rundir)
    scalars = read_scalars(rundir)
    curves = [("train/loss", "train loss (each step)", 0.35), ("eval/train_loss", "train loss (eval)", 1),
              ("eval/val_loss", "val loss (eval)", 1)]
    if not any(tag in scalars for tag, _, _ in curves):
        raise UserError(f"{rundir} has logged no losses yet")
    figure, axes = plt.subplots(figsize=(7, 4), dpi=120)
    for tag, label, alpha in curves:
        if tag in scalars:
            steps, values = scalars[tag]
            marker = "o" if tag.startswith("eval/") else None
            axes.plot(steps, values, label=label, alpha=alpha, marker=marker, markersize=3)
    if "eval/val_loss" in scalars:
        steps, values = scalars["eval/val_loss"]
        best = min(range(len(values)), key=values.__getitem__)
        axes.annotate(f"best val {values[best]:.3f} (step {steps[best]})",
                      (steps[best], values[best]), textcoords="offset points", xytext=(-150, 25),
                      arrowprops={"arrowstyle": "->"})
    axes.set(xlabel="step", ylabel="cross entropy (nats/token)", title=args.title or rundir.name)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(out)
    except OSError as e:  # read-only, no permission, a directory of that name, a full disk
        raise UserError(f"cannot write {out} ({e.strerror or e}): pass another --out") from None
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
