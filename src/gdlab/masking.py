"""Mask passwords in URLs before anything is logged, tagged or saved."""

import re

_PASSWORD_IN_URL = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:)(?P<password>[^@\s/]+)(?=@)")


def mask_passwords(text: str) -> str:
    """'postgresql://user:secret@host/db' -> 'postgresql://user:***@host/db', anywhere in `text`."""
    return _PASSWORD_IN_URL.sub(r"\g<prefix>***", text)
