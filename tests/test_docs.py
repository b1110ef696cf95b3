"""The documentation: the site (mkdocs.yml, docs/) builds in strict mode, the code on its
tutorial, how-to and Python-guide pages runs as written, and the README stays a front door.

How a page's code is run (docs/tutorial.md, docs/how-to/*.md, docs/guide/python.md), block by
block in the page's order, in a fresh folder per page, by one Python process per page:

- ```python blocks run in one namespace (one per page), as in a notebook;
- ```sh, ```bash and ```console blocks hold `mogvae ...` commands, one per line (a `$ ` prompt,
  `#` comments and `\\` continuations allowed; $VARIABLES come from the page's environment), each
  run through mogvae.cli:main (which the `mogvae` script calls, through cli.command), each in a process of its own
  forked from one that imported mogvae once per page, before any of the page's Python ran (so a
  command sees none of the page's Python state, as in a shell), and required to exit 0; any other
  command in such a block is an error, so nothing shown as runnable goes unrun. (A fresh interpreter
  per command spent 2-6 s importing, most of a page's time; the script itself is run by
  test_the_mogvae_script_runs);
- a block with a title (```toml title="spec.toml") is a file the page goes on to use: it is
  written into the folder under that name;
- a line `--8<-- "path"` in a block is the file at that path (pymdownx.snippets), as on the site;
- a block directly after a line `<!-- not run: REASON -->` is skipped: full-size runs, cluster
  commands, installs. Only those are skipped, and every page runs at least one block.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent            # the environment the tests run in: its mogvae and mkdocs
EXECUTED_PAGES = sorted([DOCS / "tutorial.md", DOCS / "guide" / "python.md", *(DOCS / "how-to").glob("*.md")])
README_MAX_LINES = 200

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*\S.*-->\s*$")
TITLE = re.compile(r"""title=["']([^"']+)["']""")
SHELLS = {"sh", "bash", "console", "shell"}


SNIPPET = re.compile(r"""^--8<--\s+["']([^"']+)["']\s*$""")


def _expand_snippet(line: str) -> list[str]:
    """A line `--8<-- "path"` (pymdownx.snippets, relative to the repository) is that file's lines,
    as the site shows them: a page can show a file the tests also import."""
    m = SNIPPET.match(line)
    return (ROOT / m[1]).read_text().splitlines() if m else [line]


def fenced_blocks(path: Path) -> list[dict]:
    """Every fenced block of a Markdown page: language, title, code (dedented), first line, and
    whether the line before it marks it `not run`."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{i + 1}: a fenced block is never closed")
        body = [line for text in body for line in _expand_snippet(text)]
        title = TITLE.search(info)
        blocks.append({"lang": (info.split() or [""])[0].lower(), "title": title[1] if title else None,
                       "code": "\n".join(body) + "\n", "line": i + 1,
                       "skipped": i > 0 and bool(NOT_RUN.match(lines[i - 1]))})
        i = j + 1
    return blocks


def shell_commands(code: str) -> list[str]:
    """The commands of a shell block: continuations joined, prompts and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:].strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def executable_steps(page: Path) -> list[dict]:
    """What the runner does for a page, in order: write a file, run Python, run mogvae."""
    steps = []
    for b in fenced_blocks(page):
        where = f"{page.relative_to(ROOT)}:{b['line']}"
        if b["skipped"]:
            continue
        if b["title"]:
            steps.append({"kind": "file", "name": b["title"], "code": b["code"], "where": where})
            if b["lang"] != "python":
                continue
        if b["lang"] == "python":
            steps.append({"kind": "python", "code": b["code"], "where": where})
        elif b["lang"] in SHELLS:
            for command in shell_commands(b["code"]):
                assert command.split()[0] == "mogvae", (
                    f"{where}: {command!r} is not a mogvae command; run it from a python block, or mark "
                    "the block <!-- not run: REASON -->")
                steps.append({"kind": "mogvae", "command": command, "where": where})
    return steps


RUNNER = r'''
import atexit, json, os, shlex, sys, traceback
from pathlib import Path

# What a command imports, once per page, in the process its commands fork from (they spent 2-6 s each on it).
PRELOAD = ("mogvae.cli", "mogvae.runs.run", "mogvae.estimators.evaluate", "mogvae.report.figures")


def command_server(requests: int, replies: int) -> None:
    """Forked before any of the page's Python runs: each command runs in a process of its own forked from
    here, so it sees none of the page's Python state (a family registered in a python block is unknown to
    it, as to a user's shell), and replies with its exit status."""
    import mogvae.cli
    with os.fdopen(requests) as inbox, os.fdopen(replies, "w") as outbox:
        for line in inbox:
            argv, environment, cwd = json.loads(line)
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.environ.clear()
                    os.environ.update(environment)
                    os.chdir(cwd)
                    code = mogvae.cli.main(argv)
                    atexit._run_exitfuncs()           # multiprocessing's clean-up, as at a normal exit
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            outbox.write(f"{os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}\n")
            outbox.flush()
    os._exit(0)


def start_command_server():
    for name in PRELOAD:
        __import__(name)
    requests, to_server = os.pipe()
    from_server, replies = os.pipe()
    if os.fork() == 0:
        os.close(to_server)
        os.close(from_server)
        command_server(requests, replies)
    os.close(requests)
    os.close(replies)
    return os.fdopen(to_server, "w"), os.fdopen(from_server)


def main(steps_file):
    steps = json.loads(Path(steps_file).read_text())
    if any(step["kind"] == "mogvae" for step in steps):
        send, receive = start_command_server()
    namespace = {"__name__": "__main__"}
    for step in steps:
        where = step["where"]
        print(f"--- {where} ({step['kind']})", flush=True)
        if step["kind"] == "file":
            Path(step["name"]).parent.mkdir(parents=True, exist_ok=True)
            Path(step["name"]).write_text(step["code"])
        elif step["kind"] == "python":
            try:
                exec(compile(step["code"], where, "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: the python block at {where}", file=sys.stderr)
                return 1
        else:
            argv = shlex.split(os.path.expandvars(step["command"]), comments=True)
            sys.stdout.flush()
            send.write(json.dumps([argv[1:], dict(os.environ), os.getcwd()]) + "\n")
            send.flush()
            code = int(receive.readline())
            if code != 0:
                print(f"FAILED: `{step['command']}` at {where} exited {code}", file=sys.stderr)
                return 1
    sys.stdout.flush()
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
'''


# A page's command that the session's quick_run fixture already ran, word for word but for the folder: that
# folder is copied in first, so the command finds its runs finished and only writes the report (the fresh
# run is quick_run itself, which tests/test_faults.py and others read: the same 13 s once, not twice).
SHARED = {"mogvae reproduce --quick --out paper-quick": "paper-quick"}


@pytest.mark.parametrize("page", EXECUTED_PAGES, ids=[str(p.relative_to(DOCS)) for p in EXECUTED_PAGES])
def test_the_code_on_the_page_runs_as_written(page, tmp_path, request):
    steps = executable_steps(page)
    assert any(s["kind"] in ("python", "mogvae") for s in steps), (
        f"{page.relative_to(ROOT)}: no block is run; every executed page needs at least one")
    work = tmp_path / "work"
    work.mkdir()
    for folder in (SHARED[s["command"]] for s in steps if s.get("command") in SHARED):
        shutil.copytree(request.getfixturevalue("quick_run")[0], work / folder)
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "steps.json")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_the_mogvae_script_runs(tmp_path):
    """The installed `mogvae` script (the pages' commands run through the function it calls)."""
    proc = subprocess.run([str(BIN / "mogvae"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: mogvae") and "reproduce" in proc.stdout


def test_the_site_builds_in_strict_mode(tmp_path):
    """Every page, link and anchor resolves, the generated references render, and the API
    reference finds every object it names (mkdocs --strict turns each warning into a failure)."""
    mkdocs = BIN / "mkdocs"
    assert mkdocs.exists(), f"{mkdocs}: missing; install the docs extra (pip install -e '.[docs]')"
    proc = subprocess.run([str(mkdocs), "build", "--strict", "-d", str(tmp_path / "site")], cwd=ROOT,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for page in ("reference/cli/index.html", "reference/config/index.html", "reference/api/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "usage: mogvae sweep" in cli and "--scheduler ADDRESS" in cli          # generated from the parser
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "train.on_divergence" in config and "data.path" in config              # generated from the schema


def test_blocks_are_skipped_only_where_marked():
    """A marker must sit directly on a fence, so that it can never silently skip something else."""
    for page in EXECUTED_PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if NOT_RUN.match(line):
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                    f"{page.relative_to(ROOT)}:{i + 1}: a `not run` marker not directly before a fence")


def test_the_readme_is_at_most_200_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the docs site holds the rest"


def test_the_readme_states_the_test_command_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "python -m pytest -q" in readme


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(text: str) -> list[str]:
    text = re.sub(r"^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1[ \t]*$", "", text, flags=re.S | re.M)   # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)                                                     # inline code
    return LINK.findall(text)


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file(page):
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                      # a web address, or an anchor on the same page (mkdocs checks those)
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.is_file():
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files: {broken}"
