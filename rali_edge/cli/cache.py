"""`rali-edge cache list|clear`: the engines `--backend auto` built on first use (engines/cache.py)."""

from __future__ import annotations

import json

import click


@click.group("cache")
def cache_command():
    """The engine cache: engines `--backend auto` built on first use, one per model, machine,
    backend, precision and batch profile, in ~/.cache/rali-edge/engines (RALI_EDGE_CACHE moves it)."""


@cache_command.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry on stdout.")
def list_command(as_json):
    """Show every cached engine (model, backend, precision, size, fidelity), int8 refusals, and
    auto's verdicts (what it measured here, and what it runs)."""
    from rali_edge.engines import cache
    from rali_edge.engines.auto import Verdict

    found = cache.entries()
    for e in found:
        info = e.info or {}
        if e.kind == "verdict":
            try:
                verdict = Verdict.from_dict(info)
            except (KeyError, TypeError, ValueError):
                verdict, e.info = None, None
        fidelity = info.get("fidelity") or {}
        row = {"path": str(e.path), "kind": e.kind, "bytes": e.size, "model": info.get("model", {}).get("name"),
               "backend": info.get("target"), "precision": info.get("precision"),
               "max_abs_diff": fidelity.get("max_abs_diff"), "passed": fidelity.get("passed")}
        if e.kind == "verdict" and verdict is not None:
            row.update(backend=verdict.choice[0], precision=verdict.choice[1], candidates=info["candidates"])
        if as_json:
            click.echo(json.dumps(row))
        elif e.info is None:  # a sidecar, note or verdict that cannot be read: rebuilt or measured again
            click.echo(f"unreadable {e.kind} (used again only after it is rebuilt or measured again)  {e.path}")
        elif e.kind == "refused":
            click.echo(f"refused  {e.path.name}: {info.get('message', '?')[:200]}")
        elif e.kind == "verdict":  # the candidates' rows as `build --target auto` prints them: one measurement
            click.echo(f"verdict  {verdict.summary()}  {e.path}")
            for line in verdict.table():
                click.echo(f"  {line}")
        else:
            diff = "?" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.4f}"
            click.echo(f"{e.size / 2**20:7.1f} MiB  {row['backend'] or '?':<8} {row['precision'] or '?':<5} "
                       f"max |diff| {diff}  {e.path}")
    if not as_json:
        click.echo(f"{len(found)} entries in {cache.cache_dir()}", err=True)


@cache_command.command("clear")
def clear_command():
    """Delete every cached engine (they are built again on their next use)."""
    from rali_edge.engines import cache

    files, freed = cache.clear()
    click.echo(f"removed {files} files ({freed / 2**20:.1f} MiB) from {cache.cache_dir()}", err=True)


__all__ = ["cache_command"]
