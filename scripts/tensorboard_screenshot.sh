#!/usr/bin/env bash
# A PNG of TensorBoard's Time Series page (or PAGE=hparams: the HParams table) for the runs
# under LOGDIR, taken with headless Chromium (Debian: apt-get install -y chromium);
# docs/tensorboard.png and docs/tensorboard-hparams.png were made with it.
#
#   bash scripts/tensorboard_screenshot.sh LOGDIR OUT.png [TAG_REGEX]
#   PAGE=hparams SIZE=1800,520 bash scripts/tensorboard_screenshot.sh sweep-runs/ OUT.png
#
# TensorBoard listens on 127.0.0.1 on a free port, loads the event files once, and is
# stopped afterwards. Charts are drawn as SVG (`forceSVG`): without a GPU, Chromium's
# WebGL canvas stays blank. TAG_REGEX is TensorBoard's own tag filter.
set -euo pipefail
LOGDIR=$1
OUT=$2
TAGS=${3:-}
PAGE=${PAGE:-timeseries}
SIZE=${SIZE:-1400,900}
TENSORBOARD=${TENSORBOARD:-$(dirname "$0")/../.venv/bin/tensorboard}
LOG=$(mktemp)
PROFILE=$(mktemp -d)
"$TENSORBOARD" --logdir "$LOGDIR" --host 127.0.0.1 --port 0 --load_fast false \
    --reload_interval 0 >"$LOG" 2>&1 &
TB=$!
trap 'kill $TB 2>/dev/null; rm -rf "$PROFILE" "$LOG"' EXIT
URL=
for _ in $(seq 120); do
    URL=$(grep -o "http://127.0.0.1:[0-9]*" "$LOG" | head -1) && [ -n "$URL" ] && break
    sleep 1
done
[ -n "$URL" ] || { cat "$LOG"; exit 1; }
RUNS=$(find "$LOGDIR" -name 'events.out.tfevents.*' -printf '%h\n' | sort -u | wc -l)
for _ in $(seq 120); do  # until every run's scalars are loaded
    LOADED=$(curl -s "$URL/data/plugin/scalars/tags" |
        python3 -c 'import json, sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
    [ "$LOADED" -ge "$RUNS" ] && break
    sleep 1
done
QUERY="forceSVG=true&smoothing=0"
[ -n "$TAGS" ] && QUERY="$QUERY&tagFilter=$(python3 -c 'import sys, urllib.parse as u;
print(u.quote(sys.argv[1], safe=""))' "$TAGS")"
chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$PROFILE" \
    --hide-scrollbars --virtual-time-budget=60000 --window-size="$SIZE" \
    --screenshot="$OUT" "$URL/?$QUERY#$PAGE"
