#!/usr/bin/env bash
# The main job: set up (first time only) and run the end-to-end demo on synthetic data.
# Extra arguments go to `rcic demo` (e.g. --out DIR, --preset tiny, --epochs 4).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
rcic demo "$@"
