#!/usr/bin/env bash
# Render a bench report in a real browser (Debian's chromium, headless) to a PNG, to look at it.
#
#   bash scripts/screenshot_report.sh results/bench/report.html /tmp/report.png [WIDTHxHEIGHT]
#
# Needs chromium (`apt-get install -y chromium`). The report is self-contained (plots embedded as base64),
# so nothing is fetched; the flags keep chromium off the network and its first-run machinery.
set -euo pipefail
html="${1:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]}"
png="${2:?usage: screenshot_report.sh REPORT.html OUT.png [WIDTHxHEIGHT]}"
size="${3:-1400x3200}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
    echo "chromium not found: apt-get install -y chromium" >&2
    exit 2
fi
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --disable-sync --no-first-run --hide-scrollbars --window-size="${size/x/,}" \
    --screenshot="$(realpath -m "$png")" "file://$(realpath "$html")" 2>/dev/null
echo "wrote $png"
