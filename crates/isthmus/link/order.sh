#!/usr/bin/env bash
# Writes isthmus-proxy.ld: the functions the sidecar runs, hottest first, for the linker to lay
# out together (build.rs). Each sidecar then maps those pages of code instead of pieces of
# nearly every page: the kernel maps code in 64 KB blocks around each page first run.
#
# How: the proxy bench's open-loop load (plain and policy paths, HTTP/1.1 then HTTP/2 between
# the sidecars) with every sidecar run under callgrind, whose counts per function are summed.
# Names carry hashes of the build: run it again after a change of dependencies or compiler. A
# stale list only loses the layout of what it no longer names.
# Root (the bench); installs valgrind if missing.
set -euo pipefail
link=$(cd "$(dirname "$0")" && pwd)
cd "$link/../../.."
command -v valgrind >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
}
bench=$(cargo bench --profile production -p isthmus --bench proxy --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\))$/\1/p')
proxy=target/production/isthmus-proxy
[ -x "$bench" ] && [ -x "$proxy" ] || { echo "no bench or $proxy after the build" >&2; exit 1; }

work=$(mktemp -d)
chmod 1777 "$work" # the sidecars run as UID 1337
mv "$proxy" "$work/isthmus-proxy"
trap 'mv -f "$work/isthmus-proxy" "$proxy"; rm -rf "$work"' EXIT
printf '#!/bin/sh\nexec valgrind --tool=callgrind --demangle=no --callgrind-out-file=%s/cg.%%p %s "$@"\n' \
    "$work" "$work/isthmus-proxy" >"$proxy"
chmod +x "$proxy"
load=(env ISTHMUS_BENCH_ONLY=isthmus,isthmus-policy ISTHMUS_BENCH_OPEN_LOOP_ONLY=1)
"${load[@]}" "$bench" --bench >/dev/null
"${load[@]}" ISTHMUS_BENCH_H2UPGRADE=1 "$bench" --bench >/dev/null

# Self cost per function, summed over every sidecar; only the proxy's own symbols.
for f in "$work"/cg.*; do
    callgrind_annotate --inclusive=no --threshold=100 --auto=no "$f" 2>/dev/null
done | awk 'match($0, /%\)  /) {
        n = substr($0, RSTART + 4); sub(/ \[.*$/, "", n); sub(/^.*:/, "", n); sub(/'"'"'[0-9]+$/, "", n)
        c = $1; gsub(/,/, "", c); cost[n] += c
    } END { for (n in cost) print cost[n], n }' | sort -k1,1nr >"$work/costs"
nm --defined-only "$work/isthmus-proxy" | awk '$2 ~ /^[tTwW]$/ { print $3 }' | sort -u >"$work/symbols"
awk 'NR == FNR { known[$1] = 1; next } ($2 in known) { print $2 }' "$work/symbols" "$work/costs" >"$work/hot"
[ -s "$work/hot" ] || { echo "no function of the proxy in the profile" >&2; exit 1; }
# First each function by its exact name (this build's); then, by name without the hash, every
# instance of those functions, so that builds whose hashes differ still get most of the layout.
# `.text*.` also takes `.text.unlikely.`, where the compiler puts #[cold] functions.
{
    echo "/* Written by order.sh from a profile of the proxy bench: the functions a sidecar runs,"
    echo "   hottest first, laid out before the rest of the code. */"
    echo "SECTIONS {"
    echo "  .text.hot : {"
    awk '{ print "    *(.text*." $1 ")" }' "$work/hot"
    awk '{
        p = $1
        if (!sub(/17h[0-9a-f]+E(\.llvm\.[0-9]+)?$/, "17h", p)) sub(/\.[0-9]+$/, "", p)
        if (!seen[p]++) print "    *(.text*." p "*)"
    }' "$work/hot"
    echo "  }"
    echo "} INSERT BEFORE .text;"
} >"$link/isthmus-proxy.ld"
echo "$(wc -l <"$work/hot") functions in $link/isthmus-proxy.ld"
