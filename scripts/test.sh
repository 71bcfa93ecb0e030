#!/usr/bin/env bash
# The test suite: set up (first time only), install Debian's chromium for the browser tests where
# we may (root + apt), then ruff and pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$RCIC_ROOT"
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: browser tests will be skipped" >&2
fi
ruff check src tests bench
python -m pytest -q -p no:cacheprovider "$@" tests
