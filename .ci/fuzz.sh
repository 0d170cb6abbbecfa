#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a short, fixed time each
# (FUZZTIME, default 10s), after its committed seed corpus. The targets that
# need Redis share one private redis-server on a Unix socket, which this
# script starts and stops. A failing input is written to the package's
# testdata/fuzz/FuzzName/ directory, where `go test` replays it from then on.
#
# Usage: .ci/fuzz.sh [FuzzName ...]   (default: every target)
set -euo pipefail

cd "$(dirname "$0")/.."

FUZZTIME=${FUZZTIME:-10s}
# New interesting inputs are minimized before fuzzing goes on; a short
# minimization keeps most of each target's time for fuzzing.
MINIMIZETIME=${MINIMIZETIME:-2s}

command -v redis-server >/dev/null || {
	echo "fuzz.sh: redis-server not found; install it (Debian: apt-get install redis-server)" >&2
	exit 1
}

workdir=$(mktemp -d)
redis_pid=""
cleanup() {
	if [ -n "$redis_pid" ]; then
		kill "$redis_pid" 2>/dev/null || true
		wait "$redis_pid" 2>/dev/null || true
	fi
	rm -rf "$workdir"
}
trap cleanup EXIT

socket="$workdir/redis.sock"
redis-server --port 0 --unixsocket "$socket" --unixsocketperm 700 \
	--save "" --appendonly no --dir "$workdir" --logfile "$workdir/redis.log" &
redis_pid=$!
for _ in $(seq 1 100); do
	[ -S "$socket" ] && break
	sleep 0.1
done
[ -S "$socket" ] || {
	echo "fuzz.sh: redis-server did not create $socket within 10 s" >&2
	exit 1
}
export REDIS_URL="unix://$socket"

# Each line is "package-directory FuzzName", for every fuzz target in the
# module outside node_modules.
targets=$(grep -rE --include='*_test.go' --exclude-dir=node_modules -o '^func Fuzz[A-Za-z0-9_]+' . |
	sed -E 's|^\./(.*)/[^/]+_test\.go:func (Fuzz[A-Za-z0-9_]+)$|\1 \2|' | sort -u)

failed=()
ran=0
while read -r dir name; do
	[ -n "$name" ] || continue
	if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then
		continue
	fi
	echo "== $name in ./$dir for $FUZZTIME"
	ran=$((ran + 1))
	log="$workdir/$name.log"
	# Go's fuzzing engine can end a run with "context deadline exceeded"
	# when fuzztime runs out while a worker is busy, such as minimizing a new
	# input, without any failing input. Such a run is repeated, up to three
	# runs in all; a real failure writes its input under testdata/fuzz and
	# fails every time.
	passed=false
	for attempt in 1 2 3; do
		if go test -run='^$' -fuzz="^${name}\$" -fuzztime="$FUZZTIME" -fuzzminimizetime="$MINIMIZETIME" "./$dir" 2>&1 | tee "$log"; then
			passed=true
			break
		fi
		if grep -q "Failing input written" "$log" || ! grep -q "context deadline exceeded" "$log"; then
			break
		fi
		echo "fuzz.sh: $name ended with \"context deadline exceeded\" and no failing input (run $attempt of 3)"
	done
	if [ "$passed" = false ]; then
		failed+=("$dir $name")
	fi
done <<<"$targets"

if [ "$ran" -eq 0 ]; then
	echo "fuzz.sh: no fuzz target matched: $*" >&2
	exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "fuzz.sh: ${#failed[@]} of $ran targets failed:" >&2
	printf '  %s\n' "${failed[@]}" >&2
	exit 1
fi
echo "fuzz.sh: $ran targets passed"
