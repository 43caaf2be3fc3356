"""The documents' commands run as written: every `python main.py ...` in README.md, RESULTS.md and
docs/*.md parses with main.py's own parser, every recipe, checkpoint, picture, benchmark and script
they cite exists, and every relative link points at an existing file and heading. No training."""
import re
import shlex
from pathlib import Path

import pytest

import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
# words about how the project was made, which no document should use
FORBIDDEN = [r"\bsessions?\b", r"\bbrief\b", r"other engineers", r"goal reached", r"\.\./shared",
             r"\bgoals?\b", r"\bissues?\b", r"\bsource [A-E]\b", r"seeds/\d{3}_", r"\b[Cc]onfigurations? [A-E]\b"]
# the reproduced READMEs are named by what they train, never by a letter; matched case-sensitively
# ("source a" or "configuration a" can be prose)
LETTERED = {r"\bsource [A-E]\b", r"\b[Cc]onfigurations? [A-E]\b"}


def read(path):
    return path.read_text(encoding="utf-8")


def split_code(text):
    """(fenced code blocks, the text outside them)."""
    return FENCE.findall(text), FENCE.sub("", text)


def fenced_commands(block):
    """Shell lines of a fenced block, continuations joined, comments dropped, loops unrolled to
    their body."""
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
        line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        for part in re.split(r";|\bdo\b|\bdone\b", line):
            if part.strip():
                yield part.strip()


def commands(path):
    """Every `python ...` command of a document: in fenced blocks and in inline code spans."""
    blocks, prose = split_code(read(path))
    found = [c for b in blocks for c in fenced_commands(b)]
    spans = [" ".join(span.split()) for span in INLINE.findall(prose)]
    # a table cell may cite a recipe and the flags that change: `binarized-vae.args --epochs 1200`
    found += ["python main.py @configs/" + s if re.fullmatch(r"[a-z][\w-]*\.args( --.*)?", s) else s
              for s in spans]
    return [c for c in found if c.startswith("python ")]


def fill_placeholders(command):
    """results/<run>/checkpoint.pt -> results/x/checkpoint.pt, --seed $s -> --seed 1, RUN -> 1,
    @configs/NAME.args -> a real recipe."""
    command = command.replace("@configs/NAME.args", "@configs/a-vae-cvae.args")
    command = re.sub(r"<[^>]*>", "x", command)
    command = re.sub(r"\$\{?\w+\}?", "1", command)
    return " ".join("1" if re.fullmatch(r"[A-Z]+(\.\.\.)?", tok) else tok for tok in command.split())


def main_commands():
    return sorted({(p.name, fill_placeholders(c)) for p in DOCS for c in commands(p)
                   if c.startswith("python main.py")})


def test_the_documents_hold_commands():
    assert len(main_commands()) >= 20


@pytest.mark.parametrize("doc, command", main_commands())
def test_each_main_command_parses(doc, command, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)                       # @configs/... is read from the working directory
    argv = shlex.split(command)[2:]
    for recipe in (a[1:] for a in argv if a.startswith("@")):
        assert (ROOT / recipe).is_file(), f"{doc}: {command}: no recipe {recipe}"
    try:
        main.make_parser().parse_args(argv)
    except SystemExit as stop:
        if stop.code in (0, None):                # --help prints and exits 0
            return
        pytest.fail(f"{doc}: `{command}` does not parse: {capsys.readouterr().err.strip()}")


def test_scripts_cited_exist():
    for path in DOCS:
        for command in commands(path):
            tokens = command.split()
            if tokens[1].endswith(".py"):
                assert (ROOT / tokens[1]).is_file(), f"{path.name}: `{command}`: no script {tokens[1]}"


def test_files_cited_exist():
    pattern = re.compile(r"\b((?:checkpoints|assets|benchmarks|configs)/[\w.-]+)")
    for path in DOCS:
        for cited in pattern.findall(read(path)):
            cited = cited.rstrip(".")
            if re.search(r"\b[A-Z]{2,}\b", cited):        # a placeholder such as configs/NAME.args
                continue
            assert (ROOT / cited).exists(), f"{path.name} cites {cited}, which does not exist"


def test_recipes_named_exist():
    for path in DOCS:
        for name in re.findall(r"(?<![\w/-])([a-z][\w-]*\.args)\b", read(path)):
            assert (ROOT / "configs" / name).is_file(), f"{path.name} names {name}, not in configs/"


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation other than - and _ dropped, spaces -> -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    _, prose = split_code(read(path))
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.*?)\s*$", prose, re.M)}


def test_relative_links_point_at_files_and_headings():
    for path in DOCS:
        _, prose = split_code(read(path))
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):                      # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            assert linked.exists(), f"{path.name} links {target}: no such file"
            if anchor:
                assert anchor in anchors(linked), f"{path.name} links {target}: no such heading"


def test_readme_is_short():
    assert len(read(ROOT / "README.md").splitlines()) <= 300


def test_readme_links_results():
    assert "(RESULTS.md" in read(ROOT / "README.md")


def test_no_document_speaks_of_how_the_project_was_made():
    for path in DOCS:
        text = read(path)
        for word in FORBIDDEN:
            hit = re.search(word, text, 0 if word in LETTERED else re.I)
            assert hit is None, f"{path.name}: {hit.group(0)!r} at {text[:hit.start()].count(chr(10)) + 1}"


def test_placeholders_are_filled():
    assert fill_placeholders("python main.py --eval results/<run>/best.pt --seed $s") == \
        "python main.py --eval results/x/best.pt --seed 1"
    assert fill_placeholders("python anomaly.py RUN...") == "python anomaly.py 1"
    assert slug("The CVAE's samples judged") == "the-cvaes-samples-judged"
    assert slug("Five published MNIST VAEs, reproduced") == "five-published-mnist-vaes-reproduced"
