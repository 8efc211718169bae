"""``rlvr-lin``: one command-line app, a thin layer over the library.

Each subcommand parses arguments, resolves catalog names, calls one library
function and prints a table. A ``PipelineError`` becomes one line on stderr
and exit code 2; nothing here holds logic worth testing on its own.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pipeline.errors import PipelineError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Linear dynamics of RLVR training: ingest checkpoints, fit, extrapolate.",
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Report ``PipelineError`` as one line and exit 2 instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


Scheduler = Annotated[
    str | None,
    typer.Option(help="address of an existing Dask scheduler (default: a LocalCluster)",
                 envvar="DASK_SCHEDULER_ADDRESS"),
]
CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="catalog file (default ./data_catalog.yaml)")
]


@app.command("make-tiny-run")
@user_errors
def make_tiny_run_cmd(
    out: Annotated[Path, typer.Argument(help="folder to create; global_step_N/ go inside")],
    seed: int = 0,
    arch: Annotated[str, typer.Option(help="qwen2 or llama")] = "qwen2",
    dtype: Annotated[str, typer.Option(help="checkpoint dtype: float32 or bfloat16")] = "bfloat16",
    max_shard_size: Annotated[
        str | None, typer.Option(help="shard the safetensors, e.g. 200KB")
    ] = None,
    tie: Annotated[bool, typer.Option(help="tie input and output embeddings")] = False,
    rl_steps: Annotated[int, typer.Option(help="GRPO steps")] = 100,
    save_every: Annotated[int, typer.Option(help="checkpoint every k steps")] = 10,
    lr: Annotated[float, typer.Option(help="GRPO learning rate (constant)")] = 5e-5,
    hidden_size: int = 128,
    layers: int = 2,
    intermediate_size: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
) -> None:
    """Train a real tiny RLVR run (warm start + GRPO) and save HF checkpoints."""
    from pipeline.rl.tiny_model import ModelSize
    from pipeline.rl.tiny_run import TinyRunConfig, make_tiny_run

    if arch not in ("qwen2", "llama"):
        raise PipelineError(f"unknown --arch {arch!r} (expected qwen2 or llama)")
    if dtype not in ("float32", "bfloat16"):
        raise PipelineError(f"unknown --dtype {dtype!r} (expected float32 or bfloat16)")
    size = ModelSize(hidden_size, layers, intermediate_size, heads, kv_heads)
    cfg = TinyRunConfig(seed=seed, arch=arch, dtype=dtype, tie=tie,  # type: ignore[arg-type]
                        max_shard_size=max_shard_size, size=size, rl_steps=rl_steps,
                        save_every=save_every, lr=lr)
    make_tiny_run(out, cfg)
    typer.echo(f"run written to {out}")


@app.command("demo")
@user_errors
def demo_cmd(
    name: Annotated[
        str | None, typer.Argument(help="catalog entry (default: the catalog's default)")
    ] = None,
    catalog: CatalogOpt = None,
    scheduler: Scheduler = None,
) -> None:
    """Run the whole pipeline end to end on a catalog run (the README's main command)."""
    from pipeline.demo import run_demo

    run_demo(name, catalog, scheduler)


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="rlvr-lin")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
