"""The sandboxed Jinja2 environment: one per Python process (Spark worker), built lazily.

Spark pickles the partition function, not this module's state: each Python worker imports the
module, and the first row it renders builds the environment from the packaged templates. Python
workers are reused between tasks (``spark.python.worker.reuse``), so the environment and the
compiled templates live as long as the worker. Nothing here is ever built per row or on the driver.
"""

from __future__ import annotations

import re
import threading

from babel import Locale
from jinja2 import PackageLoader, StrictUndefined, Template, TemplateNotFound, select_autoescape
from jinja2.sandbox import SandboxedEnvironment

FALLBACK_LOCALE = "en"
# Locale folders under templates/; a locale not here falls back to its language, then to en.
TEMPLATE_LOCALES = ("en", "zh-CN")
_TEMPLATE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Distinct subject lines are few (variants x locales x campaigns); the bound only guards a worker
# from a plan with a different subject per row.
_MAX_SUBJECTS = 2048

_lock = threading.Lock()
_environment: SandboxedEnvironment | None = None
_templates: dict[tuple[str, str, str], tuple[Template, str]] = {}
_subjects: dict[str, Template] = {}
_babel_locales: dict[str, Locale] = {}


def environment() -> SandboxedEnvironment:
    """This process's environment: sandboxed, HTML autoescaped, undefined variables are errors."""
    global _environment
    if _environment is None:
        with _lock:
            if _environment is None:
                _environment = SandboxedEnvironment(
                    loader=PackageLoader("inboxlift.render", "templates"),
                    # .html templates escape every value; .txt bodies and subject lines (from strings)
                    # are plain text, where HTML escaping would show "&amp;" to the reader.
                    autoescape=select_autoescape(enabled_extensions=("html",), disabled_extensions=("txt",),
                                                 default_for_string=False, default=True),
                    undefined=StrictUndefined,
                    trim_blocks=True,
                    lstrip_blocks=True,
                    keep_trailing_newline=True,
                    auto_reload=False,
                )
    return _environment


def template_locale(locale: str | None) -> str:
    """The template folder for a locale: exact (``zh_CN`` = ``zh-CN``), else its language, else en."""
    if not locale:
        return FALLBACK_LOCALE
    wanted = locale.strip().replace("_", "-").lower()
    for known in TEMPLATE_LOCALES:
        if known.lower() == wanted:
            return known
    language = wanted.split("-", 1)[0]
    for known in TEMPLATE_LOCALES:
        if known.lower() == language:
            return known
    return FALLBACK_LOCALE


def body_template(name: str, locale: str, kind: str) -> tuple[Template, str]:
    """The compiled ``<locale>/<name>.<kind>`` template and the locale it is written in (en when the
    locale has no such template).

    Raises:
        TemplateNotFound: no such template in the locale or in en, or a name that is no template name.
    """
    key = (name, locale, kind)
    found = _templates.get(key)
    if found is None:
        if not _TEMPLATE_NAME.fullmatch(name or ""):
            raise TemplateNotFound(f"{name!r} is not a template name (lower-case letters, digits, _)")
        env = environment()
        try:
            found = (env.get_template(f"{locale}/{name}.{kind}"), locale)
        except TemplateNotFound:
            if locale == FALLBACK_LOCALE:
                raise
            found = (env.get_template(f"{FALLBACK_LOCALE}/{name}.{kind}"), FALLBACK_LOCALE)
        _templates[key] = found
    return found


def subject_template(source: str) -> Template:
    """A compiled subject line (the plan's Jinja2 text), cached per worker."""
    compiled = _subjects.get(source)
    if compiled is None:
        if len(_subjects) >= _MAX_SUBJECTS:
            _subjects.clear()
        compiled = environment().from_string(source)
        _subjects[source] = compiled
    return compiled


def babel_locale(locale: str) -> Locale:
    found = _babel_locales.get(locale)
    if found is None:
        found = Locale.parse(locale, sep="-")
        _babel_locales[locale] = found
    return found
