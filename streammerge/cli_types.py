"""click parameter types shared by the commands (``streammerge.cli`` and ``streammerge.analysis.command``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from .hub import written_as_path


class ModelReference(click.Path):
    """A model folder or a Hub ID (``org/name[@revision]``), as a :class:`~pathlib.Path`. A reference written as a
    path (``./x``, ``../x``, ``~/x``) that does not exist becomes its absolute path, so that it is never looked up
    on the Hub (``./demo/nope`` would otherwise read as the Hub ID ``demo/nope`` once made a Path): the checks of
    the inputs then name it as a missing folder, with the other problems they find."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        text = str(value)
        if "+" not in text and written_as_path(text) and not Path(text).expanduser().exists():
            return Path(os.path.abspath(os.path.expanduser(text)))  # normalised: /a/b/../c is /a/c
        return super().convert(value, param, ctx)
