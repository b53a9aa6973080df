"""The argument types and checks every `ganforge` verb shares: the parser class whose usage
errors are one `Error: …` line (exit 2), bounded integers, folders that must be writable, and
KEY=VALUE headers."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ganforge.errors import UsageError


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage errors, in our one-line form
        print(f"Error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _writable_dir(path: str, flag: str = "--out") -> Path:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag}: cannot create {p} ({exc.strerror})") from exc
    if not os.access(p, os.W_OK):
        raise UsageError(f"{flag}: {p} is not writable")
    return p


def _int_arg(lo: int | None = None):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"{v} is below the minimum {lo}")
        return v
    return parse


def _key_value(text: str | None, flag: str) -> tuple[str, str] | None:
    if text is None:
        return None
    key, sep, value = (part.strip() for part in text.partition("="))
    if not sep or not key or not value:
        raise UsageError(f"{flag}: {text!r} is not allowed; expected KEY=VALUE, e.g. x-ganforge-key=s3cret")
    return key.lower(), value
