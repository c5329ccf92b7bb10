"""Mask passwords in URLs before anything is logged, tagged or saved."""

import re

# scheme://user:password@host, also as Hydra prints overrides (scheme\://user\:password@host).
_PASSWORD_IN_URL = re.compile(
    r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*\\?://[^/\s:@]*:)(?P<password>[^@\s/]+)(?=@)"
)


def mask_passwords(text: str) -> str:
    """'postgresql://user:secret@host/db' -> 'postgresql://user:***@host/db', anywhere in `text`."""
    return _PASSWORD_IN_URL.sub(r"\g<prefix>***", text)


def install_log_masking() -> None:
    """Mask passwords in every log record of this process (Hydra logs overrides, URLs included).

    A record factory rather than a handler filter: Hydra replaces the logging handlers for every job.
    """
    import logging

    previous = logging.getLogRecordFactory()
    if getattr(previous, "masks_passwords", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        message = record.getMessage()
        masked = mask_passwords(message)
        if masked != message:
            record.msg, record.args = masked, None
        return record

    factory.masks_passwords = True
    logging.setLogRecordFactory(factory)
