#!/usr/bin/env bash
# Installs what tests/browser needs on a fresh Debian (bookworm) machine; run as root.
#   - Debian's Chromium and its chromedriver (apt: chromium, chromium-driver); no browser download
#   - CJK fonts (apt: fonts-noto-cjk), so screenshots of the Chinese interface are legible
#   - the Python package selenium, into the project's Python
# Usage: bash tests/browser/install.sh [PYTHON]
#   PYTHON defaults to $PYTHON, else <repo>/.venv/bin/python if it exists, else python3.
# Idempotent: skips what is already installed.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
py="${1:-${PYTHON:-}}"
if [ -z "$py" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"; else py=python3; fi
fi

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
   || ! fc-list 2>/dev/null | grep -qi "Noto Sans CJK"; then
  if [ "$(id -u)" != 0 ]; then
    echo "install.sh: chromium/chromedriver missing and not root: run as root (apt-get)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium chromium-driver fonts-noto-cjk >/dev/null
fi

if ! "$py" -c "import selenium" >/dev/null 2>&1; then
  "$py" -m pip install -q "selenium>=4.20,<5"
fi

echo "browser test deps: $(chromium --version 2>/dev/null | head -1);" \
  "$(chromedriver --version | head -1);" \
  "selenium $("$py" -c 'import selenium; print(selenium.__version__)')"
