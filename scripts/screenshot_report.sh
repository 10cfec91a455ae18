#!/usr/bin/env bash
# Screenshot an edgeq report (report.html / compare.html) with headless Chromium, to check it renders.
#
#   scripts/screenshot_report.sh BUNDLE/report.html shot.png [WIDTH,HEIGHT]
#
# Needs chromium (Debian: apt-get install -y chromium). The report is self-contained, so no network
# is used; a throwaway profile directory keeps parallel runs apart.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0"
  exit 2
fi
html=$(realpath "$1")
out=$(realpath -m "$2")
size=${3:-1200,3000}
[ -f "$html" ] || { echo "error: $1 does not exist" >&2; exit 2; }
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$browser" ] || { echo "error: chromium not found (apt-get install -y chromium)" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
  --disable-sync --no-first-run --hide-scrollbars --user-data-dir="$profile" \
  --screenshot="$out" --window-size="$size" "file://$html" >/dev/null 2>&1
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
