"""Path confinement: the workbench reads user-given folders only inside roots the user allowed.

The web UI and the CLI both take paths from users; resolving symlinks first and then checking the
real path against `settings.data_dir` + `settings.allowed_roots` means a link cannot smuggle a
path out of the allowed folders.
"""

from __future__ import annotations

from pathlib import Path

from workbench.settings import Settings

__all__ = ["PathNotAllowed", "allowed_roots", "resolve_user_path"]


class PathNotAllowed(ValueError):
    """A user path that is missing, of the wrong kind, or outside the allowed roots."""


def allowed_roots(settings: Settings) -> list[Path]:
    """The data dir plus every extra allowed root, each fully resolved."""
    roots = [settings.data_dir, *settings.allowed_roots]
    return [Path(r).expanduser().resolve() for r in roots]


def resolve_user_path(
    path: str | Path, *, settings: Settings, must_exist: bool = True, kind: str = "folder"
) -> Path:
    """Resolve `path` (symlinks included) and return it if it lies inside an allowed root.

    `kind` is "folder", "file" or "any"; it is checked only when the path exists. Raises
    `PathNotAllowed` saying which roots are allowed and how to add one.
    """
    if kind not in ("folder", "file", "any"):
        raise ValueError(f"kind must be 'folder', 'file' or 'any', not {kind!r}")
    if str(path).strip() == "":
        raise PathNotAllowed("no path given; enter the path of a folder or file")
    real = Path(path).expanduser().resolve()
    roots = allowed_roots(settings)
    if not any(real == root or real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise PathNotAllowed(
            f"{path} (resolves to {real}) is outside the folders the workbench may read: {shown}. "
            "To allow another folder, set FLEXQUANT_ALLOWED_ROOTS='[\"/path/to/folder\"]' in the "
            "environment or pass --allow-root /path/to/folder to flexquant."
        )
    if must_exist and not real.exists():
        raise PathNotAllowed(f"{path} does not exist")
    if real.exists():
        if kind == "folder" and not real.is_dir():
            raise PathNotAllowed(f"{path} is a file, expected a folder")
        if kind == "file" and not real.is_file():
            raise PathNotAllowed(f"{path} is not a regular file")
    return real
