"""The ``adbench`` command line: thin typed commands over the library; adbench errors become one red line."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichBar
from rich.table import Table

from adbench.errors import AdbenchError, ConfigError
from adbench.progress import Progress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmark normalizing-flow anomaly detectors.")
console = Console(stderr=True)
out = Console()


class RichProgress(Progress):
    """Progress bars on stderr (transient per task, one line left per finished task)."""

    def __init__(self) -> None:
        self.bar = RichBar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=console,
        )  # fmt: skip

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator:
        task = self.bar.add_task(escape(description), total=total, info="")  # names may hold [brackets]

        def advance(n: int = 1, total: int | None = None, **fields) -> None:
            info = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            self.bar.update(task, advance=n, **({"total": total} if total else {}), **({"info": info} if info else {}))

        yield advance

    def log(self, message: str) -> None:
        console.print(f"[dim]{escape(message)}[/]")


@contextmanager
def _errors() -> Iterator[None]:
    """Turn adbench errors, running out of memory and Ctrl-C into one line and a non-zero exit code."""
    try:
        yield
    except AdbenchError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as err:  # a path the user gave that cannot be read or written
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except (MemoryError, RuntimeError) as err:  # torch's CPU allocator raises RuntimeError, CUDA's a subclass
        text = str(err)
        if not isinstance(err, MemoryError) and "out of memory" not in text and "can't allocate memory" not in text:
            raise
        line = next((part.strip() for part in text.splitlines() if "memory" in part), text.strip()) or "MemoryError"
        line = ". ".join(line.split(". ")[:2]) if "out of memory" in line else line  # CUDA's runs 500 characters
        console.print(f"[bold red]error: out of memory[/] ({escape(line)}); try a smaller --image-size or "
                      "--batch-size; earlier runs are kept", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] the current run was not written; earlier runs are kept")
        raise typer.Exit(130) from None


def _parse_sets(pairs: list[str]) -> dict[str, str]:
    out_: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out_[key.strip()] = value.strip()
    return out_


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


# run and sweep: where the dataset folders are (download names the same option, with its older --root too)
DataRoot = Annotated[Path | None, typer.Option(envvar="ADBENCH_DATA", help="Folder holding mvtec/, btad/, mtd/.")]


@app.command()
def run(
    model: Annotated[str, typer.Option(help="Detector (see `adbench list models`).")] = "fastflow",
    dataset: Annotated[str, typer.Option(help="Dataset (see `adbench list datasets`).")] = "synthetic",
    category: Annotated[str, typer.Option(help="Category, or 'all'.")] = "all",
    data_root: DataRoot = None,
    root: Annotated[Path | None, typer.Option(help="Dataset folder for --dataset folder (MVTec layout).")] = None,
    backbone: Annotated[str, typer.Option(help="Feature extractor (see `adbench list backbones`).")] = (
        "tf_efficientnet_lite0"
    ),
    weights: Annotated[
        str | None, typer.Option(help="Backbone weights: a timm state-dict file, or 'random'. Default: ImageNet.")
    ] = None,
    image_size: Annotated[int, typer.Option(min=32, help="Images are resized to this square size.")] = 256,
    geometry: Annotated[
        str, typer.Option(help="How images become square: squash (resize, aspect ratio lost) or pad (aspect ratio "
                               "kept, reflect-padded; metrics on the same squashed masks).")
    ] = "squash",
    epochs: Annotated[int | None, typer.Option(min=0, help="Training epochs (default: the model's).")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Batch size (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed for python, numpy and torch.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    results_dir: Annotated[Path, typer.Option(help="Runs go to RESULTS_DIR/runs/.")] = Path("results"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field: key=value.")] = None,
    preset: Annotated[str | None, typer.Option(help="Named config preset, e.g. 'paper' (full schedule).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Keep extracted features here across runs.")] = None,
    save_maps: Annotated[
        bool | None,
        typer.Option("--save-maps/--no-save-maps", show_default=False,
                     help="Write maps.png (anomaly maps of the most telling test images), roc.png and pro.png next "
                          "to result.json. Default: on when the test split has at most 300 images."),
    ] = None,
    validation: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Hold out this fraction of the training images: they are scored "
                                                   "as they are and with synthetic defects (result 'validation'); "
                                                   "choose settings on that, not on the test split.")
    ] = 0.0,
    feature_precision: Annotated[
        str, typer.Option(help="Backbone features: fp32 (every device, no TF32) or fp16 (CUDA autocast, faster; on "
                               "the CPU the outputs rounded to fp16). Recorded in result.json.")
    ] = "fp32",
) -> None:
    """Train one detector on one category (or all) and write result.json per run."""
    from adbench.runner import RunSpec
    from adbench.runner import run as run_spec

    with _errors():
        overrides = _parse_sets(set_ or [])
        if epochs is not None:
            overrides["epochs"] = epochs
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        spec = RunSpec(model=model, dataset=dataset, category=category, data_root=data_root, root=root,
                       backbone=backbone, weights=weights, image_size=image_size, geometry=geometry, seed=seed,
                       device=device, results_dir=results_dir, overrides=overrides, preset=preset, cache_dir=cache_dir,
                       save_maps=save_maps, validation=validation, feature_precision=feature_precision)
        progress = RichProgress()
        with progress.bar:
            folders = run_spec(spec, progress)
    table = Table(title=f"{model} on {dataset} (%)")
    for col in ("category", "Img AUROC", "Pix AUROC", "Img AUPR", "Pix AUPR", "AUPRO", "img/s"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for folder in folders:
        r = json.loads((folder / "result.json").read_text())
        m = r["metrics"]
        table.add_row(escape(r["category"]), *(_fmt(m[k]) for k in ("image_auroc", "pixel_auroc", "image_aupr",
                                                           "pixel_aupr", "aupro")),
                      f"{r['timing']['test_images_per_s']:.1f}")
    out.print(table)
    for folder in folders:
        console.print(f"wrote {escape(str(folder / 'result.json'))}", highlight=False, soft_wrap=True)


@app.command()
def report(
    results_dir: Annotated[Path, typer.Option(help="Where the runs are (RESULTS_DIR/runs/).")] = Path("results"),
    output: Annotated[Path | None, typer.Option(help="Also write the markdown here.")] = None,
    figures: Annotated[
        bool, typer.Option(help="Also write PNG charts next to --output and embed them: bars per metric, "
                                "speed vs Image AUROC, Image AUROC per category.")
    ] = False,
    published: Annotated[
        Path | None, typer.Option(help="Folder of published-number CSVs shown beside ours (default: results/published "
                                       "of this repository).")
    ] = None,
) -> None:
    """Print markdown tables of every run found: one per metric, a mean row per dataset."""
    from adbench.report import report_with_figures

    with _errors():
        if figures and output is None:
            raise ConfigError("--figures needs --output FILE.md (the PNGs are written next to it)")
        text, pngs = report_with_figures(results_dir, output.stem if figures and output is not None else None,
                                         published)
        print(text)
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            for name, png in pngs.items():
                (output.parent / name).write_bytes(png)
            output.write_text(text)
            console.print(f"wrote {escape(str(output))}" + (f" and {len(pngs)} figures next to it" if pngs else ""),
                          highlight=False)


@app.command()
def sweep(
    grid: Annotated[Path, typer.Argument(  # rich markup: a bare [x] would vanish from the help
        help=r"Grid file (TOML): models, datasets, seeds, \[overrides], \[model.X], \[vary], \[\[variant]].")],
    results_dir: Annotated[Path, typer.Option(help="Runs go to RESULTS_DIR/runs/.")] = Path("results"),
    executor: Annotated[str, typer.Option(help="local, submitit-local or slurm.")] = "local",
    data_root: DataRoot = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and their settings; run nothing.")] = False,
    rerun_stale: Annotated[bool, typer.Option(
        "--rerun-stale", help="Rerun stale cells (their run was made by other detector code); default: keep and list.")
    ] = False,
) -> None:
    """Run every cell of a grid that has not been run yet (resumable; failures are recorded, the rest go on)."""
    from adbench.results import check_writable
    from adbench.sweep import expand, load_grid, run_sweep

    with _errors():
        spec = load_grid(grid)
        cells = expand(spec, results_dir, data_root, need_data=not dry_run)
        if dry_run:
            from adbench.sweep import cell_states

            states = cell_states(cells)  # done, stale, todo, or queued/running on Slurm or in another sweep
            for cell in cells:
                print(f"{states[cell.key]}  {cell.name}  {cell.settings()}")
            stale = sum(state.startswith("stale") for state in states.values())
            unknown = sum(state == "done (unknown code)" for state in states.values())
            todo = sum(state == "todo" for state in states.values()) + (stale if rerun_stale else 0)
            lines = [f"{len(cells)} cells, {todo} to run"]
            if stale:
                kept = "rerun (--rerun-stale)" if rerun_stale else "kept: --rerun-stale reruns them"
                lines.append(f"{stale} stale (run by other detector code), {kept}")
            if unknown:
                lines.append(f"{unknown} done by runs of unknown code (they record none), kept")
            console.print(escape("; ".join(lines)), highlight=False, soft_wrap=True)
            return
        check_writable(results_dir)
        counts: dict[str, int] = {}

        def show(status: dict) -> None:
            counts[status["status"]] = counts.get(status["status"], 0) + 1
            extra = status.get("error") or status.get("path") or ""
            extra += f" (code {status['code']}, now {status['now']})" if status["status"] == "stale" else ""
            console.print(escape(f"{status['status']:6s} {status['name']}  {extra}"), highlight=False, soft_wrap=True)

        statuses = run_sweep(cells, executor, spec.get("slurm"), on_result=show, rerun_stale=rerun_stale)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        console.print(f"{len(cells)} cells: {summary}", highlight=False)
        stale = [s["name"] for s in statuses if s["status"] == "stale"]
        if stale:  # kept, not a failure
            console.print(escape(f"{len(stale)} stale cell(s) kept (run by other detector code): {', '.join(stale)}; "
                                 "--rerun-stale reruns them"), highlight=False, soft_wrap=True)
        failed = [s["name"] for s in statuses if s["status"] == "failed"]
        busy = [s["name"] for s in statuses if s["status"] not in ("done", "ran", "failed", "stale")]
        problems = [f"{len(failed)} cell(s) failed: {', '.join(failed)}; their errors are in {results_dir / 'failures'}"
                    ] if failed else []
        if busy:  # a sweep is done only when every cell is: one still held elsewhere needs another pass
            problems.append(f"{len(busy)} cell(s) not run, held by another sweep or Slurm job: {', '.join(busy)} "
                            f"(locks in {results_dir / 'locks'}); run the sweep again once they end")
        if problems:
            raise AdbenchError("; ".join(problems))


class Listable(str, Enum):
    models = "models"
    datasets = "datasets"
    backbones = "backbones"


@app.command("list")
def list_(what: Annotated[Listable, typer.Argument(help="What to list.")]) -> None:
    """List registered models, datasets or backbones."""
    if what is Listable.models:
        from adbench.models import list_models as names
    elif what is Listable.datasets:
        from adbench.datasets import list_datasets as names
    else:
        from adbench.features import list_backbones as names
    reference = set()
    if what is Listable.models:
        from adbench.results import is_reference

        reference = {name for name in names() if is_reference(name)}
    for name in names():
        print(name + ("  (reference baseline, not a flow)" if name in reference else ""))


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="mvtec, btad or mtd.")],
    root: Annotated[Path | None, typer.Option(
        "--data-root", "--root", envvar="ADBENCH_DATA",  # --root: its first name; run's --data-root means the same
        help="Data root, as run's --data-root: the data goes to DATA_ROOT/<name> (default ~/.cache/adbench/datasets).",
    )] = None,
    force: Annotated[bool, typer.Option(help="Download again even if present.")] = False,
) -> None:
    """Download a dataset into DATA_ROOT/<name> (resumable, checksum-verified)."""
    from adbench.datasets import default_data_root
    from adbench.download import download_dataset, get_source

    with _errors():
        get_source(name)  # an unknown name fails before a progress bar is drawn
        bar = RichProgress()
        with bar.bar, bar.task(f"download {name}", total=None) as advance:
            state = {"done": 0}

            def report_bytes(done: int, total: int | None) -> None:
                advance(done - state["done"], total=total)
                state["done"] = done

            path = download_dataset(name, root or default_data_root(), progress=report_bytes, force=force)
    console.print(escape(f"{name} is ready at {path}"), highlight=False)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="adbench")

