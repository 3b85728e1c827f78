"""Analyses of what a backbone's layers do to its inductive bias (above backbones, beside the engine)."""

from pathlib import Path

from fewshot_nsl.errors import UserError


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` that cannot be a folder before the analysis spends its minutes."""
    blocking = next((path for path in (out, *out.parents) if path.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"--out {out}: {blocking} is a file; give a folder path")
