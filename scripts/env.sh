#!/usr/bin/env bash
# Shared set-up: a virtualenv in the repo (.venv) with rcic installed, redone when pyproject.toml
# changes. Sourced by demo.sh and test.sh; `source scripts/env.sh` also puts `rcic` on your PATH.
RCIC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rcic_setup() {
  local py="${PYTHON:-}" candidate stamp
  if [ -z "$py" ]; then
    for candidate in python3.11 python3; do
      if command -v "$candidate" >/dev/null &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
        py="$candidate"; break
      fi
    done
  fi
  if [ -z "$py" ]; then echo "rcic needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2; return 1; fi
  if [ ! -x "$RCIC_ROOT/.venv/bin/python" ]; then
    "$py" -m venv "$RCIC_ROOT/.venv" || return 1
  fi
  stamp="$RCIC_ROOT/.venv/.rcic-installed-$(sha256sum "$RCIC_ROOT/pyproject.toml" | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "installing rcic and its pinned dependencies into .venv (first run only)" >&2
    "$RCIC_ROOT/.venv/bin/python" -m pip install -qq --upgrade pip &&
      "$RCIC_ROOT/.venv/bin/python" -m pip install -qq -e "$RCIC_ROOT[dev,panel]" || return 1
    # the gene relationships of `rcic benchmark rxrx3-core` / `rcic map --relationships corum`: data files
    # only, so without its declared dependencies (they would replace pinned ones)
    "$RCIC_ROOT/.venv/bin/python" -m pip install -qq --no-deps efaar-benchmarking==1.0 || return 1
    rm -f "$RCIC_ROOT"/.venv/.rcic-installed-* && touch "$stamp"
  fi
  export PATH="$RCIC_ROOT/.venv/bin:$PATH"
}
_rcic_setup
