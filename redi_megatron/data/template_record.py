"""Which chat template curated data was made with, and the check that training uses the same one.

``redi-curate`` writes ``"chat_template": "<name>"`` into ``curation_report.json`` beside ``positives/`` and
``pairs/``. The template decided which rows passed the token-length limits (``|x|``, ``|y|`` are counted in it),
so training the data under another template would train on rows filtered by the wrong lengths, and on a format
the data was not checked for: :func:`check_data_template` refuses that in one line.

Data without a record: a ``curation_report.json`` without ``chat_template`` comes from redi-curate before
templates were named, which always used the Qwen2.5-Math one, so that name is assumed (with a warning); data with
no curation report at all was not made by redi-curate and is accepted with a warning (nothing to check).
"""
from __future__ import annotations

import json
import os
from typing import Optional

from redi_megatron.console import say
from redi_megatron.errors import UserError

from .templates import DEFAULT_TEMPLATE

REPORT_NAME = "curation_report.json"
RECORD_KEY = "chat_template"


def find_report(train_path: str) -> Optional[str]:
    """``curation_report.json`` in ``train_path`` (a directory) or beside it (``out/pairs`` -> ``out/``)."""
    path = os.path.abspath(train_path.rstrip("/"))
    candidates = [os.path.join(path, REPORT_NAME)] if os.path.isdir(path) else []
    candidates.append(os.path.join(os.path.dirname(path), REPORT_NAME))
    return next((c for c in candidates if os.path.isfile(c)), None)


def data_template(train_path: str) -> tuple[Optional[str], Optional[str]]:
    """(template name the data records or assumes, report path); (None, None) without a curation report."""
    report = find_report(train_path)
    if report is None:
        return None, None
    try:
        with open(report, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{report}: unreadable curation report ({e})") from e
    name = record.get(RECORD_KEY) if isinstance(record, dict) else None
    if name is None:
        say(f"warning: {report} records no chat template (curated before templates were named); "
            f"assuming {DEFAULT_TEMPLATE!r}")
        return DEFAULT_TEMPLATE, report
    return str(name), report


def check_data_template(train_path: str, configured: str) -> None:
    """UserError (exit 2) naming both templates when the data was curated with another one."""
    name, report = data_template(train_path)
    if name is None:
        say(f"warning: no {REPORT_NAME} in or beside {train_path}; its chat template cannot be checked "
            f"(training renders it with {configured!r})")
        return
    if name != configured:
        raise UserError(f"{train_path}: data was curated with chat template {name!r} ({report}) but the run is "
                        f"configured with data.chat_template={configured!r}")
