#!/usr/bin/env bash
# docker/smoke.sh: the docker compose deployment, built and run for real with a CPU worker.
#
#   make smoke            (or: docker/smoke.sh)      needs a Docker daemon, Compose v2.24.4+, curl, python3
#
# Builds both images, starts docker-compose.yml with a test override (CPU worker, the images just
# built, scratch volumes, a random host port on 127.0.0.1, a fresh API key), checks the containers,
# runs real slides through the HTTP API (one of them with its worker killed mid-job), restarts the
# API and Redis, and removes its containers, networks and volumes at the end, also on failure.
# Prints one line per check; exits 0 only when every check passed. Not part of `make test`.
#
# Environment (all optional):
#   FPROTOSEG_PYTHON_IMAGE        base of the API image (build arg PYTHON_IMAGE)
#   FPROTOSEG_WORKER_BASE_IMAGE   base of the worker image (WORKER_BASE_IMAGE); default: FPROTOSEG_PYTHON_IMAGE
#   FPROTOSEG_REDIS_IMAGE         the Redis image compose runs
#   FPROTOSEG_PIP_INDEX_URL, FPROTOSEG_PIP_EXTRA_INDEX_URL, FPROTOSEG_PIP_FIND_LINKS,
#   FPROTOSEG_PIP_TRUSTED_HOST, FPROTOSEG_TORCH_INDEX_URL
#                                 build args PIP_INDEX_URL ... TORCH_INDEX_URL of both images
#   FPROTOSEG_WHEELS_DIR          a local folder of wheels (e.g. torch's CPU build), served to the
#                                 build on 127.0.0.1 and added to PIP_FIND_LINKS
#   FPROTOSEG_WHEELS_PORT         its port (default: a free one; a fixed one keeps the build cache)
#   FPROTOSEG_CA_CERTS_FILE       PEM file of further CAs to trust while building (build arg CA_CERTS)
#   FPROTOSEG_BUILD_NETWORK       network of the build steps (default: host)
#   FPROTOSEG_SHARED_DIR          the shared data and tools (default: ../shared beside the repository)
#   FPROTOSEG_SMOKE_MOSAIC_REPEAT size of the large slide, in copies of the crops (default: 2)
#   FPROTOSEG_SMOKE_JOB_TIMEOUT_S longest wait for one job (default: 900)
#   FPROTOSEG_SMOKE_LOG_DIR       build and compose logs (default: build/smoke in the repository)
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${FPROTOSEG_SHARED_DIR:-$REPO/../shared}
SHARED=$(cd "$SHARED" 2> /dev/null && pwd || echo "$SHARED")
SMALL_SLIDE=$SHARED/data/slides/CMU-1-Small-Region.svs
TOOLS=$SHARED/tools
CROPS=$SHARED/data/masks/wsss4luad/test
REPEAT=${FPROTOSEG_SMOKE_MOSAIC_REPEAT:-2}
JOB_TIMEOUT=${FPROTOSEG_SMOKE_JOB_TIMEOUT_S:-900}
LOG_DIR=${FPROTOSEG_SMOKE_LOG_DIR:-$REPO/build/smoke}
BUILD_NETWORK=${FPROTOSEG_BUILD_NETWORK:-host}
API_IMAGE=fprotoseg-api:smoke
WORKER_IMAGE=fprotoseg-worker:smoke-cpu
PYTHON_IMAGE=${FPROTOSEG_PYTHON_IMAGE:-}
WORKER_BASE_IMAGE=${FPROTOSEG_WORKER_BASE_IMAGE:-$PYTHON_IMAGE}
REDIS_IMAGE=${FPROTOSEG_REDIS_IMAGE:-}

PASSED=0
FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %-20s %s\n' "$1" "$2"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL  %-20s %s\n' "$1" "$2"; }
# A check whose failure leaves nothing to test after it: stop here (the trap tears down).
fatal() { fail "$1" "$2"; exit 1; }

mkdir -p "$LOG_DIR"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fprotoseg-smoke.XXXXXX")
chmod 755 "$TMP"
PROJECT=fprotoseg-smoke-$(basename "$TMP" | tr -dc 'a-zA-Z0-9' | tr 'A-Z' 'a-z' | tail -c 7)
WHEELS_PID=""
COMPOSE_STARTED=0
DC=(docker compose -p "$PROJECT" --project-directory "$REPO" -f "$REPO/docker-compose.yml"
    -f "$TMP/override.yml" --env-file "$TMP/smoke.env")

teardown() {
  local rc=$?
  if [ "$COMPOSE_STARTED" = 1 ]; then
    "${DC[@]}" logs --no-color --timestamps > "$LOG_DIR/compose.log" 2>&1 || true
    "${DC[@]}" down --volumes --remove-orphans --timeout 10 > "$LOG_DIR/down.log" 2>&1
    local label="label=com.docker.compose.project=$PROJECT" left
    left="$(docker ps -aq --filter "$label") $(docker volume ls -q --filter "$label") $(docker network ls -q --filter "$label")"
    if [ -z "${left// /}" ]; then
      pass teardown "project $PROJECT: containers, networks and volumes removed"
    else
      fail teardown "project $PROJECT left: $left"
    fi
  fi
  [ -n "$WHEELS_PID" ] && kill "$WHEELS_PID" 2> /dev/null
  rm -rf "$TMP"
  [ "$FAILED" -eq 0 ] && [ "$rc" -eq 0 ] || rc=1
  echo "smoke: $PASSED passed, $FAILED failed (logs: $LOG_DIR)"
  exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---- helpers ---------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# jget EXPR < json: a Python expression over the parsed document `d`
jget() { python3 -c 'import json, sys; d = json.load(sys.stdin); v = eval(sys.argv[1]); print(v if not isinstance(v, (dict, list)) else json.dumps(v))' "$1"; }
mib() { docker image inspect -f '{{.Size}}' "$1" | awk '{printf "%.0f MiB", $1 / 1048576}'; }
# Run a tool of ../shared/tools with the worker image's Python (numpy, tifffile, shapely are there).
tool() {
  docker run --rm --network none --user "$(id -u):$(id -g)" -e HOME=/tmp \
    -v "$TOOLS:/tools:ro" -v "$TMP:/scratch" -v "$CROPS:/crops:ro" --entrypoint python "$WORKER_IMAGE" "$@"
}

# ---- build ---------------------------------------------------------------------------------------------
docker info > /dev/null 2>&1 || fatal docker "no Docker daemon answers (docker info)"
docker compose version > /dev/null 2>&1 || fatal docker "no Docker Compose v2 (docker compose version)"
for f in "$SMALL_SLIDE" "$TOOLS/mosaic.py" "$TOOLS/geojson_check.py" "$CROPS/img"; do
  [ -e "$f" ] || fatal inputs "missing $f (FPROTOSEG_SHARED_DIR)"
done

ARGS=()
[ -n "${FPROTOSEG_PIP_INDEX_URL:-}" ] && ARGS+=(--build-arg "PIP_INDEX_URL=$FPROTOSEG_PIP_INDEX_URL")
[ -n "${FPROTOSEG_PIP_EXTRA_INDEX_URL:-}" ] && ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$FPROTOSEG_PIP_EXTRA_INDEX_URL")
[ -n "${FPROTOSEG_PIP_TRUSTED_HOST:-}" ] && ARGS+=(--build-arg "PIP_TRUSTED_HOST=$FPROTOSEG_PIP_TRUSTED_HOST")
[ -n "${FPROTOSEG_CA_CERTS_FILE:-}" ] && ARGS+=(--build-arg "CA_CERTS=$(cat "$FPROTOSEG_CA_CERTS_FILE")")
FIND_LINKS=${FPROTOSEG_PIP_FIND_LINKS:-}
if [ -n "${FPROTOSEG_WHEELS_DIR:-}" ]; then
  port=${FPROTOSEG_WHEELS_PORT:-$(free_port)}
  python3 -m http.server --bind 127.0.0.1 --directory "$FPROTOSEG_WHEELS_DIR" "$port" > "$LOG_DIR/wheels.log" 2>&1 &
  WHEELS_PID=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/" > /dev/null && break; sleep 0.1; done
  FIND_LINKS="${FIND_LINKS:+$FIND_LINKS }http://127.0.0.1:$port/"
fi
[ -n "$FIND_LINKS" ] && ARGS+=(--build-arg "PIP_FIND_LINKS=$FIND_LINKS")

# The classic builder (no buildx plugin, or DOCKER_BUILDKIT=0) keeps a failed step's container
# unless told otherwise; buildx has no such container and no such flag.
if [ "${DOCKER_BUILDKIT:-}" = 0 ] || ! docker buildx version > /dev/null 2>&1; then ARGS+=(--force-rm); fi
build() {  # build NAME TAG DOCKERFILE [ARGS...]
  local name=$1 tag=$2 file=$3 start end previous
  shift 3
  previous=$(docker image inspect -f '{{.Id}}' "$tag" 2> /dev/null)
  start=$(date +%s)
  if docker build --network "$BUILD_NETWORK" -f "$REPO/$file" -t "$tag" "${ARGS[@]}" "$@" "$REPO" \
      > "$LOG_DIR/build-$name.log" 2>&1; then
    end=$(date +%s)
    # the image this tag named before, now untagged: ours, so removed (unless a container uses it)
    if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
      docker rmi "$previous" > /dev/null 2>&1
    fi
    pass "build $name" "$tag: $(mib "$tag"), built in $((end - start)) s"
  else
    fatal "build $name" "docker build failed; see $LOG_DIR/build-$name.log"
  fi
}
build api "$API_IMAGE" docker/api.Dockerfile ${PYTHON_IMAGE:+--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"}
build worker "$WORKER_IMAGE" docker/worker.Dockerfile --build-arg WORKER_FLAVOUR=cpu \
  ${WORKER_BASE_IMAGE:+--build-arg "WORKER_BASE_IMAGE=$WORKER_BASE_IMAGE"} \
  ${FPROTOSEG_TORCH_INDEX_URL:+--build-arg "TORCH_INDEX_URL=$FPROTOSEG_TORCH_INDEX_URL"}

# ---- compose up with the test override --------------------------------------------------------------
# Nothing from the caller's .env or shell reaches the project: every variable compose reads is set here.
while IFS= read -r name; do unset "$name"; done < <(grep -oE '^[A-Z_][A-Z0-9_]*' "$REPO/.env.example")
PORT=$(free_port)
KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')
BASE=http://127.0.0.1:$PORT
mkdir -p "$TMP/models" "$TMP/slides" "$TMP/out"
{
  grep -vE '^(#|$|FPROTOSEG_API_KEYS=|FPROTOSEG_API_BIND=|FPROTOSEG_API_PORT=|FPROTOSEG_DEVICE=|FPROTOSEG_MODELS_DIR=|FPROTOSEG_SLIDES_HOST_DIR=|FPROTOSEG_HOST_DATA_DIR=|FPROTOSEG_WORKER_STOP_GRACE=)' \
    "$REPO/.env.example"
  echo "FPROTOSEG_API_KEYS=$KEY"
  echo "FPROTOSEG_API_BIND=127.0.0.1"
  echo "FPROTOSEG_API_PORT=$PORT"
  echo "FPROTOSEG_DEVICE=cpu"
  echo "FPROTOSEG_MODELS_DIR=$TMP/models"
  echo "FPROTOSEG_SLIDES_HOST_DIR=$TMP/slides"
  echo "FPROTOSEG_HOST_DATA_DIR="
  echo "FPROTOSEG_WORKER_STOP_GRACE=20s"
} > "$TMP/smoke.env"
# A lost job is requeued after seconds, not the production minutes.
fast='{FPROTOSEG_JOB_HEARTBEAT_INTERVAL_S: "2", FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S: "15", FPROTOSEG_MAINTENANCE_INTERVAL_S: "2"}'
cat > "$TMP/override.yml" <<EOF
services:
  redis:
${REDIS_IMAGE:+    image: $REDIS_IMAGE}
    pull_policy: missing
  api:
    image: $API_IMAGE
    pull_policy: never
    environment: $fast
  worker:
    image: $WORKER_IMAGE
    pull_policy: never
    build:
      args: {WORKER_FLAVOUR: cpu}
    environment: $fast
    deploy:
      resources:
        reservations:
          devices: !reset []
EOF

if "${DC[@]}" config --quiet > "$LOG_DIR/config.log" 2>&1; then :; else
  fatal "compose config" "the override does not merge; see $LOG_DIR/config.log"
fi
COMPOSE_STARTED=1
"${DC[@]}" up -d --no-build > "$LOG_DIR/up.log" 2>&1 || fatal "compose up" "see $LOG_DIR/up.log"

wait_ready() {  # until /readyz says ready (broker, storage and a worker), at most $1 s
  local deadline=$((SECONDS + $1))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$BASE/readyz")" = 200 ] && return 0
    sleep 2
  done
  return 1
}
if wait_ready 240; then
  pass "compose up" "redis, api and a CPU worker; $BASE/readyz ready (project $PROJECT)"
else
  fatal "compose up" "$BASE/readyz not ready after 240 s: $(curl -s "$BASE/readyz" | head -c 300)"
fi

# ---- inside the containers ---------------------------------------------------------------------------
for svc in api worker; do
  uid=$("${DC[@]}" exec -T "$svc" id -u 2>&1)
  if [ -n "$uid" ] && [ "$uid" != 0 ] && [ "$uid" -eq "$uid" ] 2> /dev/null; then
    pass "non-root $svc" "runs as uid $uid"
  else
    fail "non-root $svc" "id -u gave '$uid'"
  fi
done
out=$("${DC[@]}" exec -T api python -c "import torch" 2>&1)
if [ $? -ne 0 ] && grep -q "No module named 'torch'" <<< "$out"; then
  pass "api without torch" "import torch fails in the api container"
else
  fail "api without torch" "import torch: $(tail -n 1 <<< "$out")"
fi
out=$("${DC[@]}" exec -T worker python -c "
from fprotoseg.model import load_segmenter
from fprotoseg.model.catalog import default_model_name, list_models, resolve_checkpoint
from fprotoseg.worker.service.settings import load_settings
s = load_settings()
entry = list_models(s.models_dir)[default_model_name(s.checkpoint)]
assert entry.source == 'packaged', entry.source
seg = load_segmenter(resolve_checkpoint(s.checkpoint, s.models_dir), device=s.device)
print(entry.name, entry.path.stat().st_size, 'bytes, loaded on', s.device)
" 2>&1)
if [ $? -eq 0 ]; then
  pass "worker model" "packaged $(tail -n 1 <<< "$out")"
else
  fail "worker model" "$(tail -n 1 <<< "$out")"
fi

# ---- jobs through the HTTP API --------------------------------------------------------------------------
api() { curl -sS --max-time 120 -H "X-API-Key: $KEY" "$@"; }
submit() {  # submit FILE -> job id
  local code
  code=$(api -o "$TMP/submit.json" -w '%{http_code}' -F "file=@$1" "$BASE/segment") || return 1
  [ "$code" = 202 ] || { echo "POST /segment: HTTP $code $(head -c 300 "$TMP/submit.json")" >&2; return 1; }
  jget 'd["job_id"]' < "$TMP/submit.json"
}
job() { api "$BASE/jobs/$1"; }
poll() {  # poll JOB_ID TIMEOUT_S [PYTHON_CONDITION] -> prints the state when terminal (or the condition holds)
  local deadline=$((SECONDS + $2)) cond=${3:-False} doc
  while [ $SECONDS -lt $deadline ]; do
    doc=$(job "$1") || { sleep 2; continue; }
    if jget "d['state'] in ('succeeded', 'failed', 'cancelled') or ($cond)" <<< "$doc" | grep -q True; then
      jget 'd["state"]' <<< "$doc"
      return 0
    fi
    sleep 1
  done
  echo timeout
}
download() {  # download JOB_ID DIR: every result link of the job; prints "name=sha256 ..." on success
  local id=$1 dir=$2 name url code sums=""
  mkdir -p "$dir"
  while read -r name url; do
    [ -n "$url" ] || continue
    code=$(api -o "$dir/$name" -w '%{http_code}' "$url") || return 1
    [ "$code" = 200 ] && [ -s "$dir/$name" ] || { echo "GET $url: HTTP $code" >&2; return 1; }
    [ "$name" = view ] || sums="$sums $name=$(sha256sum "$dir/$name" | cut -c1-12)"
  done < <(job "$id" | jget '"\n".join(f"{k} {v}" for k, v in d["links"].items() if k != "self")')
  echo "${sums# }"
}
geojson_ok() {  # geojson_ok GEOJSON SLIDE_IN_TMP: QuPath's rules; prints the checker's summary line
  local dims
  dims=$(tool -c "import openslide, sys; print(*openslide.OpenSlide(sys.argv[1]).dimensions)" "/scratch/$2") || return 1
  set -- "$1" $dims
  tool /tools/geojson_check.py "/scratch/${1#"$TMP"/}" --width "$2" --height "$3" 2>&1 | tail -n 1
  return "${PIPESTATUS[0]}"
}

# A real slide, uploaded with curl, polled to the end, every result downloaded, the GeoJSON checked.
cp "$SMALL_SLIDE" "$TMP/small.svs"
if SMALL=$(submit "$TMP/small.svs"); then
  t0=$SECONDS
  state=$(poll "$SMALL" "$JOB_TIMEOUT")
  if [ "$state" = succeeded ]; then
    pass "small slide" "CMU-1-Small-Region.svs: job $SMALL succeeded in $((SECONDS - t0)) s"
    if SMALL_SUMS=$(download "$SMALL" "$TMP/out/small"); then
      pass "small results" "$(job "$SMALL" | jget '" ".join(k for k in d["links"] if k != "self")') downloaded"
      if line=$(geojson_ok "$TMP/out/small/geojson" small.svs); then
        pass "small geojson" "$line"
      else
        fail "small geojson" "$line"
      fi
    else
      fail "small results" "a result could not be downloaded"
    fi
  else
    fail "small slide" "job $SMALL ended $state: $(job "$SMALL" | jget 'd["error"]')"
  fi
else
  fail "small slide" "upload refused"
fi

# A larger slide (a mosaic of real crops); its worker is killed mid-job and started again.
if line=$(tool /tools/mosaic.py /crops/img /crops/mask /scratch/mosaic --repeat "$REPEAT" 2>&1); then
  pass "large slide made" "mosaic.py: $(tail -n 1 <<< "$line" | sed "s|/scratch/||")"
else
  fatal "large slide made" "mosaic.py: $(tail -n 1 <<< "$line")"
fi
LARGE=$(submit "$TMP/mosaic.tiff") || fatal "worker killed" "upload of the mosaic refused"
state=$(poll "$LARGE" "$JOB_TIMEOUT" "d['state'] == 'running' and d['progress'] >= 0.1")
before=$(job "$LARGE")
if [ "$state" != running ]; then
  hint=""
  [ "$state" = succeeded ] && hint=" (too small to kill mid-job: raise FPROTOSEG_SMOKE_MOSAIC_REPEAT)"
  fail "worker killed" "job $LARGE was $state before the kill$hint"
else
  worker_id=$("${DC[@]}" ps -q worker)
  docker kill "$worker_id" > /dev/null
  sleep 3
  "${DC[@]}" start worker > /dev/null 2>&1
  running=$(docker inspect -f '{{.State.Running}}' "$worker_id")
  state=$(poll "$LARGE" "$JOB_TIMEOUT")
  sleep 8  # a second finish (a duplicate delivery) would show within a few heartbeats
  after=$(job "$LARGE")
  attempts=$(jget 'd["attempts"]' <<< "$after")
  finished=$(jget 'd["finished_at"]' <<< "$after")
  leftovers=$("${DC[@]}" exec -T api sh -c "ls /data/jobs/$LARGE | grep -v '^results$'" 2>&1)
  ends=$("${DC[@]}" logs --no-color api worker 2>&1 | grep -c "job $LARGE: succeeded")
  sleep 4
  if [ "$state" = succeeded ] && [ "$running" = true ] && [ "$attempts" = 2 ] && [ "$ends" = 1 ] \
      && [ -z "$leftovers" ] && [ "$(job "$LARGE" | jget 'd["finished_at"]')" = "$finished" ]; then
    pass "worker killed" "killed at $(jget '"%s %.0f%%" % (d["stage"], 100 * d["progress"])' <<< "$before"), restarted: job $LARGE succeeded once (attempts 2, one end logged, no partial output)"
  else
    fail "worker killed" "state=$state worker_running=$running attempts=$attempts ends_logged=$ends leftovers='$leftovers'"
  fi
fi
if [ "$state" = succeeded ] && LARGE_SUMS=$(download "$LARGE" "$TMP/out/large"); then
  if line=$(geojson_ok "$TMP/out/large/geojson" mosaic.tiff); then
    pass "large geojson" "$line"
  else
    fail "large geojson" "$line"
  fi
else
  fail "large geojson" "no results of job $LARGE"
  LARGE_SUMS=""
fi

# ---- restart Redis and the API: job records (AOF) and results (shared volume) are still there ------------
aof=$("${DC[@]}" exec -T redis redis-cli CONFIG GET appendonly 2>&1 | tail -n 1)
snapshot() { for id in "$SMALL" "$LARGE"; do job "$id" | jget '[d["job_id"], d["state"], d["attempts"], d["finished_at"], d["upload"]["sha256"]]'; done; }
records_before=$(snapshot)
"${DC[@]}" restart redis api > "$LOG_DIR/restart.log" 2>&1
if wait_ready 180; then
  records_after=$(snapshot)
  sums_small=$(download "$SMALL" "$TMP/out/small-after")
  sums_large=$(download "$LARGE" "$TMP/out/large-after")
  if [ "$aof" = yes ] && [ "$records_after" = "$records_before" ] && [ -n "${SMALL_SUMS:-}" ] \
      && [ "$sums_small" = "$SMALL_SUMS" ] && [ "$sums_large" = "$LARGE_SUMS" ]; then
    pass "restart redis+api" "appendonly=$aof; both job records and all $(wc -w <<< "$SMALL_SUMS $LARGE_SUMS") result files unchanged"
  else
    fail "restart redis+api" "appendonly=$aof records_equal=$([ "$records_after" = "$records_before" ] && echo yes || echo no) small='$sums_small' large='$sums_large'"
  fi
else
  fail "restart redis+api" "not ready again after 180 s"
fi

exit 0  # the EXIT trap tears down and sets the status from the checks
