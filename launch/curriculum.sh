#!/usr/bin/env bash
# The Keye-VL-1.5 curriculum: stage 0 -> 1 -> 2 -> two stage-3 anneals -> merge -> Hugging Face export.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/curriculum.sh --out DIR [options] [hydra overrides for every training stage...]

Runs, in order, stopping at the first failure (each stage starts from the previous stage's final
weights through init_from=, with a fresh optimizer and schedule):

  stage0  recipe=stage0_vit          run_dir=DIR/stage0_vit       stage.init_from=--init-from (if given)
  stage1  recipe=stage1_align        run_dir=DIR/stage1_align     stage.init_from=DIR/stage0_vit
  stage2  recipe=stage2_multitask    run_dir=DIR/stage2_multitask stage.init_from=DIR/stage1_align
  stage3  recipe=stage3_anneal_128k  run_dir=DIR/stage3_mix_a     stage.init_from=DIR/stage2_multitask
          (+ the --mix-a overrides)
          recipe=stage3_anneal_128k  run_dir=DIR/stage3_mix_b     stage.init_from=DIR/stage2_multitask
          (+ the --mix-b overrides)
  merge   keye-merge --config recipes/merge.yaml --input DIR/stage3_mix_a --input DIR/stage3_mix_b
          --out DIR/merged --format dcp
  export  keye-convert export --ckpt DIR/merged --out DIR/hf [--tokenizer $TOKENIZER_DIR]

Example:
  launch/curriculum.sh --out runs/keye --nproc 8 --init-from runs/init_hf \
    --mix-b 'data.shares={video: 0.3, caption: 0.2, conversation: 0.2, interleaved: 0.1, text: 0.2}' \
    model=keye_8b

Options:
  --out DIR           root directory of all stage outputs (required)
  --nproc N           processes per node for the training stages (default: $NPROC or 8)
  --init-from DIR     stage 0's starting point, e.g. the output of `keye-convert init`
  --mix-a OVERRIDE    one extra override of stage-3 run A, repeatable (default: none, i.e. the
                      recipe's own mixture)
  --mix-b OVERRIDE    one extra override of stage-3 run B, repeatable (required: the two anneals must
                      see different data mixtures for the merge to be worth it)
  --start-at STAGE    skip the stages before STAGE (stage0, stage1, stage2, stage3, merge, export);
                      the skipped stages' directories must already exist
  -h, --help          show this help

Environment:
  DRY_RUN=1           print every command, run nothing
  LAUNCH              how a training stage starts (default: launch/torchrun.sh beside this script);
                      e.g. LAUNCH="srun --ntasks-per-node=1 launch/torchrun.sh --nnodes 4
                      --rdzv-endpoint node001:29500" inside a Slurm allocation
  RECIPE_STAGE0..3    recipe names (default: stage0_vit, stage1_align, stage2_multitask,
                      stage3_anneal_128k)
  MERGE_RECIPE        keye-merge config (default: recipes/merge.yaml of this repository)
  TOKENIZER_DIR       tokenizer files copied into the exported Hugging Face dir
EOF
}

die() {
  echo "curriculum.sh: $*" >&2
  exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out=""
nproc="${NPROC:-8}"
init_from=""
mix_a=()
mix_b=()
start_at="stage0"
common=()

while (($#)); do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --out) out="${2:?--out needs a value}"; shift 2 ;;
    --out=*) out="${1#*=}"; shift ;;
    --nproc) nproc="${2:?--nproc needs a value}"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    --init-from) init_from="${2:?--init-from needs a value}"; shift 2 ;;
    --init-from=*) init_from="${1#*=}"; shift ;;
    --mix-a) mix_a+=("${2:?--mix-a needs a value}"); shift 2 ;;
    --mix-a=*) mix_a+=("${1#*=}"); shift ;;
    --mix-b) mix_b+=("${2:?--mix-b needs a value}"); shift 2 ;;
    --mix-b=*) mix_b+=("${1#*=}"); shift ;;
    --start-at) start_at="${2:?--start-at needs a value}"; shift 2 ;;
    --start-at=*) start_at="${1#*=}"; shift ;;
    --)
      shift
      common+=("$@")
      break
      ;;
    -*) die "unknown option $1 (hydra overrides look like key=value; see --help)" ;;
    *)
      common+=("$1")
      shift
      ;;
  esac
done

[[ -n "$out" ]] || { usage >&2; die "--out DIR is required"; }
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc=$nproc must be a positive integer"
((${#mix_b[@]})) || die "--mix-b is required: the second stage-3 anneal needs a different data mixture"
[[ "${mix_a[*]}" != "${mix_b[*]}" ]] || die "--mix-a and --mix-b are the same; the anneals need different mixtures"
stages=(stage0 stage1 stage2 stage3 merge export)
start_index=-1
for i in "${!stages[@]}"; do
  [[ "${stages[$i]}" == "$start_at" ]] && start_index=$i
done
((start_index >= 0)) || die "--start-at=$start_at must be one of ${stages[*]}"

read -r -a launch <<<"${LAUNCH:-$here/torchrun.sh}"
s0="$out/${RECIPE_STAGE0:-stage0_vit}"
s1="$out/${RECIPE_STAGE1:-stage1_align}"
s2="$out/${RECIPE_STAGE2:-stage2_multitask}"
s3a="$out/stage3_mix_a"
s3b="$out/stage3_mix_b"
merged="$out/merged"
hf="$out/hf"

quote() {
  local line="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then line+=" $arg"; else line+=" $(printf '%q' "$arg")"; fi
  done
  echo "${line# }"
}

# run STAGE_NAME CMD...: skip stages before --start-at, print, run, stop the curriculum on failure.
run() {
  local name="$1" index
  shift
  for index in "${!stages[@]}"; do [[ "${stages[$index]}" == "${name%%:*}" ]] && break; done
  if ((index < start_index)); then
    echo "== $name: skipped (--start-at $start_at)"
    return 0
  fi
  echo "== $name"
  echo "+ $(quote "$@")"
  [[ "${DRY_RUN:-0}" == 1 ]] && return 0
  local rc=0
  "$@" || rc=$?
  if ((rc != 0)); then
    echo "curriculum.sh: $name failed with exit status $rc; later stages were not run" >&2
    exit "$rc"
  fi
}

# A skipped stage's output is the next stage's input: it must be there (unless only printing).
need() {
  [[ "${DRY_RUN:-0}" == 1 || -d "$1" ]] || die "--start-at=$start_at needs $1 from an earlier stage"
}

train() {
  local name="$1" recipe="$2" run_dir="$3" from="$4"
  shift 4
  local args=("recipe=$recipe" "run_dir=$run_dir")
  [[ -n "$from" ]] && args+=("stage.init_from=$from")
  run "$name" "${launch[@]}" "$nproc" "${args[@]}" "${common[@]}" "$@"
}

((start_index <= 0)) || need "$s0"
train stage0 "${RECIPE_STAGE0:-stage0_vit}" "$s0" "$init_from"
((start_index <= 1)) || need "$s1"
train stage1 "${RECIPE_STAGE1:-stage1_align}" "$s1" "$s0"
((start_index <= 2)) || need "$s2"
train stage2 "${RECIPE_STAGE2:-stage2_multitask}" "$s2" "$s1"
if ((start_index > 3)); then
  need "$s3a"
  need "$s3b"
fi
train "stage3:mix_a" "${RECIPE_STAGE3:-stage3_anneal_128k}" "$s3a" "$s2" "${mix_a[@]}"
train "stage3:mix_b" "${RECIPE_STAGE3:-stage3_anneal_128k}" "$s3b" "$s2" "${mix_b[@]}"
((start_index <= 4)) || need "$merged"
run merge keye-merge --config "${MERGE_RECIPE:-$(dirname "$here")/recipes/merge.yaml}" --input "$s3a" --input "$s3b" \
  --out "$merged" --format dcp
export_args=(keye-convert export --ckpt "$merged" --out "$hf")
[[ -n "${TOKENIZER_DIR:-}" ]] && export_args+=(--tokenizer "$TOKENIZER_DIR")
run export "${export_args[@]}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  echo "curriculum.sh: dry run, nothing was run"
else
  echo "curriculum.sh: done; Hugging Face model in $hf"
fi
