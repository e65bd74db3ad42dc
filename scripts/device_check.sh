#!/usr/bin/env bash
# The CUDA checks and measurements, as one prepared run on a machine with a GPU.
# The parts' time limits add up to 490 s, so that one run fits a 10-minute device call.
#   run:      bash scripts/device_check.sh                      (OUT defaults to ./device_out)
#   dry run:  DEVICE=cpu DRY_RUN=1 bash scripts/device_check.sh  (tiny sizes, a few minutes on CPU)
# Parts, each under its own `timeout`; a failing part does not stop the rest, its exit status
# goes into the summary:
#   1. the device (nvidia-smi, torch's view of it)
#   2. pytest -m cuda tests/test_cuda.py   (ADAFISHER_TEST_DEVICE=$DEVICE; junit XML)
#   3. bench speed --count-ops: cifar_resnet18 b32 (with the peers that are installed),
#      resnet18 b128, resnet50 b256 224² and the 4-layer GPT b32 x 256 tokens (no peers): step-time,
#      component, state-memory and op-count ratios to fused Adam/AdamW, peak step memory
#   4. summary.txt: every part's exit status and seconds, the test counts, the ratio columns
# $OUT ends up with at most 8 files (the lent GPU machines return no more): summary.txt,
# test_cuda.xml, one JSON per benchmark, logs.tar.gz (every part's full log).
# PARTS (default: all) picks parts by name, e.g. PARTS="tests cifar_resnet18_b32 gpt_b32x256";
# PEERS=0 leaves the second-order peers out of the CIFAR benchmark (a shorter run).
# Python: $PY, else .venv/bin/python, else a python3 that imports torch (an offline GPU image),
# else scripts/setup-venv.sh. The package is imported from this checkout (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
DEVICE=${DEVICE:-cuda}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python
  elif python3 -c 'import torch' >/dev/null 2>&1; then PY=python3
  else bash scripts/setup-venv.sh >"$LOGS/setup.log" 2>&1; PY=.venv/bin/python
  fi
fi
STATUS=$LOGS/status.tsv
: >"$STATUS"

# part NAME SECONDS CMD...: run CMD under `timeout`, log to $LOGS/NAME.log, record rc and seconds.
PARTS=${PARTS:-all}
PEERS=${PEERS:-1}
part() {
  local name=$1 limit=$2 start rc
  shift 2
  if [ "$PARTS" != all ] && [ "$name" != device ] && [[ " $PARTS " != *" $name "* ]]; then return; fi
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=15 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >>"$STATUS"
  tail -n 20 "$LOGS/$name.log"
  echo "== $name: exit $rc$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (timed out)')"
}

if [ "$DRY_RUN" = 1 ]; then
  # Same models and flags, sizes small enough for two CPU cores.
  REP=(--repeats 2 --warmup 1) THREADS=(--threads 1) TESTS_S=300 BENCH_S=150  # 1 thread: no OpenMP spinning on a shared CPU
  CIFAR=(--model cifar_resnet18 --batch-size 4)
  R18=(--model resnet18 --batch-size 4 --image-size 32)
  R50=(--model resnet50 --batch-size 2 --image-size 32)
  GPT=(--model gpt --batch-size 2 --context 16)
  R50_S=$BENCH_S GPT_S=$BENCH_S R18_S=$BENCH_S CIFAR_S=$BENCH_S
  FUSED=()  # compiling the fused kernel takes minutes on two CPU cores
else
  REP=(--repeats 20 --warmup 5) THREADS=(--threads 0) TESTS_S=100
  CIFAR=(--model cifar_resnet18 --batch-size 32)
  R18=(--model resnet18 --batch-size 128)
  R50=(--model resnet50 --batch-size 256 --image-size 224 --repeats 10 --warmup 3)  # fewer rounds: its steps are the longest
  GPT=(--model gpt --batch-size 32 --context 256)
  CIFAR_S=90 R18_S=60 R50_S=90 GPT_S=120
  FUSED=(--fused)  # compiles the update: on the GPT only (a compile takes about a minute)
fi
BENCH=("$PY" -m lightning_adafisher.bench speed --device "$DEVICE" --count-ops "${THREADS[@]}" "${REP[@]}")

part device 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
  $PY -c 'import torch, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"python\", platform.python_version()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\")'"
part tests "$TESTS_S" env ADAFISHER_TEST_DEVICE="$DEVICE" "$PY" -m pytest -m cuda tests/test_cuda.py -q \
  -p no:cacheprovider --junitxml="$OUT/test_cuda.xml"
[ "$PEERS" = 1 ] || CIFAR+=(--no-peers)
part cifar_resnet18_b32 "$CIFAR_S" "${BENCH[@]}" "${CIFAR[@]}" --out "$OUT/cifar_resnet18_b32.json"
part resnet18_b128 "$R18_S" "${BENCH[@]}" "${R18[@]}" --no-peers --out "$OUT/resnet18_b128.json"
part resnet50_b256 "$R50_S" "${BENCH[@]}" "${R50[@]}" --no-peers --out "$OUT/resnet50_b256.json"
part gpt_b32x256 "$GPT_S" "${BENCH[@]}" "${GPT[@]}" --no-peers "${FUSED[@]}" --out "$OUT/gpt_b32x256.json"

# The summary: exit statuses, test counts, the ratio columns of every benchmark JSON.
timeout 60 "$PY" - "$OUT" "$LOGS" "$DEVICE" "$DRY_RUN" >"$OUT/summary.txt" 2>&1 <<'EOF'
import json, pathlib, sys
import xml.etree.ElementTree as ET

out, logs, device, dry = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"scripts/device_check.sh on {device}{' (DRY_RUN: tiny sizes, not measurements)' if dry == '1' else ''}")
print((logs / "device.log").read_text().strip() if (logs / "device.log").exists() else "no device log")
print("\npart                  exit  seconds")
for line in (logs / "status.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    note = " (timed out)" if rc in ("124", "137") else "" if rc == "0" else " FAILED"
    print(f"{name:20s} {rc:>5s} {secs:>8s}{note}")
xml = out / "test_cuda.xml"
if xml.exists():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
    print("\ntests/test_cuda.py: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for case in suite.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            print(f"  FAILED {case.get('name')}: {(bad.get('message') or '').splitlines()[0][:160]}")


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


for path in sorted(out.glob("*.json")):
    r = json.loads(path.read_text())
    size = f"{r['image_size']}²" if r.get("image_size") else f"x {r['context']} tokens"
    print(f"\n{path.name}: {r['model']} b{r['batch_size']} {size} on {r['device']}, "
          f"median of {r['repeats']}, baseline {r['baseline']}")
    print(f"{'optimizer':26s} {'step ms':>8s} {'x step':>7s} {'x mean':>7s} {'x parts':>7s} "
          f"{'x state':>7s} {'x ops':>6s} {'ops/step':>8s} {'peak MB':>8s}")
    for row in r["rows"]:
        peak = row.get("peak_step_bytes")
        print(f"{row['optimizer']:26s} {row['median_step_ms']:8.2f} {row['ratio_to_baseline']:7.3f} "
              f"{row['mean_ratio_to_baseline']:7.3f} {fmt(row.get('component_ratio_to_baseline'), '7.3f')} "
              f"{row['state_ratio_to_baseline']:7.3f} {fmt(row.get('ops_ratio_to_baseline'), '6.2f')} "
              f"{fmt(row.get('ops_per_step'), '8.1f')} {fmt(peak and peak / 2**20, '8.0f')}")
    for name, why in r.get("skipped", {}).items():
        print(f"  skipped {name}: {why}")
EOF
rc=$?
[ "$rc" = 0 ] || echo "summary: exit $rc" >>"$OUT/summary.txt"
failed=$(awk -F'\t' '$2 != 0' "$STATUS" | wc -l)
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
cat "$OUT/summary.txt"
# Exit status: 0 only when every part (and the summary) succeeded.
[ "$failed" = 0 ] && [ "$rc" = 0 ]
