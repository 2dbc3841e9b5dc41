"""Commands that write requests into the inbox: `submit` and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from daemon.cli.app import HomeOpt, app, console, fail, load_config
from pipeline import FORMATS, QUALITIES


@app.command()
def submit(
    ctx: typer.Context,
    images: Annotated[Path, typer.Argument(help="Folder of JPEG/PNG photos.")],
    home: HomeOpt = None,
    project: Annotated[
        str | None, typer.Option(help="Project name (default: the folder's name).")
    ] = None,
    quality: Annotated[str, typer.Option(help="low, medium or high.")] = "medium",
    fmt: Annotated[
        list[str] | None, typer.Option("--format", "-f", help="glb, ply or obj; repeatable.")
    ] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Run again even if the same request ran before.")
    ] = False,
) -> None:
    """Write a request file for IMAGES into the inbox.

    Example: dropmesh submit photos/fountain --quality high -f glb -f obj
    """
    from daemon.requests import (
        RequestError,
        count_images,
        render_toml,
        resolve_images,
        write_request,
    )

    cfg = load_config(ctx, home)
    try:
        folder = resolve_images(str(images), base=Path.cwd(), allowed_roots=cfg.allowed_roots)
        count_images(folder)
    except RequestError as exc:
        raise fail(str(exc).removeprefix("key 'images': ")) from exc
    if quality not in QUALITIES:
        raise fail(f"--quality must be one of {', '.join(QUALITIES)}", 2)
    formats = fmt or ["glb"]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise fail(f"--format must be one of {', '.join(FORMATS)} (got {', '.join(bad)})", 2)
    name = project or folder.name.lower()
    body: dict[str, Any] = {
        "project": name,
        "images": str(folder),
        "quality": quality,
        "formats": formats,
        "priority": priority,
    }
    if force:
        body["force"] = True
    path = write_request(cfg.inbox, name, render_toml(body))
    console.print(f"request written to {path}")


@app.command()
def demo(
    ctx: typer.Context,
    home: HomeOpt = None,
    images: Annotated[int, typer.Option("--images", "-n", help="Number of photos.")] = 24,
    quality: Annotated[str, typer.Option(help="low, medium or high.")] = "low",
    project: Annotated[str, typer.Option(help="Project name.")] = "demo",
    variant: Annotated[
        str, typer.Option(help="Scene variant: easy, ..., hard (python -m pipeline.demo -h).")
    ] = "easy",
) -> None:
    """Render a synthetic demo scene and drop a request for it into the inbox.

    Example: dropmesh demo --images 24 --quality low --variant hard
    """
    from daemon.requests import render_toml, write_request
    from pipeline.demo import VARIANTS, render_scene

    cfg = load_config(ctx, home)
    if quality not in QUALITIES:
        raise fail(f"--quality must be one of {', '.join(QUALITIES)}", 2)
    if variant not in VARIANTS:
        raise fail(f"--variant must be one of {', '.join(VARIANTS)}", 2)
    out = cfg.home / "demo" / project
    console.print(f"rendering {images} {variant} photos of the demo scene into {out} ...")
    render_scene(out, n_images=images, variant=variant)
    body = {
        "project": project,
        "images": str(out / "images"),
        "quality": quality,
        "formats": ["glb"],
        "force": True,
    }
    path = write_request(cfg.inbox, project, render_toml(body))
    console.print(f"request written to {path}; follow it with `dropmesh status --watch`")
