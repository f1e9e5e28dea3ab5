"""The documentation cannot fall behind the command line: every command and every long option of
``medclipsam`` is named on its command group's page under docs/, every page is in mkdocs.yml's nav,
and README.md stays a two-minute read.

Only the click command tree is imported (``medclipsam.cli`` loads neither torch nor Ray).
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import yaml

from medclipsam.cli import main

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README_MAX_LINES = 300

# The page that documents each top-level command (and every subcommand of a group).
PAGES = {
    "segment": "commands/segment.md",
    "pseudolabel": "commands/pseudolabel.md",
    "report": "commands/pseudolabel.md",
    "tune": "commands/tune.md",
    "evaluate": "commands/evaluate.md",
    "finetune": "commands/finetune.md",
    "weak": "commands/weak.md",
    "models": "commands/models.md",
    "data": "commands/data.md",
    "demo": "commands/demo.md",
}
ROOT_PAGE = "commands/index.md"  # the options of `medclipsam` itself (-v/--verbose)


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``group`` (groups included), with its full name as a tuple of words."""
    context = click.Context(group, info_name=" ".join(("medclipsam", *path)))
    found = []
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        if command is None or command.hidden:
            continue
        found.append(((*path, name), command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, (*path, name)))
    return found


def _long_options(command: click.Command) -> list[str]:
    """The long option names of a command (``--foo``, including the ``--no-foo`` of a flag pair), not --help."""
    names = []
    for param in command.params:
        if not isinstance(param, click.Option) or param.hidden:
            continue
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("--") and name != "--help":
                names.append(name)
    return names


def _mentions(text: str, word: str) -> bool:
    """``word`` occurs in ``text`` as a whole word: ``--gt`` is not found inside ``--gt-uri``."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


def _page_text(page: str) -> str:
    path = DOCS / page
    assert path.is_file(), f"docs page {page} is missing"
    return path.read_text(encoding="utf-8")


ALL_COMMANDS = _commands(main)


def test_every_top_level_command_has_a_page():
    context = click.Context(main, info_name="medclipsam")
    missing = [name for name in main.list_commands(context) if name not in PAGES]
    assert not missing, f"no docs page is mapped for the command(s) {missing}: add a page under docs/commands/ " \
                        "and an entry in PAGES"
    for page in set(PAGES.values()):
        _page_text(page)


@pytest.mark.parametrize("path,command", ALL_COMMANDS, ids=[" ".join(path) for path, _ in ALL_COMMANDS])
def test_each_command_and_its_options_are_on_its_page(path, command):
    page = PAGES[path[0]]
    text = _page_text(page)
    full_name = " ".join(path)
    assert _mentions(text, full_name), f"command `medclipsam {full_name}` is not named on docs/{page}"
    missing = [option for option in _long_options(command) if not _mentions(text, option)]
    assert not missing, f"command `medclipsam {full_name}`: option(s) {', '.join(missing)} not documented " \
                        f"on docs/{page}"


def test_the_global_options_are_on_the_command_line_page():
    text = _page_text(ROOT_PAGE)
    missing = [option for option in _long_options(main) if not _mentions(text, option)]
    assert not missing, f"`medclipsam` option(s) {', '.join(missing)} not documented on docs/{ROOT_PAGE}"


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        if isinstance(entry, str):
            pages.append(entry)
        elif isinstance(entry, dict):
            for value in entry.values():
                pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
        elif isinstance(entry, list):
            pages.extend(_nav_pages(entry))
    return pages


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config.get("docs_dir", "docs") == "docs"
    nav = [page for page in _nav_pages(config["nav"]) if not re.match(r"^[a-z]+://", page)]
    pages = sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert pages, "no pages under docs/"
    not_in_nav = [page for page in pages if page not in nav]
    assert not not_in_nav, f"docs page(s) {not_in_nav} are not listed in mkdocs.yml's nav"
    missing = [page for page in nav if page not in pages]
    assert not missing, f"mkdocs.yml's nav lists page(s) {missing} that do not exist under docs/"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): " \
                                           "move reference material to docs/"


def test_the_readme_links_into_existing_docs_pages():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)\s]*)?\)", text)
    assert targets, "README.md links to no docs page"
    broken = sorted({target for target in targets if not (REPO / target).is_file()})
    assert not broken, f"README.md links to missing docs page(s) {broken}"
