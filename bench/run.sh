#!/usr/bin/env bash
# Side-by-side benchmarks of byokproxy against a direct connection and a
# bare reverse proxy (the floor), on loopback, with a private redis-server.
#
#   bench/run.sh                 # or: make bench
#
# Settings (environment):
#   ROUNDS=5        rounds, each running every target once per phase, starting
#                   one target later each round (A B C D, B C D A, ...)
#   WINDOW=5s       measured window of each run, after a 1 s warm-up
#   RATE=1000       open-loop rate of non-streaming requests, req/s
#   SAT_CONNS=64    connections of the saturation runs
#   STREAM_RATE=100 open-loop rate of streams, streams/s
#   CUT_RATE=200    streams/s of the streams-cut runs
#   IDLE=1000,10000 idle stream counts of the memory runs
#   PHASES="open sat stream cut idle"  the phases to run
#   CANDIDATE=DIR   also build byokproxy from the source tree DIR and measure
#                   it as shared-candidate and byok-candidate in the same
#                   rounds, to weigh a change against the current tree
#   CANDIDATE_ENV="NAME=VALUE ..."  environment of the candidate processes
#                   only; without CANDIDATE the candidate is this tree, so a
#                   runtime setting can be weighed on the same code
#   OUT=DIR         where results.jsonl, report.md and latency.svg go
#                   (default: a new directory under /tmp)
#
# Everything binds to 127.0.0.1. Every process started here is stopped by
# its PID when the script ends, and the script ends after MAX_SECONDS
# (default 900) whatever happens.
set -euo pipefail

# Run under timeout(1), which ends the script and every process it started
# (they share its process group) after MAX_SECONDS.
if [ -z "${BENCH_UNDER_TIMEOUT:-}" ]; then
	export BENCH_UNDER_TIMEOUT=1
	exec timeout -s TERM "${MAX_SECONDS:-900}" "$0" "$@"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${ROUNDS:-5}
WINDOW=${WINDOW:-5s}
RATE=${RATE:-1000}
SAT_CONNS=${SAT_CONNS:-64}
STREAM_RATE=${STREAM_RATE:-100}
STREAM_BODY=${STREAM_BODY:-6000}
CUT_RATE=${CUT_RATE:-200}
CUT_BODY=${CUT_BODY:-16000}
IDLE=${IDLE:-1000,10000}
PHASES=" ${PHASES:-open sat stream cut idle} "
if [ -n "${CANDIDATE_ENV:-}" ] && [ -z "${CANDIDATE:-}" ]; then
	CANDIDATE=$ROOT
fi
MAX_SECONDS=${MAX_SECONDS:-900}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/byokbench.XXXXXX")
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
BIN=$WORK/bin
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

PIDS=()
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	# The logs stay for inspection; the binaries and the identity go.
	rm -rf "$BIN" "$WORK/identity.txt"
}
trap cleanup EXIT
trap 'echo "bench: interrupted" >&2; exit 130' INT TERM

# start NAME CMD... runs CMD in the background with its output in
# $WORK/NAME.log, and sets STARTED to its PID.
start() {
	local name=$1
	shift
	"$@" >"$WORK/$name.log" 2>&1 &
	STARTED=$!
	PIDS+=("$STARTED")
}

# stop PID ends one process started here and waits for it.
stop() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
}

# wait_http URL waits up to 10 s for URL to respond with any status.
wait_http() {
	local i
	for i in $(seq 100); do
		if curl -s -o /dev/null "$1"; then
			return 0
		fi
		sleep 0.1
	done
	echo "bench: $1 did not respond within 10s; see the logs in $WORK" >&2
	return 1
}

log() { printf '%s bench: %s\n' "$(date +%T)" "$*" >&2; }

log "building into $BIN"
mkdir -p "$BIN"
(cd "$ROOT" && go build -o "$BIN/" ./cmd/byokproxy ./bench/upstream ./bench/floor ./bench/loadgen ./bench/report ./bench/scalarmult)
if [ -n "${CANDIDATE:-}" ]; then
	(cd "$CANDIDATE" && go build -o "$BIN/byokproxy-candidate" ./cmd/byokproxy)
fi
LOADGEN=$BIN/loadgen
CLK_TCK=$(getconf CLK_TCK)

mapfile -t PORTS < <("$LOADGEN" -mode ports -n 19)
P_REDIS=${PORTS[0]} P_UP=${PORTS[1]} P_UPTLS=${PORTS[2]} P_FLOOR=${PORTS[3]} P_FLOOR_ND=${PORTS[4]}
P_ADMIN=${PORTS[5]} P_METRICS=${PORTS[6]}
P_MEM_FLOOR=${PORTS[7]} P_MEM_PROXY=${PORTS[8]}
# The listen port of each byokproxy target's process.
declare -A P_TARGET=([shared]=${PORTS[9]} [byok]=${PORTS[10]} [shared-candidate]=${PORTS[11]}
	[byok-candidate]=${PORTS[12]})
# Every process but the first gets ports of its own for its admin API and
# metrics, which the benchmark does not call.
SPARE_PORTS=("${PORTS[@]:13}")

log "starting redis-server on $P_REDIS"
start redis redis-server --bind 127.0.0.1 --port "$P_REDIS" --save "" --appendonly no \
	--dir "$WORK" --protected-mode yes
REDIS_PID=$STARTED
for i in $(seq 100); do
	redis-cli -p "$P_REDIS" ping >/dev/null 2>&1 && break
	sleep 0.1
done

SHARED_KEY=sk-bench-shared-4d1f0c8e2b7a9f3e6c5d1a0b
BYOK_KEY=sk-bench-byok-9e2c7b1d4f6a8c0e3b5d7f9a
FLOOR_KEY=sk-bench-floor-1a2b3c4d5e6f7a8b9c0d1e2f
DIRECT_KEY=sk-bench-direct-0f1e2d3c4b5a69788796a5b4
GOOGLE_KEY=AIzaBenchSharedKey0123456789abcdefghijk
BYOK_GOOGLE_KEY=AIzaBenchByokKey0123456789abcdefghijklm
start upstream "$BIN/upstream" -listen "127.0.0.1:$P_UP" -tls-listen "127.0.0.1:$P_UPTLS" \
	-cert-out "$WORK/upstream.pem" -gap 1ms \
	-keys "$SHARED_KEY,$BYOK_KEY,$FLOOR_KEY,$DIRECT_KEY,$GOOGLE_KEY,$BYOK_GOOGLE_KEY"
start floor "$BIN/floor" -listen "127.0.0.1:$P_FLOOR" -upstream "http://127.0.0.1:$P_UP" -key "$FLOOR_KEY"
FLOOR_PID=$STARTED
start floor-no-duplex "$BIN/floor" -listen "127.0.0.1:$P_FLOOR_ND" -upstream "http://127.0.0.1:$P_UP" \
	-key "$FLOOR_KEY" -full-duplex=false
FLOOR_ND_PID=$STARTED

# The identity comes from "byokproxy identity new" where the binary has it,
# and from age-keygen otherwise.
if ! "$BIN/byokproxy" identity new --out "$WORK/identity.txt" >/dev/null 2>&1; then
	(cd "$ROOT" && go run filippo.io/age/cmd/age-keygen -o "$WORK/identity.txt" 2>/dev/null)
fi
ADMIN_TOKEN=bench-admin-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
TOKEN_SECRET=bench-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')

# write_config FILE LISTEN ADMIN METRICS OPENAI_UPSTREAM [CA_FILE]
write_config() {
	cat >"$1" <<EOF
listen: 127.0.0.1:$2
log_level: info
log_format: json
admin:
  listen: 127.0.0.1:$3
  token: $ADMIN_TOKEN
metrics:
  listen: 127.0.0.1:$4
redis:
  url: redis://127.0.0.1:$P_REDIS/0
  prefix: "bench:"
keystore:
  identity_file: $WORK/identity.txt
auth:
  token_secrets: ["$TOKEN_SECRET"]
upstream:
  timeout: 60s
providers:
  openai:
    upstream: $5
    shared_key: $SHARED_KEY
    ca_file: "${6:-}"
  anthropic:
    upstream: http://127.0.0.1:$P_UP
  google:
    upstream: http://127.0.0.1:$P_UP
    shared_key: $GOOGLE_KEY
EOF
}

TARGETS=(direct floor shared byok)
if [ -n "${CANDIDATE:-}" ]; then
	TARGETS+=(shared-candidate byok-candidate)
fi

# Each byokproxy target runs in a process of its own, as the floor does.
# When shared and byok used one process, the one that ran right after the
# other measured up to 15 µs per request and 100 µs per stream more. Rotating
# the order did not even that out, because with four targets byok came right
# after shared in three rounds of four. The processes share the Redis data,
# identity and token secret, so one mailbox token works on all of them.
PROXY_TARGETS=()
for t in "${TARGETS[@]}"; do
	case $t in
	shared* | byok*) PROXY_TARGETS+=("$t") ;;
	esac
done
# binary_of TARGET prints the byokproxy binary that serves TARGET.
binary_of() {
	if [[ $1 == *-candidate ]]; then
		echo "$BIN/byokproxy-candidate"
	else
		echo "$BIN/byokproxy"
	fi
}
declare -A TARGET_PID
spare=0
for t in "${PROXY_TARGETS[@]}"; do
	if [ "$t" = shared ]; then
		admin_port=$P_ADMIN metrics_port=$P_METRICS
	else
		admin_port=${SPARE_PORTS[spare]} metrics_port=${SPARE_PORTS[spare + 1]}
		spare=$((spare + 2))
	fi
	write_config "$WORK/$t.yaml" "${P_TARGET[$t]}" "$admin_port" "$metrics_port" "http://127.0.0.1:$P_UP"
	envs=()
	if [[ $t == *-candidate ]]; then
		read -ra envs <<<"${CANDIDATE_ENV:-}"
	fi
	# env(1) replaces itself with the proxy, so the PID is the proxy's.
	start "$t" env "${envs[@]}" "$(binary_of "$t")" serve --config "$WORK/$t.yaml"
	TARGET_PID[$t]=$STARTED
	wait_http "http://127.0.0.1:${P_TARGET[$t]}/healthz"
done

# admin METHOD PATH [BODY] calls the admin API of the running proxy.
admin() {
	curl -sf -X "$1" -H "Authorization: Bearer $ADMIN_TOKEN" -H "Content-Type: application/json" \
		${3:+-d "$3"} "http://127.0.0.1:$P_ADMIN/admin/v1$2"
}
admin PUT /mailboxes/bench-byok/providers/openai/key "{\"key\":\"$BYOK_KEY\"}" >/dev/null
admin PUT /mailboxes/bench-byok/providers/openai/source '{"source":"byok"}' >/dev/null
admin PUT /mailboxes/bench-byok/providers/google/key "{\"key\":\"$BYOK_GOOGLE_KEY\"}" >/dev/null
admin PUT /mailboxes/bench-byok/providers/google/source '{"source":"byok"}' >/dev/null
TOKEN_BYOK=$(admin POST /mailboxes/bench-byok/token | jq -r .token)
TOKEN_SHARED=$(admin POST /mailboxes/bench-shared/token | jq -r .token)


# measure NAME ARGS... runs loadgen against target NAME and records its
# result.
measure() {
	local name=$1 args
	shift
	local chat=openai/v1/chat/completions
	local gemini="google/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
	case $name in
	direct) args=(-url "http://127.0.0.1:$P_UP/v1/chat/completions" -token "$DIRECT_KEY") ;;
	floor) args=(-url "http://127.0.0.1:$P_FLOOR/v1/chat/completions" -token client-token -pid "proxy=$FLOOR_PID") ;;
	floor-no-duplex) args=(-url "http://127.0.0.1:$P_FLOOR_ND/v1/chat/completions" -token client-token -pid "proxy=$FLOOR_ND_PID") ;;
	shared | shared-candidate) args=(-url "http://127.0.0.1:${P_TARGET[$name]}/$chat" -token "$TOKEN_SHARED") ;;
	byok | byok-candidate) args=(-url "http://127.0.0.1:${P_TARGET[$name]}/$chat" -token "$TOKEN_BYOK") ;;
	byok-google) args=(-url "http://127.0.0.1:${P_TARGET[byok]}/$gemini" -token "$TOKEN_BYOK" -pid "proxy=${TARGET_PID[byok]}") ;;
	*)
		echo "bench: unknown target $name" >&2
		return 1
		;;
	esac
	case $name in
	shared | byok | shared-candidate | byok-candidate) args+=(-pid "proxy=${TARGET_PID[$name]}" -pid "redis=$REDIS_PID") ;;
	esac
	timeout 120 "$LOADGEN" -target "$name" -clk-tck "$CLK_TCK" "${args[@]}" "$@" >>"$RESULTS"
}

log "checking every target"
for t in "${TARGETS[@]}"; do
	measure "$t" -phase check -mode open -rate 200 -duration 1s -warmup 0s
done
if jq -e 'select(.phase == "check" and .errors > 0)' "$RESULTS" >/dev/null; then
	jq -c 'select(.phase == "check" and .errors > 0) | {target, error_example}' "$RESULTS" >&2
	echo "bench: a target returned errors; see the logs in $WORK" >&2
	exit 1
fi

jq -cn --arg date "$(date -u +%Y-%m-%dT%H:%MZ)" \
	--arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '+changes')" \
	--arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs) × $(nproc)" \
	--arg mem "$(free -g | awk '/Mem:/ {print $2 " GiB"}')" \
	--arg kernel "$(uname -r)" --arg go "$(go version | cut -d' ' -f3)" \
	--arg redis "$(redis-server --version | grep -o 'v=[0-9.]*' | cut -c3-)" \
	--arg load_start "$(cut -d' ' -f1-3 /proc/loadavg)" \
	--arg rounds "$ROUNDS" --arg window "$WINDOW" --arg rate "$RATE" --arg sat_conns "$SAT_CONNS" \
	--arg stream_rate "$STREAM_RATE" --arg stream_body_bytes "$STREAM_BODY" --arg stream_events 20 \
	--arg cut_rate "$CUT_RATE" --arg cut_body_bytes "$CUT_BODY" --arg candidate "${CANDIDATE:-}" --arg candidate_env "${CANDIDATE_ENV:-}" \
	'{phase: "meta", meta: $ARGS.named}' >>"$RESULTS"

# phase NAME succeeds when PHASES includes NAME.
phase() { [[ $PHASES == *" $1 "* ]]; }

for round in $(seq "$ROUNDS"); do
	log "round $round of $ROUNDS"
	# Each round starts one target later, so that no target always runs
	# first or last in a round.
	offset=$(((round - 1) % ${#TARGETS[@]}))
	ORDER=("${TARGETS[@]:offset}" "${TARGETS[@]:0:offset}")
	if phase open; then
		for t in "${ORDER[@]}"; do
			measure "$t" -round "$round" -phase open -mode open -rate "$RATE" -duration "$WINDOW"
		done
	fi
	if phase sat; then
		for t in "${ORDER[@]}"; do
			measure "$t" -round "$round" -phase sat -mode sat -conns "$SAT_CONNS" -duration "$WINDOW"
		done
	fi
	if phase stream; then
		for t in "${ORDER[@]}"; do
			measure "$t" -round "$round" -phase stream -mode stream -kind chat-stream-usage \
				-body-bytes "$STREAM_BODY" -events 20 -rate "$STREAM_RATE" -duration "$WINDOW"
		done
	fi
	"$BIN/scalarmult" -round "$round" >>"$RESULTS"
done

if phase cut; then
	log "streams cut under load"
	for t in floor-no-duplex floor shared byok; do
		measure "$t" -phase cut -mode stream -kind chat-stream-usage -body-bytes "$CUT_BODY" -events 20 \
			-rate "$CUT_RATE" -duration "$WINDOW"
	done
	# On the own key byokproxy forwards a Gemini body as it arrives, without
	# reading it first, which is the case full duplex protects.
	measure byok-google -phase cut -mode stream -kind gemini-stream -body-bytes "$CUT_BODY" -events 20 \
		-rate "$CUT_RATE" -duration "$WINDOW"
fi

for pid in "${TARGET_PID[@]}" "$FLOOR_PID" "$FLOOR_ND_PID"; do
	stop "$pid"
done

# idle NAME URL TOKEN PID opens the idle streams against one proxy process
# and records its memory.
idle() {
	timeout 180 "$LOADGEN" -target "$1" -phase idle -mode idle -streams "$IDLE" -ramp 1000 \
		-kind chat-stream-usage -body-bytes "$STREAM_BODY" -url "$2" -token "$3" -pid "proxy=$4" \
		-header "X-Bench-Hold: 120s" >>"$RESULTS"
}

if phase idle; then
	log "memory with idle streams"
	# The upstream is HTTPS with HTTP/2 here, as the real providers are: a
	# proxy then needs one socket per stream rather than two, which keeps
	# 10,000 streams within this machine's limit of open files.
	start floor-mem "$BIN/floor" -listen "127.0.0.1:$P_MEM_FLOOR" -upstream "https://127.0.0.1:$P_UPTLS" \
		-key "$FLOOR_KEY" -ca-file "$WORK/upstream.pem"
	pid=$STARTED
	wait_http "http://127.0.0.1:$P_MEM_FLOOR/"
	idle floor "http://127.0.0.1:$P_MEM_FLOOR/v1/chat/completions" client-token "$pid"
	stop "$pid"

	write_config "$WORK/proxy-mem.yaml" "$P_MEM_PROXY" "${SPARE_PORTS[0]}" "${SPARE_PORTS[1]}" \
		"https://127.0.0.1:$P_UPTLS" "$WORK/upstream.pem"
	for t in "${PROXY_TARGETS[@]}"; do
		token=$TOKEN_SHARED
		[[ $t == byok* ]] && token=$TOKEN_BYOK
		# A fresh process per target, so no earlier run's memory counts.
		start "mem-$t" "$(binary_of "$t")" serve --config "$WORK/proxy-mem.yaml"
		pid=$STARTED
		wait_http "http://127.0.0.1:$P_MEM_PROXY/healthz"
		idle "$t" "http://127.0.0.1:$P_MEM_PROXY/openai/v1/chat/completions" "$token" "$pid"
		stop "$pid"
	done
fi

jq -cn --arg load_end "$(cut -d' ' -f1-3 /proc/loadavg)" '{phase: "meta", meta: $ARGS.named}' >>"$RESULTS"
"$BIN/report" -in "$RESULTS" -svg "$OUT/latency.svg" | tee "$OUT/report.md"
log "results in $OUT (logs in $WORK)"
