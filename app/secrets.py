"""The secrets `rewards up` makes on first start: the API role's database
password and the notification signing key. Each is random, kept in the data
folder's `secrets/` (the folder 0700, each file 0600, owned by whoever runs
`rewards up`, root on a server), and read from there by every process of the
project through app.settings.load, unless its variable is set."""

from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import fields

from app.settings import Settings


def ensure(settings: Settings) -> Settings:
    """`settings` with every secret it lacks made and written; a secret already
    set (by its variable or its file) is kept as it is."""
    made = {}
    for spec in fields(settings):
        name = spec.metadata["secret"]
        if name and not getattr(settings, spec.name):
            made[spec.name] = _write(settings, name, secrets.token_urlsafe(32))
    return dataclasses.replace(settings, **made) if made else settings


def _write(settings: Settings, name: str, value: str) -> str:
    folder = settings.secrets_dir
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / name
    # Created 0600 before anything is in it, so no one can read it in between.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    return value
