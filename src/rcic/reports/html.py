"""A few helpers to write static HTML reports (no JavaScript, images as files beside the page)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from rcic.atomic import atomic_path, atomic_write_text

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1150px;
color:#1d2330;line-height:1.45;padding:0 1rem}
h1{margin-bottom:.2rem} h2{border-bottom:2px solid #e3e7ef;padding-bottom:.25rem;margin-top:2.2rem}
.sub{color:#5b6478;margin-top:0} table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
th,td{border:1px solid #d9dee8;padding:.25rem .6rem;text-align:right} th{background:#f3f5f9}
td:first-child,th:first-child{text-align:left} figure{margin:1rem 0} figure img{max-width:100%;
border:1px solid #e3e7ef} figcaption{color:#5b6478;font-size:.9rem} .note{background:#fff7e0;
border-left:4px solid #f0b400;padding:.5rem .8rem} code,pre{background:#f3f5f9;border-radius:4px}
pre{padding:.7rem;overflow-x:auto} nav a{margin-right:1rem}
"""


def table(frame: pd.DataFrame, floats: str = "{:.3f}") -> str:
    return frame.to_html(index=False, border=0, float_format=lambda v: floats.format(v), na_rep="",
                         escape=True)


def figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{html.escape(src)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def section(title: str, *parts: str, anchor: str | None = None) -> str:
    anchor = anchor or title.lower().replace(" ", "-")
    return f'<section id="{html.escape(anchor)}"><h2>{html.escape(title)}</h2>{"".join(parts)}</section>'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)}</p>'
            f'{"".join(sections)}</body></html>')


def write_page(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight")
    plt.close(fig)
