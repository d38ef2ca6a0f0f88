"""Test helpers that read back what the viz page and the replication report wrote (stdlib only)."""

from __future__ import annotations

from html.parser import HTMLParser


class TokenSpans(HTMLParser):
    """Every token span of a megacredit viz page with where it sits: run column, step, sample,
    series, the exact value (``data-v``), the token id, the style, the hover title and the text."""

    def __init__(self):
        super().__init__()
        self.spans: list[dict] = []
        self.where: dict = {}
        self.current: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-step" in attrs:
            self.where.update(step=int(attrs["data-step"]), sample=int(attrs["data-sample"]))
        elif tag == "td" and "data-run" in attrs:
            self.where["run"] = int(attrs["data-run"])
        elif tag == "div" and "data-series" in attrs:
            self.where["series"] = attrs["data-series"]
        elif tag == "span" and attrs.get("class") == "tok":
            self.current = dict(self.where, value=float(attrs["data-v"]), token_id=attrs["data-id"],
                                style=attrs["style"], title=attrs["title"], text="")

    def handle_data(self, data):
        if self.current is not None:
            self.current["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self.current is not None:
            self.spans.append(self.current)
            self.current = None


def token_spans(page: str) -> list[dict]:
    """The token spans of ``page`` in document order."""
    parser = TokenSpans()
    parser.feed(page)
    return parser.spans


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first Markdown table after ``heading``."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows
