#!/bin/sh
# Mirror $HOTSWAP_WEIGHTS_URL into /weights for the hotswap watcher, every $HOTSWAP_SYNC_INTERVAL_S
# seconds (once if $HOTSWAP_SYNC_ONCE is set). The bucket is synced into /staging first; each new or
# changed file is then copied to /weights/.sync-tmp/ and renamed into place, so the watcher only ever
# sees complete checkpoints (rename is atomic within one volume; .sync-tmp sits outside every
# stable/<model>/ and canary/<model>/ folder). Deleting from the bucket deletes nothing here: roll back
# by publishing the previous checkpoint again.
set -eu

: "${HOTSWAP_WEIGHTS_URL:?set HOTSWAP_WEIGHTS_URL to s3://bucket/prefix}"
STAGING="${HOTSWAP_SYNC_STAGING:-/staging}"
WEIGHTS="${HOTSWAP_SYNC_WEIGHTS:-/weights}"
TMP="$WEIGHTS/.sync-tmp"

publish_new_files() {
    mkdir -p "$TMP"
    (cd "$STAGING" && find . -type f) | while IFS= read -r rel; do
        rel="${rel#./}"
        src="$STAGING/$rel"
        dst="$WEIGHTS/$rel"
        if [ ! -e "$dst" ] || [ "$src" -nt "$dst" ]; then
            mkdir -p "$(dirname "$dst")"
            tmp="$TMP/$(echo "$rel" | tr '/' '_')"
            cp -p "$src" "$tmp"
            mv -f "$tmp" "$dst"
            echo "weights-sync: published $rel"
        fi
    done
}

while :; do
    if aws s3 sync "$HOTSWAP_WEIGHTS_URL" "$STAGING" --only-show-errors; then
        publish_new_files
    else
        echo "weights-sync: sync from $HOTSWAP_WEIGHTS_URL failed; retrying" >&2
        [ -n "${HOTSWAP_SYNC_ONCE:-}" ] && exit 1
    fi
    [ -n "${HOTSWAP_SYNC_ONCE:-}" ] && exit 0
    sleep "${HOTSWAP_SYNC_INTERVAL_S:-30}"
done
