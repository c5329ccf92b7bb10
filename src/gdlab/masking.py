"""Mask passwords in URLs before anything is logged, tagged or saved.

Light on purpose (the standard library; OmegaConf and yaml only inside `masked_config_yaml`): the metric
writer process imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    pass

# scheme://user:password@host, also as Hydra prints overrides (scheme\://user\:password@host). The password
# runs to the last "@" of its whitespace-free token: SQLAlchemy and urllib accept "/", ":" and "@" in it.
_USERINFO = re.compile(r"(?P<prefix>[A-Za-z][A-Za-z0-9+.\-]*\\?://[^/\s:@]*\\?:)(?P<rest>\S*)")
# One URL alone (a storage URL, a tracking.uri=... override): its password may hold spaces, as SQLAlchemy's
# make_url and urllib read it; it runs to the last "@" of the line.
_WHOLE_URL = re.compile(
    r"(?P<prefix>^[+~]*(?:[\w.\-/]+=)?[A-Za-z][A-Za-z0-9+.\-]*\\?://[^/\s:@]*\\?:)(?P<rest>[^\n]*)$"
)
# ?password=... (libpq, psycopg, MySQL drivers), also key=value connection strings and tokens; the key may
# have a prefix (sslpassword, client_secret, access_token) and percent-escapes (pass%77ord is password to
# make_url). The value runs to "&" or whitespace: SQLAlchemy keeps a "#" in it.
_KEY = re.compile(r"(?<![A-Za-z0-9_%])(?P<key>(?:[A-Za-z0-9_]|%[0-9A-Fa-f]{2})+)\\?=")
_VALUE = re.compile(r"[^&\s]+?(?=['\"]*(?:[&\s]|$))")
_SECRET_KEY = re.compile(r"(?i)[a-z0-9_]*(?:password|passwd|secret|token)|pwd|pass|api_?key")


def _mask_userinfo(match: re.Match) -> str:
    rest = match["rest"]
    at = rest.rfind("@")
    if at < 0:
        return match[0]
    return f"{match['prefix']}***{rest[at:]}"


def _mask_params(text: str) -> str:
    """Each value of a secret key (key=value, in a query string or a connection string), masked."""
    parts, done = [], 0
    for key in _KEY.finditer(text):
        if key.start() < done or not _SECRET_KEY.fullmatch(unquote(key["key"])):
            continue
        value = _VALUE.match(text, key.end())
        if value is not None:
            parts += [text[done : key.end()], "***"]
            done = value.end()
    return "".join(parts) + text[done:]


def mask_passwords(text: str) -> str:
    """Every password a URL can carry, masked anywhere in `text`, as the libraries that read URLs
    (SQLAlchemy's make_url, urllib.parse) would take it:
    'postgresql://user:secret@host/db' -> 'postgresql://user:***@host/db',
    'postgresql://host/db?password=secret' -> 'postgresql://host/db?password=***'."""
    if text.count("://") == 1 and "\n" not in text:  # one URL alone: its password may hold a space
        text = _WHOLE_URL.sub(_mask_userinfo, text)
    text = _USERINFO.sub(_mask_userinfo, text)
    return _mask_params(text)


def masked_config_yaml(cfg) -> str:
    """A config as gdlab saves it: OmegaConf.to_yaml's text with every password in every URL masked. A
    population member's plain sections (gdlab.population) are dumped as OmegaConf dumps a DictConfig, so
    the text is the same without building one."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf._utils import get_omega_conf_dumper

    if isinstance(cfg, dict):
        text = yaml.dump(dict(cfg), default_flow_style=False, allow_unicode=True, sort_keys=False,
                         Dumper=get_omega_conf_dumper())  # fmt: skip
    else:
        text = OmegaConf.to_yaml(cfg)
    return mask_passwords(text)


def mask_saved_hydra_configs(hydra_dir: Path) -> None:
    """Hydra saves the composed config before gdlab runs: mask the passwords it wrote there."""
    if not Path(hydra_dir).is_dir():
        return
    for path in Path(hydra_dir).glob("*.yaml"):
        text = path.read_text()
        masked = mask_passwords(text)
        if masked != text:
            path.write_text(masked)


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


def error_line(error: BaseException) -> str:
    """An exception as one masked line for the user: what a store's error says of its cause (SQLAlchemy's
    original DBAPI error, under Optuna's StorageInternalError and MLflow's notes), else its first line."""
    seen = error
    while type(seen).__name__ == "StorageInternalError" and isinstance(seen.__cause__, Exception):
        seen = seen.__cause__  # Optuna's "An exception is raised during the commit": the commit's error
    if isinstance(getattr(seen, "orig", None), BaseException):
        seen = seen.orig  # SQLAlchemy's wrapper: the database's own words
    lines = [line for line in str(seen).splitlines() if line.strip() and not line.startswith(_NOISE)]
    return mask_passwords(lines[0] if lines else repr(seen))


# Lines of MLflow's and SQLAlchemy's messages that come before the cause.
_NOISE = ("(raised as a result of Query-invoked autoflush", "SQLAlchemy database error")
